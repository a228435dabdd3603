"""What the zeros pay: file sizes and inference latency of pruned models, dense against compressed and sparsified.

For each network and sparsity pattern, every weight ``SNIPPruning`` prunes by default (``find_candidates``: weights
with two or more dimensions outside normalization layers) is pruned to the pattern, layer by layer: ``select_masks``
with ``scope="layerwise"`` on random scores for the unstructured levels, ``select_n_m_masks`` for 2:4, zeroed with
``apply_masks_`` as ``SNIPPruning`` does (the kernels' speed depends on how many zeros each layer has, not on which
weights they are). Then:

- **size**: the whole ``torch.save`` file of the dense ``state_dict`` against that of ``compress_state_dict``;
- **latency**: the model in eval mode under ``torch.inference_mode()`` against ``sparsify(model, example_input=x)``
  built for the same input. Rounds interleave the two (dense block, sparse block, dense block, ...); each block calls
  the model enough times to last a few milliseconds, and a round's time is the block's time per call. The table
  gives the median per-call time of each and the ratio of the medians, with the lowest and highest per-round ratio.

Networks: LeNet-300-100 (MNIST shapes), an MLP 4096-4096-4096-1000 with biases, and one ``nn.TransformerEncoderLayer``
(d_model 1024, 16 heads, feed-forward 4096, batch-first, sequences of 16 tokens; its attention projections are
pruned, which shrinks the file, but are not ``nn.Linear`` modules, so they compute dense). Batches of 1 and 64, one
thread and all threads.

    python benchmarks/sparse_inference.py                        # everything, Markdown to stdout, JSON to --json
    python benchmarks/sparse_inference.py --networks mlp4096 --patterns 0.95 0.98 --batches 64 --threads 1
    python benchmarks/sparse_inference.py --device cuda --dtype float16   # on a CUDA GPU
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from models import lenet_300_100

from lightning_snip import (
    SparseLinear,
    apply_masks_,
    compress_state_dict,
    find_candidates,
    select_masks,
    select_n_m_masks,
    sparsify,
)

PATTERNS = ("0.9", "0.95", "0.98", "0.99", "2:4")
SEQUENCE = 16  # tokens per sequence for the Transformer layer


def mlp4096() -> nn.Module:
    return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))


def transformer_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(1024, 16, 4096, dropout=0.0, batch_first=True)


NETWORKS: dict[str, tuple[str, Callable[[], nn.Module], Callable[[int], torch.Tensor]]] = {
    "lenet300": ("LeNet-300-100", lenet_300_100, lambda b: torch.randn(b, 1, 28, 28)),
    "mlp4096": ("MLP 4096-4096-4096-1000", mlp4096, lambda b: torch.randn(b, 4096)),
    "transformer": ("Transformer encoder layer 1024/4096", transformer_layer, lambda b: torch.randn(b, SEQUENCE, 1024)),
}


def pruned(build: Callable[[], nn.Module], pattern: str, seed: int = 0) -> nn.Module:
    """The network with every weight ``SNIPPruning`` would prune cut to ``pattern`` (exact counts, random positions)."""
    torch.manual_seed(seed)
    model = build().eval()
    weights = find_candidates(model)  # every weight with ndim >= 2 outside norms: attention projections too
    g = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(w.shape, generator=g) for name, w in weights.items()}
    if pattern == "2:4":
        masks = select_n_m_masks(scores, 2, 4)
    else:
        masks = select_masks(scores, float(pattern), scope="layerwise")
    apply_masks_(weights.values(), masks.values())  # as SNIPPruning zeroes: exactly +0.0
    return model


def file_bytes(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _block(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls


def interleaved(
    dense: Callable[[], Any], sparse: Callable[[], Any], rounds: int, device: torch.device
) -> dict[str, float]:
    """Median per-call seconds of each, the ratio of medians and the spread of per-round ratios."""
    with torch.inference_mode():
        dense(), sparse()  # warm-up
        once = _block(dense, 1, device)
        calls = max(1, min(200, int(0.005 / max(once, 1e-7))))  # blocks of about 5 ms or more
        dense_times, sparse_times = [], []
        for _ in range(rounds):
            dense_times.append(_block(dense, calls, device))
            sparse_times.append(_block(sparse, calls, device))
    ratios = [d / s for d, s in zip(dense_times, sparse_times, strict=True)]
    return {
        "dense_ms": statistics.median(dense_times) * 1e3,
        "sparse_ms": statistics.median(sparse_times) * 1e3,
        "speedup": statistics.median(dense_times) / statistics.median(sparse_times),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "calls_per_block": calls,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    all_threads = torch.get_num_threads()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    results: dict[str, Any] = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": args.dtype,
            "processor": platform.processor() or platform.machine(),
            "threads_available": all_threads,
            "torch": torch.__version__,
            "mkl": torch.backends.mkl.is_available(),
        },
        "rounds": args.rounds,
        "sizes": [],
        "latency": [],
    }
    for key in args.networks:
        title, build, make_input = NETWORKS[key]
        dense_size = file_bytes(pruned(build, "0.9").state_dict())  # the dense file does not depend on the zeros
        for pattern in args.patterns:
            model = pruned(build, pattern).to(device, dtype)
            compressed = file_bytes(compress_state_dict(model.state_dict()))
            results["sizes"].append(
                {"network": title, "pattern": pattern, "dense_bytes": dense_size, "compressed_bytes": compressed}
            )
            print(f"{title} {pattern}: {dense_size / compressed:.1f}x smaller file", file=sys.stderr, flush=True)
            for threads in args.threads:
                torch.set_num_threads(all_threads if threads == 0 else threads)
                for batch in args.batches:
                    x = make_input(batch).to(device, dtype)
                    fast = sparsify(model, example_input=x)
                    sparse_layers = sum(isinstance(m, SparseLinear) for m in fast.modules())
                    linears = sum(type(m) is nn.Linear for m in model.modules())
                    timing = interleaved(lambda: model(x), lambda: fast(x), args.rounds, device)  # noqa: B023
                    row = {
                        "network": title,
                        "pattern": pattern,
                        "threads": torch.get_num_threads(),
                        "batch": batch,
                        "sparse_layers": f"{sparse_layers}/{linears}",
                        **timing,
                    }
                    results["latency"].append(row)
                    print(
                        f"  {threads or 'all'} thread(s), batch {batch}: {timing['speedup']:.2f}x"
                        f" ({row['sparse_layers']} layers sparse)",
                        file=sys.stderr,
                        flush=True,
                    )
        torch.set_num_threads(all_threads)
    return results


def _pattern_label(pattern: str) -> str:
    return "2:4" if pattern == "2:4" else f"{float(pattern):.0%}"


def markdown(results: dict[str, Any]) -> str:
    lines = ["| network | sparsity | dense file | compressed file | smaller by |", "|---|---|---:|---:|---:|"]
    for r in results["sizes"]:
        lines.append(
            f"| {r['network']} | {_pattern_label(r['pattern'])} | {r['dense_bytes'] / 1e6:.2f} MB"
            f" | {r['compressed_bytes'] / 1e6:.2f} MB | {r['dense_bytes'] / r['compressed_bytes']:.1f}x |"
        )
    lines += [
        "",
        "| network | sparsity | threads | batch | sparse layers | dense ms | sparsified ms | speed-up (min-max) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["latency"]:
        lines.append(
            f"| {r['network']} | {_pattern_label(r['pattern'])} | {r['threads']} | {r['batch']} | {r['sparse_layers']}"
            f" | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f}"
            f" | {r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 0], help="0 means all threads (default: 1 0)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per measurement")
    parser.add_argument("--device", default="cpu", help="e.g. cuda (GPU paths: cuSPARSE CSR, 2:4 semi-structured)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or any(b < 1 for b in args.batches) or any(t < 0 for t in args.threads):
        parser.error("--rounds and --batches must be >= 1 and --threads >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
    results = run(args)
    print(markdown(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
