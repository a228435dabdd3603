"""Where SNIP's weights go inside a gated recurrent network: the kept fraction of every gate's matrices.

SNIP ranks ``|dL/dw * w|`` over the whole network. In an LSTM or GRU each weight matrix stacks one block per gate; the
sigmoid gates pass a quarter of the gradient a tanh candidate passes at zero (``sigmoid'(0) = 1/4``, ``tanh'(0) = 1``),
so at high sparsity the candidate's weights outrank the gates'. This prints, per network, the share of each gate's
input-to-hidden and hidden-to-hidden weights that SNIP keeps on one training batch of Fashion-MNIST (or of MNIST with
``--dataset mnist``).

    python examples/recurrent_gates.py                       # LSTM-s and GRU-s at 95%, both initializations
    python examples/recurrent_gates.py --dataset mnist       # sequential MNIST, full when data/ holds it
    python examples/recurrent_gates.py --sparsity 0.9 --out examples/results/rnn-gates.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from classifier import ImageClassifier
from datamodules import SYSTEM_FASHION_DIR, digits_datamodule
from models import GATES, Arch
from reproduce_mnist import ARCH_NAMES
from torch import nn

from lightning_snip import ScoringContext, find_candidates, get_criterion, select_masks

ARCHS = ["lstm_s", "gru_s", "lstm_s_tf", "gru_s_tf"]


def gate_densities(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sparsity: float) -> dict[str, dict[str, float]]:
    """Score ``model`` with SNIP on one batch, select the global masks at ``sparsity`` and return, for each recurrent
    weight matrix (``weight_ih_l0``, ``weight_hh_l0``), the kept fraction of each gate's block; the other candidate
    tensors are reported whole under the gate name ``"all"``. The model is not changed."""
    weights = find_candidates(model)
    context = ScoringContext(weights=weights, loss_fn=lambda _: nn.functional.cross_entropy(model(x), y))
    masks = select_masks(get_criterion("snip").score(context), sparsity)
    model.zero_grad(set_to_none=True)
    names = next(GATES[type(m)] for m in model.modules() if type(m) in GATES)
    out: dict[str, dict[str, float]] = {}
    for name, mask in masks.items():
        if name.endswith(("weight_ih_l0", "weight_hh_l0")):
            blocks = mask.chunk(len(names), dim=0)
            out[name] = {gate: float(block.float().mean()) for gate, block in zip(names, blocks, strict=True)}
        else:
            out[name] = {"all": float(mask.float().mean())}
    return out


def markdown(rows: dict[str, dict[str, dict[str, float]]], sparsity: float) -> str:
    lines = [
        f"SNIP at {sparsity:.0%} (global), one training batch of 100 images: the share of each gate's weights kept.",
        "",
        "| network | matrix | gate 1 | gate 2 | gate 3 | gate 4 | whole matrix |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch, tensors in rows.items():
        for name, gates in tensors.items():
            cells = [f"{gate} {100 * kept:.1f}%" for gate, kept in gates.items() if gate != "all"]
            whole = gates.get("all", sum(gates.values()) / len(gates))
            cells += [""] * (4 - len(cells))
            lines.append(f"| {ARCH_NAMES[arch]} | `{name}` | " + " | ".join(cells) + f" | {100 * whole:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument(
        "--dataset",
        choices=["fashion-mnist", "mnist"],
        default="fashion-mnist",
        help="full Fashion-MNIST, or MNIST (full when torchvision's files or mnist.pkl.gz are in --data-dir)",
    )
    parser.add_argument("--data-dir", default="data", help="where torchvision's files (or mnist.pkl.gz) are")
    parser.add_argument("--system-dir", default=SYSTEM_FASHION_DIR, help="where Debian's package puts the files")
    args = parser.parse_args(argv)
    if not 0.0 < args.sparsity < 1.0:
        parser.error(f"--sparsity must be in (0, 1), got {args.sparsity}; e.g. --sparsity 0.95")
    data = digits_datamodule(args.dataset, args.data_dir, args.system_dir)
    data.setup("fit")
    generator = torch.Generator().manual_seed(args.seed)
    x, y = next(iter(torch.utils.data.DataLoader(data.train_set, batch_size=100, shuffle=True, generator=generator)))
    rows = {}
    for arch in args.archs:  # every network is scored on the same batch
        torch.manual_seed(args.seed)
        rows[arch] = gate_densities(ImageClassifier(arch=cast(Arch, arch)), x, y, args.sparsity)
    table = markdown(rows, args.sparsity)
    print(f"Data: {data.source}\n\n{table}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"Data: {data.source}.\n\n{table}")
    return rows


if __name__ == "__main__":
    main()
