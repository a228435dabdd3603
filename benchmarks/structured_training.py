"""Training step time of a network shrunk by `SNIPPruning(structure="channel")` against the dense one, side by side.

Each arm trains the same network from the same initialization through Lightning, timed the way a user times steps
(a callback reading `perf_counter` at batch start and end, listed last): dense; channel SNIP removing 50% and 75% of
the prunable channels. Rounds interleave the arms in one process (the order turns every round); the first steps of
every fit are warm-up and discarded. The ratio is the dense median step over the arm's, per round, then the median of
those. Parameters and MACs (one example, by Torch-Pruning's counter) are those of the network each arm trains.

    python benchmarks/structured_training.py                          # ResNet-18 (CIFAR form) and LeNet-5-Caffe
    python benchmarks/structured_training.py --networks resnet18 --rounds 3 --json out.json
    python benchmarks/structured_training.py --quick                  # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import lenet_5_caffe, resnet18_cifar
from training_overhead import UserStepTimer

from lightning_snip import SNIPPruning
from lightning_snip.structured import count_macs, count_parameters

WARMUP = 3
NETWORKS = {
    "resnet18": (resnet18_cifar, (3, 32, 32), 32),  # builder, input shape, batch size
    "lenet5": (lenet_5_caffe, (1, 28, 28), 100),
}


class Classifier(pl.LightningModule):
    """SGD with momentum 0.9 and weight decay 5e-4, cross-entropy."""

    def __init__(self, net: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.example_input_array = torch.zeros(1, *shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def _fit(
    model: Classifier, loader: DataLoader, callbacks: list[pl.Callback], steps: int, accelerator: str
) -> list[float]:
    timer = UserStepTimer()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=WARMUP + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(prefix="structured-"),
        callbacks=[*callbacks, timer],
    )
    trainer.fit(model, loader)
    return timer.times[WARMUP:]


def measure(
    name: str,
    sparsities: list[float],
    rounds: int,
    steps: int,
    scope: str,
    accelerator: str = "cpu",
    batch: int | None = None,
) -> dict[str, Any]:
    """Median step times, parameters and MACs of dense and each channel sparsity, interleaved in one process."""
    build, shape, default_batch = NETWORKS[name]
    batch = batch or default_batch
    torch.manual_seed(0)
    initial = Classifier(build(), shape).state_dict()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(batch * 4, *shape, generator=g), torch.randint(0, 10, (batch * 4,), generator=g))
    loader = DataLoader(data, batch_size=batch, shuffle=True)
    arms = ["dense", *[f"channel {s:.0%}" for s in sparsities]]
    medians: dict[str, list[float]] = {arm: [] for arm in arms}
    sizes: dict[str, tuple[int, int]] = {}
    example = torch.zeros(1, *shape)
    for r in range(rounds):
        for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:
            model = Classifier(build(), shape)
            model.load_state_dict(initial)
            callbacks: list[pl.Callback] = []
            if arm != "dense":
                sparsity = sparsities[arms.index(arm) - 1]
                callbacks.append(SNIPPruning(sparsity=sparsity, structure="channel", scope=scope, plot=False))
            medians[arm].append(statistics.median(_fit(model, loader, callbacks, steps, accelerator)))
            if arm not in sizes:
                net = model.net.cpu()
                sizes[arm] = (count_parameters(net), count_macs(net, example))
    dense = medians["dense"]
    result: dict[str, Any] = {
        "network": name,
        "batch": batch,
        "scope": scope,
        "rounds": rounds,
        "steps": steps,
        "accelerator": accelerator,
        "threads": torch.get_num_threads(),
        "arms": {},
    }
    for arm in arms:
        ratios = [d / m for d, m in zip(dense, medians[arm], strict=True)]
        result["arms"][arm] = {
            "step_ms": 1000 * statistics.median(medians[arm]),
            "speedup": statistics.median(ratios),
            "speedups": ratios,
            "params": sizes[arm][0],
            "params_ratio": sizes[arm][0] / sizes["dense"][0],
            "macs": sizes[arm][1],
            "macs_ratio": sizes[arm][1] / sizes["dense"][1],
        }
    return result


def table(results: list[dict[str, Any]]) -> str:
    """The Markdown table of every network and arm."""
    lines = [
        "| network | arm | params | MACs | step | speed-up over dense (per-round range) |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        for arm, row in result["arms"].items():
            spread = f"{min(row['speedups']):.2f}-{max(row['speedups']):.2f}"
            lines.append(
                f"| {result['network']} (batch {result['batch']}, {result['scope']}) | {arm} | {row['params']:,}"
                f" ({row['params_ratio']:.2f}x) | {row['macs']:,} ({row['macs_ratio']:.2f}x) | {row['step_ms']:.1f} ms"
                f" | **{row['speedup']:.2f}x** ({spread}) |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scope", default="layerwise", choices=["layerwise", "global"])
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--batch", type=int, default=None, help="batch size for every network (default: 32 / 100)")
    parser.add_argument("--quick", action="store_true", help="LeNet-5 only, 1 round of 2 steps: a smoke run")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.networks, args.rounds, args.steps = ["lenet5"], 1, 2
    accelerator = args.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    results = [
        measure(n, args.sparsities, args.rounds, args.steps, args.scope, accelerator, args.batch) for n in args.networks
    ]
    print(f"\n{accelerator}, {torch.get_num_threads()} threads, {args.rounds} rounds of {args.steps} steps\n")
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
