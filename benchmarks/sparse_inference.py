"""What the zeros pay: file sizes and inference latency of pruned models, dense against compressed and sparsified.

For each network and sparsity pattern, every weight ``SNIPPruning`` prunes by default (``find_candidates``: weights
with two or more dimensions outside normalization layers) is pruned to the pattern, layer by layer: ``select_masks``
with ``scope="layerwise"`` on random scores for the unstructured levels, ``select_constant_fan_in`` per tensor for
the constant fan-in levels (``cfi:0.95``: every output unit keeps the same number of inputs), ``select_n_m_masks``
for 2:4, zeroed with ``apply_masks_`` as ``SNIPPruning`` does (the kernels' speed depends on how many zeros each
layer has and how they are spread over rows, not on which weights they are). Then:

- **size**: the whole file of the dense ``state_dict`` (``torch.save``) against ``save_compressed`` to ``.pt`` and
  to ``.safetensors``, and a plain ``torch.onnx.export`` against ``export_onnx`` (sparse initializers);
- **latency**: the model in eval mode under ``torch.inference_mode()`` against the same model with every pruned
  ``nn.Linear`` and 1x1 convolution forced onto MKL CSR, forced onto the compiled numba kernel (when numba is
  installed), and ``sparsify(model, example_input=x)`` built for the same input (its own per-layer choice). Rounds
  interleave dense and ``sparsify`` (dense block, sparsify block, dense block, ...), and then, in rounds of their own,
  dense, the forced kernels and ``sparsify`` again, which gives ``sparsify`` against forced MKL CSR side by side; the
  order of three or more arms turns by one every round, so no arm always follows the same one. Each arm's block calls
  its model back to back for about ``--block-ms`` (20 ms: a sparse model 10x faster makes 10x more calls, as a serving
  loop would), and a round's time is the block's time per call. ``--block-ms 0`` gives blocks of one call each: in the
  rounds of dense and ``sparsify`` every sparse call runs right after the dense model has streamed its weights through
  the caches, which measures a cold start. The table gives each arm's speed-up over the dense blocks of its own
  rounds, the ratio of the medians, with the lowest and highest per-round ratio, and ``sparsify``'s speed-up over
  forced MKL CSR in the shared rounds.

Networks: LeNet-300-100 (MNIST shapes), an MLP 4096-4096-4096-1000 with biases, one ``nn.TransformerEncoderLayer``
(d_model 1024, 16 heads, feed-forward 4096, batch-first, sequences of 16 tokens; its attention projections are
pruned, which shrinks the file, but are not ``nn.Linear`` modules, so they compute dense; no ONNX export), and the
1x1 convolutions of a ResNet-50 stage-3 bottleneck (1024 -> 256 -> 1024 channels on 14x14 maps). Batches of 1 and
64, one thread and all threads.

    python benchmarks/sparse_inference.py                        # everything, Markdown to stdout, JSON to --json
    python benchmarks/sparse_inference.py --networks mlp4096 --patterns 0.95 cfi:0.95 --batches 1 --threads 1
    python benchmarks/sparse_inference.py --device cuda --dtype float16   # on a CUDA GPU
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
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
    apply_masks_,
    compress_state_dict,
    export_onnx,
    find_candidates,
    save_compressed,
    select_masks,
    select_n_m_masks,
    sparsify,
)
from lightning_snip.inference import _sparse_layer, _SparseMatrix, is_pointwise_conv
from lightning_snip.kernels import numba_available
from lightning_snip.selection import select_constant_fan_in

PATTERNS = ("0.9", "0.95", "0.98", "0.99", "cfi:0.9", "cfi:0.95", "cfi:0.98", "cfi:0.99", "2:4")
SEQUENCE = 16  # tokens per sequence for the Transformer layer


def mlp4096() -> nn.Module:
    return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))


def transformer_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(1024, 16, 4096, dropout=0.0, batch_first=True)


def conv1x1_stack() -> nn.Module:
    """The 1x1 convolutions of a ResNet-50 stage-3 bottleneck (1024 -> 256 -> 1024 channels at 14x14)."""
    return nn.Sequential(nn.Conv2d(1024, 256, 1), nn.ReLU(), nn.Conv2d(256, 1024, 1))


NETWORKS: dict[str, tuple[str, Callable[[], nn.Module], Callable[[int], torch.Tensor]]] = {
    "lenet300": ("LeNet-300-100", lenet_300_100, lambda b: torch.randn(b, 1, 28, 28)),
    "mlp4096": ("MLP 4096-4096-4096-1000", mlp4096, lambda b: torch.randn(b, 4096)),
    "transformer": ("Transformer encoder layer 1024/4096", transformer_layer, lambda b: torch.randn(b, SEQUENCE, 1024)),
    "conv1x1": (
        "ResNet-50 1x1 convolutions 1024-256-1024 @14x14",
        conv1x1_stack,
        lambda b: torch.randn(b, 1024, 14, 14),
    ),
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
    elif pattern.startswith("cfi:"):  # every row of every tensor keeps the same number of weights
        masks = {name: select_constant_fan_in({name: s}, float(pattern[4:]))[name] for name, s in scores.items()}
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
    arms: dict[str, Callable[[], Any]], rounds: int, device: torch.device, block_s: float = 0.02
) -> dict[str, Any]:
    """Median per-call seconds of each arm (the first is dense), each arm's speed-up over dense (ratio of the
    medians) and the spread of its per-round ratios.

    Each arm's block is sized to its own speed, about ``block_s`` of back-to-back calls, as a serving loop makes them:
    a sparse model that is 10x faster makes 10x more calls per block, so the one call per block that finds the caches
    filled by the other arm's weights does not decide its time. With three arms or more, their order turns by one every
    round (A B C, B C A, C A B, ...), so no arm always runs right after the same other one; two arms alternate (A B A
    B ...), each always after the other."""
    names = list(arms)
    with torch.inference_mode():
        calls: dict[str, int] = {}
        for name, fn in arms.items():
            fn()  # warm-up
            once = _block(fn, 1, device)
            calls[name] = max(1, min(1000, int(block_s / max(once, 1e-7))))
        times: dict[str, list[float]] = {name: [] for name in arms}
        for r in range(rounds):
            turn = r % len(names) if len(names) > 2 else 0
            for name in names[turn:] + names[:turn]:
                times[name].append(_block(arms[name], calls[name], device))
    dense = names[0]
    out: dict[str, Any] = {"dense_ms": statistics.median(times[dense]) * 1e3, "calls_per_block": calls}
    for name in names[1:]:
        out[name] = _ratio(times[dense], times[name])
    out["_times"] = times
    return out


def _ratio(base: list[float], other: list[float]) -> dict[str, float]:
    """``other``'s median time, and how much faster it is than ``base`` (ratio of the medians; per-round spread)."""
    ratios = [b / t for b, t in zip(base, other, strict=True)]
    return {
        "ms": statistics.median(other) * 1e3,
        "speedup": statistics.median(base) / statistics.median(other),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
    }


