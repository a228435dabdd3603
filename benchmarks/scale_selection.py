"""Score and select on a synthetic model of over a billion candidate weights, on CPU, and print:

- peak resident memory during scoring + selection against the bound
  parameters + gradients + masks (1 byte per weight) + activations + a small constant;
- selection time of lightning-snip's radix select against a plain concatenate-and-topk, side by side on the same
  scores in this process (skipped when the concatenation would not fit in memory);
- the checkpoint overhead of the bit-packed masks, in bytes per weight.

    python benchmarks/scale_selection.py                  # 16 x Linear(8192, 8192): 1,073,741,824 weights
    python benchmarks/scale_selection.py --width 2048     # 67M weights, seconds

Linux only (peak memory from /proc/self/status).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import torch
from torch import nn

from lightning_snip import ScoringContext, get_criterion, select_masks
from lightning_snip.packing import pack_mask
from lightning_snip.selection import kept_count

GIB = 2**30


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.manual_seed(0)
    threads = torch.get_num_threads()

    base_rss = _status("VmRSS")
    model = nn.Sequential(*[nn.Linear(args.width, args.width, bias=False) for _ in range(args.layers)])
    weights = dict(model.named_parameters())
    n = sum(p.numel() for p in weights.values())
    x = torch.randn(args.batch, args.width)
    print(f"{n:,} candidate weights in {args.layers} tensors of {args.width}x{args.width}; {threads} threads")

    # scoring + selection, exactly as the callback does it
    reset_peak()
    start_rss = _status("VmRSS")
    t0 = time.perf_counter()
    context = ScoringContext(weights=weights, loss_fn=lambda i: model(x).square().mean())
    scores = get_criterion("snip").score(context)
    t1 = time.perf_counter()
    peak_scoring = _status("VmHWM")
    kept = select_masks(scores, args.sparsity)
    t2 = time.perf_counter()
    pruned = {name: mask.logical_not_() for name, mask in kept.items()}
    peak = _status("VmHWM")
    assert sum(int((~m).sum()) for m in pruned.values()) == kept_count(n, args.sparsity)

    params = 4 * n
    activations = 2 * args.layers * args.batch * args.width * 4  # saved inputs and their gradients
    constant = 256 * 2**20
    bound = start_rss + 4 * n + n + activations + constant  # start_rss holds the parameters already
    print(f"peak RSS after scoring {peak_scoring / GIB:.2f} GiB; after selection {peak / GIB:.2f} GiB")
    figures = {
        "weights": n,
        "scoring_s": t1 - t0,
        "selection_s": t2 - t1,
        "peak_rss_gib": peak / GIB,
        "rss_before_scoring_gib": start_rss / GIB,
        "bound_gib": bound / GIB,
        "extra_bytes_per_weight": (peak - start_rss) / n,
    }
    print(f"scoring (forward+backward, SNIP scores in the gradient buffers): {figures['scoring_s']:.1f} s")
    print(f"selection (radix select, exact count, deterministic ties):     {figures['selection_s']:.1f} s")
    print(
        f"peak RSS {peak / GIB:.2f} GiB (before scoring {start_rss / GIB:.2f} GiB, of which parameters"
        f" {params / GIB:.2f} GiB and the process {base_rss / GIB:.2f} GiB)"
    )
    print(
        f"bound    {bound / GIB:.2f} GiB = before scoring + gradients {4 * n / GIB:.2f} + masks {n / GIB:.2f}"
        f" + activations {activations / GIB:.3f} + constant {constant / GIB:.2f}"
        f"  -> {'within' if peak <= bound else 'OVER'} the bound"
        f" ({(peak - start_rss) / n:.2f} extra bytes per weight)"
    )

    # bit-packed masks as stored in checkpoints
    buffer = io.BytesIO()
    state = {
        "masks": {k: pack_mask(~m) for k, m in pruned.items()},
        "shapes": {k: list(m.shape) for k, m in pruned.items()},
    }
    torch.save(state, buffer)
    figures["checkpoint_bytes_per_weight"] = buffer.getbuffer().nbytes / n
    print(
        f"checkpoint: {buffer.getbuffer().nbytes:,} bytes for the masks = {figures['checkpoint_bytes_per_weight']:.4f}"
        " bytes per weight (bool masks: 1.0)"
    )
    del state, buffer

    # side by side: concatenate all scores and take the top-k, on the same scores, if it fits
    meminfo = {
        line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
    }
    available = meminfo["MemAvailable"]
    k = kept_count(n, args.sparsity)
    need = 16 * n + 12 * k + GIB  # the concatenation, and topk's own working memory (measured: well over 8 B/weight)
    if need < available:
        t3 = time.perf_counter()
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        top = torch.topk(flat, k, sorted=False)
        t4 = time.perf_counter()
        threshold = float(top.values.min())
        highest_pruned = max(float(scores[name][m].max()) for name, m in pruned.items() if m.any())
        assert threshold >= highest_pruned, "topk keeps a score that radix select prunes"
        figures["concat_topk_s"] = t4 - t3
        print(
            f"concatenate + topk: {t4 - t3:.1f} s and {4 * n / GIB:.2f} GiB more for the concatenation"
            f" -> radix select takes {figures['selection_s'] / (t4 - t3):.2f}x its time"
        )
        del flat, top
    else:
        print(f"concatenate + topk skipped: needs {need / GIB:.1f} GiB, {available / GIB:.1f} GiB available")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
