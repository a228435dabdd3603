"""How much of a LeNet-300-100 step one pass of gradient masking costs, in a plain PyTorch loop (no Lightning).

Seven arms train the same seeded LeNet-300-100 (batch 100, SGD with momentum 0.9 and weight decay 5e-4) with the same
95%-sparse masks (the layer densities SNIP picks on MNIST), alternated in one process, the order turning every round:

- ``dense``: no masking;
- ``after backward``: ``Enforcer.mask_gradients()`` after ``loss.backward()``: the prepared multiply of every
  gradient's bits by its mask (what ``SNIPPruning`` does, in ``on_after_backward``);
- ``in backward``: a ``register_post_accumulate_grad_hook`` on each pruned parameter multiplying its gradient's bits
  by its mask as soon as it is accumulated, while it is still in cache: exact too, one Python call and one operator
  call per parameter;
- ``float mask after backward``: one multiply of every gradient by a float 0/1 mask. Not exact (``inf * 0`` is
  ``nan``), so never used; it needs no integer view of the gradients, a floor for an exact pass;
- ``after backward, twice``: ``Enforcer.mask_gradients()`` twice in a row. The second pass does the same arithmetic
  over the same bytes, but on gradients and masks the first pass has just touched: the difference between the two
  passes is the cost of reaching gradients the backward has just written and masks untouched since the previous
  step, not of the multiply.

It prints the median step time per arm and its ratio to dense (median of the per-round ratios), and the median time
of each masking pass, timed around it in the same steps.

    python benchmarks/gradient_masking_floor.py
    python benchmarks/gradient_masking_floor.py --rounds 9 --steps 400
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_snip.enforcement import Enforcer

DENSITIES = (0.023, 0.24, 0.66)  # kept fractions SNIP picks for LeNet-300-100's three weights at 95% sparsity
ARMS = (
    "dense",
    "after backward",
    "in backward",
    "float mask after backward",
    "after backward, twice",
    "after backward, gradients read first",
    "after backward, masks read first",
)
WARMUP = 20


def _lenet() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)]
    return nn.Sequential(*layers)


def _bits_hook(factor: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        assert param.grad is not None
        param.grad.view(torch.int32).mul_(factor)

    return hook


def run(arm: str, steps: int) -> tuple[float, list[float]]:
    """Median step time, in seconds, of one run of ``arm``, and the median time of each of its masking passes."""
    if arm not in ARMS:
        raise ValueError(f"`arm` must be one of {ARMS}; got {arm!r}.")
    net = _lenet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    weights = {name: p for name, p in net.named_parameters() if name.endswith("weight")}
    generator = torch.Generator().manual_seed(1)
    densities = dict(zip(weights, DENSITIES, strict=True))
    kept = {name: torch.rand(p.shape, generator=generator) < densities[name] for name, p in weights.items()}
    enforcer = Enforcer(weights, kept)
    enforcer.zero_weights()  # every arm trains the same sparse weights
    passes = 2 if arm == "after backward, twice" else 1 if arm.startswith("after backward") else 0
    if passes:  # the post-step rule as SNIPPruning has it: no weight pass for SGD
        enforcer.attach([optimizer], automatic=True)
    handles = []
    if arm == "in backward":
        handles = [p.register_post_accumulate_grad_hook(_bits_hook(kept[n].int())) for n, p in weights.items()]
    grads_of = list(weights.values())
    floats = [kept[n].float() for n in weights]
    assert enforcer._batch is not None  # the prepared multiply: LeNet-300-100's integer masks fit the budget
    factors = enforcer._batch.factors  # what the pass multiplies by
    read_masks_first, read_grads_first = arm.endswith("masks read first"), arm.endswith("gradients read first")
    x, y = torch.randn(100, 1, 28, 28, generator=generator), torch.randint(0, 10, (100,), generator=generator)
    times: list[float] = []
    pass_times: list[list[float]] = [[] for _ in range(passes)]
    for _ in range(WARMUP + steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        for tensor in factors if read_masks_first else [p.grad for p in grads_of] if read_grads_first else []:
            tensor.sum()  # type: ignore[union-attr]
        for spent in pass_times:
            began = time.perf_counter()
            enforcer.mask_gradients()
            spent.append(time.perf_counter() - began)
        if arm == "float mask after backward":
            torch._foreach_mul_([p.grad for p in grads_of], floats)  # type: ignore[misc,arg-type]
        optimizer.step()
        times.append(time.perf_counter() - start)
    enforcer.detach()
    for handle in handles:
        handle.remove()
    return statistics.median(times[WARMUP:]), [statistics.median(spent[WARMUP:]) for spent in pass_times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    medians: dict[str, list[float]] = {arm: [] for arm in ARMS}
    passes: dict[str, list[list[float]]] = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        for arm in ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]:
            step, pass_times = run(arm, args.steps)
            medians[arm].append(step)
            passes[arm].append(pass_times)
    print("| arm | step | / dense | masking passes, each |")
    print("|---|---|---|---|")
    for arm in ARMS:
        ratio = statistics.median(m / d for m, d in zip(medians[arm], medians["dense"], strict=True))
        each = [statistics.median(column) for column in zip(*passes[arm], strict=True)]
        timed = ", ".join(f"{1e6 * t:.0f} µs" for t in each) or "-"
        print(f"| {arm} | {1e6 * statistics.median(medians[arm]):.0f} µs | {ratio:.3f} | {timed} |")
    print(
        f"\nLeNet-300-100, batch 100, {args.rounds} rounds of {args.steps} steps per arm (first {WARMUP} dropped),"
        f" {torch.get_num_threads()} threads."
    )


if __name__ == "__main__":
    main()
