"""When does a block-sparse (BSR) kernel pay on the CPU? One 4096x4096 weight whose zeros come in square blocks (the
case BSR is made for), multiplied by a batch of 1 and of 64 inputs: dense, PyTorch's BSR product (``to_sparse_bsr``),
MKL CSR, the compiled numba kernel (when numba is installed), and ``sparsify`` of an ``nn.Linear`` holding the weight,
given the batch as its example input (its own measured choice among CSR, numba and BSR).

Rounds interleave the arms; each arm's block runs back to back for about 20 ms, as in ``sparse_inference.py``. The
table gives each arm's speed-up over dense (ratio of the medians over the rounds) and the kernel ``sparsify`` chose.

    python benchmarks/block_sparse.py --json benchmarks/results/block_sparse_cpu.json
    python benchmarks/block_sparse.py --blocks 16 --batches 1 --rounds 3        # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sparse_inference import interleaved

from lightning_snip import sparsify
from lightning_snip.inference import _SparseMatrix
from lightning_snip.kernels import RowKernel, numba_available


def block_masked_weight(size: int, block: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """A ``(size, size)`` normal weight in which whole ``block x block`` tiles are zero: ``sparsity`` of the tiles."""
    generator = torch.Generator().manual_seed(seed)
    tiles = size // block
    kept = torch.randperm(tiles * tiles, generator=generator)[: round((1 - sparsity) * tiles * tiles)]
    tile_mask = torch.zeros(tiles * tiles, dtype=torch.bool)
    tile_mask[kept] = True
    mask = tile_mask.view(tiles, tiles).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return torch.randn(size, size, generator=generator) * mask


def measure(size: int, block: int, sparsity: float, batch: int, rounds: int) -> dict[str, Any]:
    """Every arm's speed-up over the dense product for one block size and batch; outputs checked against dense."""
    weight = block_masked_weight(size, block, sparsity)
    x = torch.randn(size, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyTorch calls its sparse CSR/BSR support beta
        csr, bsr = weight.to_sparse_csr(), weight.to_sparse_bsr((block, block))
    arms: dict[str, Callable[[], Any]] = {
        "dense": lambda: weight @ x,
        "bsr": lambda: bsr @ x,
        "csr": lambda: torch.sparse.mm(csr, x),
    }
    if numba_available():
        rows = RowKernel(weight)
        arms["numba"] = lambda: rows(x)
    linear = nn.Linear(size, size, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    rows_in = x.t().contiguous()  # the layer's input: one row per example
    fast = sparsify(linear, example_input=rows_in)
    chosen = fast.kernel if isinstance(fast, _SparseMatrix) else "dense"
    arms["sparsify"] = lambda: fast(rows_in).t()
    expected = weight @ x
    for name, arm in arms.items():
        with torch.inference_mode():
            got = arm()
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-3):
            raise AssertionError(f"{name}: the product differs from dense by {float((got - expected).abs().max())}")
    timing = interleaved(arms, rounds, torch.device("cpu"))
    row: dict[str, Any] = {"block": block, "sparsity": sparsity, "batch": batch, "dense_ms": timing["dense_ms"]}
    row.update({name: timing[name]["speedup"] for name in arms if name != "dense"})
    row["sparsify_kernel"] = chosen
    return row


def table(rows: list[dict[str, Any]]) -> str:
    arms = [a for a in ("bsr", "csr", "numba", "sparsify") if a in rows[0]]
    names = {"bsr": "BSR", "csr": "MKL CSR", "numba": "numba", "sparsify": "`sparsify` (its choice)"}
    lines = [
        "| blocks | sparsity | batch | dense ms | " + " | ".join(names[a] for a in arms) + " |",
        "|---|---|---:|---:|" + "---:|" * len(arms),
    ]
    for r in rows:
        cells = " | ".join(f"{r[a]:.2f}x" + (f": {r['sparsify_kernel']}" if a == "sparsify" else "") for a in arms)
        lines.append(
            f"| {r['block']}x{r['block']} | {r['sparsity']:.0%} | {r['batch']} | {r['dense_ms']:.3f} | {cells} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="rows and columns of the weight")
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16], help="tile sizes")
    parser.add_argument("--sparsity", type=float, default=0.95, help="fraction of tiles that are zero")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: all)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not 0 < args.sparsity < 1:
        parser.error(f"--sparsity must be in (0, 1), got {args.sparsity}; use e.g. 0.95")
    bad = [b for b in args.blocks if b < 1 or args.size % b]
    if bad:
        parser.error(f"--blocks {bad}: each tile size must be >= 1 and divide --size {args.size}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(args.size, b, args.sparsity, n, args.rounds) for b in args.blocks for n in args.batches]
    results = {
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "size": args.size,
        "rows": rows,
    }
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