def forced(model: nn.Module, kernel: str) -> nn.Module:
    """A copy with every pruned ``nn.Linear`` and 1x1 convolution on ``kernel``, measured or not."""
    copy_ = __import__("copy").deepcopy(model)
    for parent in list(copy_.modules()):
        for name, child in list(parent._modules.items()):
            if (type(child) is nn.Linear or is_pointwise_conv(child)) and bool((child.weight == 0).any()):
                setattr(parent, name, _sparse_layer(child, kernel))  # type: ignore[arg-type]
    return copy_


def sizes(model: nn.Module, x: torch.Tensor, scratch: Path, onnx: bool) -> dict[str, int | None]:
    """Bytes of the dense ``.pt``, the compressed ``.pt`` and ``.safetensors``, and the plain and sparse ONNX."""
    state = model.state_dict()
    out: dict[str, int | None] = {
        "dense_pt": file_bytes(state),
        "compressed_pt": file_bytes(compress_state_dict(state)),
        "safetensors": save_compressed(state, scratch / "model.safetensors"),
        "onnx_plain": None,
        "onnx_sparse": None,
    }
    if onnx:
        report = export_onnx(model, x, scratch / "model.onnx")
        out["onnx_plain"], out["onnx_sparse"] = report.dense_bytes, report.bytes
    return out


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
    kernels = ["csr", "numba"] if device.type == "cpu" and numba_available() else ["csr"]
    block = args.block_ms / 1e3
    scratch = Path(tempfile.mkdtemp(prefix="sparse-inference-"))
    for key in args.networks:
        title, build, make_input = NETWORKS[key]
        for pattern in args.patterns:
            model = pruned(build, pattern).to(device, dtype)
            files = sizes(model, make_input(1).to(device, dtype), scratch, args.onnx and key != "transformer")
            results["sizes"].append({"network": title, "pattern": pattern, **files})
            print(f"{title} {pattern}: files {files}", file=sys.stderr, flush=True)
            for threads in args.threads:
                torch.set_num_threads(all_threads if threads == 0 else threads)
                for batch in args.batches:
                    x = make_input(batch).to(device, dtype)
                    fast = sparsify(model, example_input=x)
                    layers = sum(type(m) is nn.Linear or is_pointwise_conv(m) for m in model.modules())
                    chosen = [m.kernel for m in fast.modules() if isinstance(m, _SparseMatrix)]
                    # `sparsify` against dense alone, as a user runs it; then, in rounds of their own, dense, the
                    # forced kernels and `sparsify` side by side, which measures `sparsify` against MKL CSR directly
                    pair = {"dense": lambda: model(x), "sparsify": lambda: fast(x)}  # noqa: B023
                    timing = interleaved(pair, args.rounds, device, block)
                    del timing["_times"]
                    arms: dict[str, Callable[[], Any]] = {"dense": lambda: model(x)}  # noqa: B023
                    for kernel in kernels:
                        arms[kernel] = (lambda m: lambda: m(x))(forced(model, kernel))  # noqa: B023
                    arms["sparsify"] = pair["sparsify"]
                    side = interleaved(arms, args.rounds, device, block)
                    timing.update({k: side[k] for k in kernels})
                    timing["sparsify_vs_csr"] = _ratio(side["_times"]["csr"], side["_times"]["sparsify"])
                    row = {
                        "network": title,
                        "pattern": pattern,
                        "threads": torch.get_num_threads(),
                        "batch": batch,
                        "sparse_layers": f"{len(chosen)}/{layers}",
                        "chosen": chosen,
                        **timing,
                    }
                    results["latency"].append(row)
                    print(
                        f"  {threads or 'all'} thread(s), batch {batch}: "
                        + ", ".join(f"{k} {timing[k]['speedup']:.2f}x" for k in [*kernels, "sparsify"])
                        + f" ({row['sparse_layers']} layers sparse: {chosen}),"
                        + f" sparsify/csr {timing['sparsify_vs_csr']['speedup']:.2f}x",
                        file=sys.stderr,
                        flush=True,
                    )
        torch.set_num_threads(all_threads)
    return results


