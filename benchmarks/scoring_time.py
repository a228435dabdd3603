"""Scoring time per criterion, as the callback reports it (``snip/scoring_time_s``), against one training step.

Each criterion prunes a fresh LeNet-300-100 and LeNet-5-Caffe (MNIST shapes, random data, batch 100, 98%) inside a
real ``Trainer.fit`` of one step, with its default rounds unless ``--iterations`` says otherwise; the table gives the
scoring time, and how many dense forward+backward passes on one batch it is worth (the median of 20 such passes,
timed in the same process). An iterative criterion should cost about its number of rounds.

    python benchmarks/scoring_time.py
    python benchmarks/scoring_time.py --networks lenet300 --criteria snip force --iterations 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from models import lenet_5_caffe, lenet_300_100

from lightning_snip import SNIPPruning, available_criteria, get_criterion
from lightning_snip.scoring import CriterionName

NETWORKS = {"lenet300": ("LeNet-300-100", lenet_300_100), "lenet5": ("LeNet-5-Caffe", lenet_5_caffe)}


class Recorder(Logger):
    """Keeps the metrics logged to it."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.example_input_array = torch.zeros(1, 1, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(batches * 100, 1, 28, 28, generator=g), torch.randint(0, 10, (batches * 100,)))
    return DataLoader(data, batch_size=100)


def step_seconds(build: Any) -> float:
    torch.manual_seed(0)
    model = Classifier(build())
    x, y = next(iter(loader(1)))
    times = []
    for _ in range(21):
        start = time.perf_counter()
        nn.functional.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def scoring_seconds(build: Any, criterion: str, iterations: int | None, sparsity: float) -> float:
    torch.manual_seed(0)
    rounds = iterations or get_criterion(criterion).default_iterations or 1
    recorder = Recorder()
    trainer = pl.Trainer(
        max_steps=1,
        logger=recorder,
        callbacks=[
            SNIPPruning(sparsity=sparsity, criterion=cast(CriterionName, criterion), iterations=iterations, plot=False)
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Classifier(build()), loader(rounds + 1))
    return recorder.metrics["snip/scoring_time_s"]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--criteria", nargs="+", default=available_criteria(), choices=available_criteria())
    parser.add_argument("--iterations", type=int, help="rounds of the iterative criteria (default: their own)")
    parser.add_argument("--sparsity", type=float, default=0.98)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(treespec|does not have many workers|pruned entirely).*")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rows = []
    for key in args.networks:
        title, build = NETWORKS[key]
        step = step_seconds(build)
        for criterion in args.criteria:
            iterations = args.iterations if get_criterion(criterion).default_iterations else None
            rounds = iterations or get_criterion(criterion).default_iterations or 1
            seconds = scoring_seconds(build, criterion, iterations, args.sparsity)
            rows.append(
                {"network": title, "criterion": criterion, "rounds": rounds, "seconds": seconds, "step_seconds": step}
            )
            print(f"{title} {criterion}: {seconds:.2f} s", file=sys.stderr, flush=True)
    print("| network | criterion | rounds | scoring time | x one forward+backward |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['network']} | {r['criterion']} | {r['rounds']} | {r['seconds']:.2f} s"
            f" | {r['seconds'] / r['step_seconds']:.0f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
