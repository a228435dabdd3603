"""Per-step cost of SNIPPruning against dense training and Lightning's ModelPruning, side by side in one process.

For each network, three variants train the same model shape on the same batches with the same thread count:
dense (no callback), SNIPPruning, and ModelPruning (global l1_unstructured at the same sparsity over the same
weights, pruned once at the start of training, kept as masks during training). Rounds interleave the variants
(dense, snip, modelpruning, dense, ...); the first steps of every round are warm-up and discarded. It prints a Markdown
table (median step time, spread, ratio to dense, memory per candidate weight, scoring cost) and can write JSON.

    python benchmarks/training_overhead.py                     # LeNet-300-100, ResNet-18 (CIFAR), Transformer
    python benchmarks/training_overhead.py --networks lenet300 --rounds 5 --steps 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from models import lenet_300_100, resnet18_cifar

from lightning_snip import SNIPPruning, find_candidates
from lightning_snip.masks import select_masks

SPARSITY = 0.9


class TinyTransformerLM(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 256, layers: int = 4, heads: int = 4, seq: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens), mask=self.causal_mask, is_causal=True))


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module, sequence: bool) -> None:
        super().__init__()
        self.net, self.sequence = net, sequence

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        return nn.functional.cross_entropy(out.transpose(1, 2) if self.sequence else out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def network(name: str) -> tuple[Callable[[], nn.Module], DataLoader, bool]:
    g = torch.Generator().manual_seed(0)
    if name == "lenet300":
        data = TensorDataset(torch.randn(100 * 64, 1, 28, 28, generator=g), torch.randint(0, 10, (6400,), generator=g))
        return lenet_300_100, DataLoader(data, batch_size=100), False
    if name == "resnet18":
        data = TensorDataset(torch.randn(64 * 8, 3, 32, 32, generator=g), torch.randint(0, 10, (512,), generator=g))
        return resnet18_cifar, DataLoader(data, batch_size=64), False
    tokens = torch.randint(0, 1000, (32 * 8, 129), generator=g)
    return TinyTransformerLM, DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=32), True


class ModelPruningAtStart(ModelPruning):
    """ModelPruning that prunes once when training starts and keeps the masks (no epoch-end pruning)."""

    def __init__(self, parameters_to_prune: list[tuple[nn.Module, str]]) -> None:
        super().__init__(
            "l1_unstructured",
            parameters_to_prune=parameters_to_prune,
            amount=SPARSITY,
            use_global_unstructured=True,
            apply_pruning=False,
            make_pruning_permanent=False,
            verbose=0,
            use_lottery_ticket_hypothesis=False,
        )
        self.pruned = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.pruned:
            self.apply_pruning(SPARSITY)
            self.pruned = True


class StepTimer(pl.Callback):
    """Two instances bracket every other callback: the first starts the clock, the last stops it."""

    def __init__(self, times: list[float], start: bool) -> None:
        self.times, self.start = times, start

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.start:
            StepTimer.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.start:
            self.times.append(time.perf_counter() - StepTimer.t0)


def _targets(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """SNIP's candidates as ModelPruning targets, minus MultiheadAttention's output projection: attention reads
    `out_proj.weight` without calling `out_proj`, so torch.nn.utils.prune's forward pre-hook never refreshes it and the
    second backward fails ("Trying to backward through the graph a second time")."""
    owners = {
        f"{prefix}.{name}" if prefix else name: (m, name)
        for prefix, m in module.named_modules()
        for name, _ in m.named_parameters(recurse=False)
    }
    return [owners[n] for n in find_candidates(module) if not n.endswith("self_attn.out_proj.weight")]


def fwd_bwd_time(model: Module, batch: Any, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.training_step(batch, 0).backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def bench(name: str, rounds: int, steps: int, warmup: int) -> dict[str, Any]:
    build, loader, sequence = network(name)
    torch.manual_seed(0)
    models = {variant: Module(build(), sequence) for variant in ("dense", "snip", "modelpruning")}
    for m in models.values():
        m.load_state_dict(models["dense"].state_dict())
    snip = SNIPPruning(sparsity=SPARSITY, log_per_layer=False, plot=False)
    modelpruning = ModelPruningAtStart(_targets(models["modelpruning"]))
    callbacks = {"dense": [], "snip": [snip], "modelpruning": [modelpruning]}
    times: dict[str, list[float]] = {variant: [] for variant in models}
    for _ in range(rounds):
        for variant, model in models.items():
            recorded: list[float] = []
            trainer = pl.Trainer(
                max_steps=warmup + steps,
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                num_sanity_val_steps=0,
                callbacks=[StepTimer(recorded, True), *callbacks[variant], StepTimer(recorded, False)],
            )
            trainer.fit(model, loader)
            times[variant] += recorded[warmup:]

    n = sum(p.numel() for p in snip._params.values())
    snip_bytes = sum(m.nbytes for m in snip._kept.values())
    mp_targets = modelpruning._parameters_to_prune
    mp_bytes = sum(getattr(module, f"{attr}_mask").nbytes + getattr(module, attr).nbytes for module, attr in mp_targets)
    mp_n = sum(getattr(module, f"{attr}_orig").numel() for module, attr in mp_targets)
    batch = next(iter(loader))
    pass_s = fwd_bwd_time(models["dense"], batch)
    scores = {k: torch.rand_like(p) for k, p in snip._params.items()}
    selection_times = []
    for _ in range(4):  # the first call warms up
        start = time.perf_counter()
        select_masks(scores, SPARSITY)
        selection_times.append(time.perf_counter() - start)
    selection_s = statistics.median(selection_times[1:])
    # time SNIP scoring on a fresh model: the callback reports it, selection included
    fresh, scoring = Module(build(), sequence), SNIPPruning(sparsity=SPARSITY, log_per_layer=False, plot=False)
    timer = {}

    class Capture(pl.loggers.Logger):
        name, version = "capture", 0

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            timer.update(metrics)

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

    pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=Capture(),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[scoring],
    ).fit(fresh, loader)

    def stats(values: list[float]) -> dict[str, float]:
        q = statistics.quantiles(values, n=4)
        return {"median_ms": 1000 * statistics.median(values), "iqr_ms": 1000 * (q[2] - q[0]), "steps": len(values)}

    result = {variant: stats(values) for variant, values in times.items()}
    dense = result["dense"]["median_ms"]
    for variant in result:
        result[variant]["ratio_to_dense"] = result[variant]["median_ms"] / dense
    result["candidate_weights"] = n
    result["snip_bytes_per_weight"] = snip_bytes / n
    result["modelpruning_bytes_per_weight"] = mp_bytes / mp_n
    result["modelpruning_weights"] = mp_n
    result["fwd_bwd_ms"] = 1000 * pass_s
    result["scoring_ms"] = 1000 * timer["snip/scoring_time_s"]
    result["selection_ms"] = 1000 * selection_s
    result["scoring_over_fwd_bwd"] = (timer["snip/scoring_time_s"] - selection_s) / pass_s
    return result


def _cell(result: dict[str, Any], variant: str) -> str:
    s = result[variant]
    return f"{s['median_ms']:.2f} ms ± {s['iqr_ms']:.2f} (x{s['ratio_to_dense']:.3f})"


def table(results: dict[str, dict[str, Any]], threads: int) -> str:
    lines = [
        "| network (batch) | dense step | SNIPPruning step | ModelPruning step"
        " | memory per weight: SNIP / ModelPruning | SNIP scoring (fwd+bwd = 1) |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "lenet300": "LeNet-300-100 (100)",
        "resnet18": "ResNet-18 CIFAR (64)",
        "transformer": "Transformer (32x128)",
    }
    for name, r in results.items():
        lines.append(
            f"| {labels[name]} | {r['dense']['median_ms']:.2f} ms ± {r['dense']['iqr_ms']:.2f} | {_cell(r, 'snip')} |"
            f" {_cell(r, 'modelpruning')} | {r['snip_bytes_per_weight']:.2f} B"
            f" / {r['modelpruning_bytes_per_weight']:.2f} B |"
            f" {r['scoring_over_fwd_bwd']:.2f}x + selection {r['selection_ms']:.0f} ms |"
        )
    steps = ", ".join(f"{labels[name].split(' (')[0]} {r['dense']['steps']}" for name, r in results.items())
    return "\n".join(lines) + (
        f"\n\nMedian step time ± interquartile range over {steps} steps per variant (rounds interleaved, warm-up"
        f" discarded), ratio to dense in parentheses; {threads} threads; sparsity {SPARSITY:.0%}. ModelPruning"
        " prunes the same weights except MultiheadAttention's output projections, which torch.nn.utils.prune"
        " cannot handle (the Transformer then fails on its second backward)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=["lenet300", "resnet18", "transformer"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="measured steps per round (default: 40 LeNet, 5 otherwise)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    results = {}
    for name in args.networks:
        steps = args.steps or (40 if name == "lenet300" else 5)
        results[name] = bench(name, args.rounds, steps, args.warmup)
        print(f"{name}: done", flush=True)
    print(table(results, threads))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