def _pattern_label(pattern: str) -> str:
    if pattern.startswith("cfi:"):
        return f"{float(pattern[4:]):.0%} constant fan-in"
    return "2:4" if pattern == "2:4" else f"{float(pattern):.0%}"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _x(dense: int, n: int | None) -> str:
    return "" if n is None else f" ({dense / n:.1f}x)"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| network | sparsity | dense .pt | compressed .pt | .safetensors | ONNX | sparse ONNX |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["sizes"]:
        dense = r["dense_pt"]
        lines.append(
            f"| {r['network']} | {_pattern_label(r['pattern'])} | {_mb(dense)} | {_mb(r['compressed_pt'])}"
            f"{_x(dense, r['compressed_pt'])} | {_mb(r['safetensors'])}{_x(dense, r['safetensors'])}"
            f" | {_mb(r['onnx_plain'])} | {_mb(r['onnx_sparse'])}"
            + (_x(r["onnx_plain"], r["onnx_sparse"]) if r["onnx_plain"] else "")
            + " |"
        )
    lines += [
        "",
        "| network | sparsity | threads | batch | dense ms | MKL CSR | numba | `sparsify` (its choice) |"
        " `sparsify` vs MKL CSR |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["latency"]:
        cells = []
        for arm in ("csr", "numba", "sparsify", "sparsify_vs_csr"):
            t = r.get(arm)
            cells.append("-" if t is None else f"{t['speedup']:.2f}x ({t['speedup_min']:.2f}-{t['speedup_max']:.2f})")
        choice = ", ".join(sorted(set(r["chosen"]))) or "dense"
        lines.append(
            f"| {r['network']} | {_pattern_label(r['pattern'])} | {r['threads']} | {r['batch']} | {r['dense_ms']:.3f}"
            f" | {cells[0]} | {cells[1]} | {cells[2]}: {r['sparse_layers']} {choice} | {cells[3]} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 0], help="0 means all threads (default: 1 0)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per measurement")
    parser.add_argument(
        "--block-ms",
        type=float,
        default=20.0,
        help="milliseconds of back-to-back calls per arm and round (0: one call, a cold start after the dense arm)",
    )
    parser.add_argument("--device", default="cpu", help="e.g. cuda (GPU paths: cuSPARSE CSR, 2:4 semi-structured)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the ONNX exports (a few s each)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or any(b < 1 for b in args.batches) or any(t < 0 for t in args.threads):
        parser.error("--rounds and --batches must be >= 1 and --threads >= 0")
    if args.block_ms < 0:
        parser.error(f"--block-ms must be >= 0 (milliseconds per block; 0 for one call), got {args.block_ms}")
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
