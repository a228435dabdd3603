"""Per-step cost of SNIPPruning against dense training and Lightning's ModelPruning, side by side in one process.

For each network, three variants train the same model shape on the same batches with the same thread count:
dense (no callback), SNIPPruning, and ModelPruning (global l1_unstructured at the same sparsity over the same
weights, pruned once at the start of training, kept as masks during training). Rounds interleave the variants
(dense, snip, modelpruning, dense, ...); the first steps of every round are warm-up and discarded.

Two views of the enforcement cost are printed: the end-to-end step-time ratio to dense (what a user sees, but on a
shared CPU its spread can exceed the cost itself), and the time spent inside the mask enforcement during the same
SNIPPruning steps (all of the callback's per-step work), measured in situ, as a share of the dense median step.
Scoring is timed on fresh models, split into selection, batch fetch and the rest, and set against one forward and
backward pass on the same batch, warm and on a fresh model at fit start. It prints Markdown tables and can write JSON.

    python benchmarks/training_overhead.py                     # LeNet-300-100, ResNet-18 (CIFAR), Transformer
    python benchmarks/training_overhead.py --networks lenet300 --rounds 5 --steps 40
    python benchmarks/training_overhead.py --networks lenet300 --user-only --user-logger csv   # with a logger
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from models import lenet_300_100, resnet18_cifar

import lightning_snip.pipeline as snip_pipeline
from lightning_snip import SNIPPruning, find_candidates
from lightning_snip.enforcement import Enforcer, apply_masks_

SPARSITY = 0.9
CHECK_EVERY = 20  # `log_every_n_steps` for every variant: SNIPPruning checks its pruned weights this often
_PER_STEP = ("on_after_backward", "on_train_batch_end")


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


class EnforcementTimer:
    """Adds up, per training step, the time spent in SNIPPruning's per-step work: masking the gradients (in
    ``on_after_backward``), the optimizer post-step hooks (re-zeroing the weights where the step can move
    them), and the batch-end hook (the sparsity log and the check of the pruned weights, every
    ``log_every_n_steps``)."""

    def __init__(self) -> None:
        self.step_start = self.step_total = 0.0
        self.per_step: list[float] = []

    def _timed(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.step_total += time.perf_counter() - start
            return result

        return timed

    def __enter__(self) -> EnforcementTimer:
        self.saved = {name: getattr(SNIPPruning, name) for name in _PER_STEP}
        for name in _PER_STEP:
            setattr(SNIPPruning, name, self._timed(self.saved[name]))
        self.make_hook = make_hook = Enforcer._post_step_hook
        Enforcer._post_step_hook = lambda enforcer, *args: self._timed(make_hook(enforcer, *args))  # type: ignore[method-assign]
        return self

    def __exit__(self, *args: Any) -> None:
        for name, function in self.saved.items():
            setattr(SNIPPruning, name, function)
        Enforcer._post_step_hook = self.make_hook  # type: ignore[method-assign]


class StepTimer(pl.Callback):
    """Two instances bracket every other callback: the first starts the clock, the last stops it (and closes the
    enforcement total of the step)."""

    def __init__(self, times: list[float], start: bool, enforcement: EnforcementTimer) -> None:
        self.times, self.start, self.enforcement = times, start, enforcement

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.start:
            self.enforcement.step_total = 0.0
            self.enforcement.step_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.start:
            self.times.append(time.perf_counter() - self.enforcement.step_start)
            self.enforcement.per_step.append(self.enforcement.step_total)


class SelectionTimer:
    """Times the selection inside the callback's own scoring (the scores it really selects from)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __enter__(self) -> SelectionTimer:
        self.original = original = snip_pipeline.select_masks

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = original(*args, **kwargs)
            self.seconds.append(time.perf_counter() - start)
            return result

        snip_pipeline.select_masks = timed
        return self

    def __exit__(self, *args: Any) -> None:
        snip_pipeline.select_masks = self.original


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


def _stats(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4)
    return {
        "median_ms": 1000 * statistics.median(values),
        "iqr_ms": 1000 * (q[2] - q[0]),
        "mean_ms": 1000 * statistics.fmean(values),
        "steps": len(values),
    }


class _Capture(pl.loggers.Logger):
    """Keeps the metrics the callback logs (its scoring time among them)."""

    name, version = "capture", 0

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


def _quiet_trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def bench_steps(name: str, rounds: int, steps: int, warmup: int) -> dict[str, Any]:
    build, loader, sequence = network(name)
    torch.manual_seed(0)
    models = {variant: Module(build(), sequence) for variant in ("dense", "snip", "modelpruning")}
    for m in models.values():
        m.load_state_dict(models["dense"].state_dict())
    snip = SNIPPruning(sparsity=SPARSITY, log_per_layer=False, plot=False)
    modelpruning = ModelPruningAtStart(_targets(models["modelpruning"]))
    callbacks: dict[str, list[pl.Callback]] = {"dense": [], "snip": [snip], "modelpruning": [modelpruning]}
    times: dict[str, list[float]] = {variant: [] for variant in models}
    enforcement: list[float] = []
    for _ in range(rounds):
        for variant, model in models.items():
            recorded: list[float] = []
            with EnforcementTimer() as timer:
                trainer = _quiet_trainer(
                    max_steps=warmup + steps,
                    logger=False,
                    log_every_n_steps=CHECK_EVERY,
                    callbacks=[
                        StepTimer(recorded, True, timer),
                        *callbacks[variant],
                        StepTimer(recorded, False, timer),
                    ],
                )
                trainer.fit(model, loader)
            times[variant] += recorded[warmup:]
            if variant == "snip":
                enforcement += timer.per_step[warmup:]

    result: dict[str, Any] = {variant: _stats(values) for variant, values in times.items()}
    dense = result["dense"]["median_ms"]
    for variant in times:
        result[variant]["ratio_to_dense"] = result[variant]["median_ms"] / dense
    result["enforcement"] = _stats(enforcement)
    result["enforcement"]["share_of_dense_step"] = result["enforcement"]["median_ms"] / dense
    result["enforcement"]["mean_share_of_dense_step"] = result["enforcement"]["mean_ms"] / dense
    n = sum(p.numel() for p in snip._params.values())
    mp_targets = modelpruning._parameters_to_prune
    mp_bytes = sum(getattr(module, f"{attr}_mask").nbytes + getattr(module, attr).nbytes for module, attr in mp_targets)
    result["candidate_weights"] = n
    result["snip_bytes_per_weight"] = sum(m.nbytes for m in snip._kept.values()) / n
    result["modelpruning_weights"] = mp_n = sum(getattr(module, f"{attr}_orig").numel() for module, attr in mp_targets)
    result["modelpruning_bytes_per_weight"] = mp_bytes / mp_n
    return result


USER_SPARSITY = 0.95
USER_WARMUP = 5  # first steps of every run dropped
USER_PLAN = {"lenet300": (80, 5), "resnet18": (16, 3), "transformer": (16, 3)}  # measured steps, rounds
TARGETS = {"lenet300": 1.05, "resnet18": 1.02}
ARMS = ("dense", "masked", "empty", "snip")


class UserModule(Module):
    """The user's module: SGD with momentum 0.9 and weight decay 5e-4."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


class UserStepTimer(pl.Callback):
    """What a user writes to time their steps: ``perf_counter`` at batch start and at batch end."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.started = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self.started)


class EmptyCallback(pl.Callback):
    """A callback that overrides nothing: what Lightning's dispatch of every hook to any callback costs."""


class HookTimer:
    """Wall time inside every hook Lightning calls on one SNIPPruning instance (the gradient masking is in
    ``on_after_backward``) and inside its optimizer post-step hook, added up per name (``state_key``, read by
    Lightning on every hook call, is a plain attribute)."""

    def __init__(self, callback: SNIPPruning) -> None:
        self.totals: dict[str, float] = {}
        self.callback = callback

    def _timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

        return timed

    def __enter__(self) -> HookTimer:
        for name in dir(pl.Callback):
            if name.startswith("on_") or name in ("setup", "teardown"):
                setattr(self.callback, name, self._timed(name, getattr(self.callback, name)))
        self.make_hook = make_hook = Enforcer._post_step_hook
        timed = self._timed
        Enforcer._post_step_hook = lambda enforcer, *args: timed("optimizer post-step hook", make_hook(enforcer, *args))  # type: ignore[method-assign]
        return self

    def __exit__(self, *args: Any) -> None:
        Enforcer._post_step_hook = self.make_hook  # type: ignore[method-assign]


USER_LOGGERS = ("none", "csv", "tensorboard")


def _logger(kind: str, root: str) -> pl.loggers.Logger | bool:
    """A fresh logger of ``kind`` under ``root`` (a new version folder each fit), or ``False`` for ``none``."""
    if kind == "csv":
        return pl.loggers.CSVLogger(root, name="user")
    if kind == "tensorboard":
        return pl.loggers.TensorBoardLogger(root, name="user")
    if kind == "none":
        return False
    raise ValueError(f"logger={kind!r} is not one of {USER_LOGGERS}")


def _user_fit(
    model: Module, loader: DataLoader, callbacks: list[pl.Callback], steps: int, root: str, logger: str = "none"
) -> list[float]:
    timer = UserStepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=USER_WARMUP + steps,
        logger=_logger(logger, root),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[*callbacks, timer],  # the user's timer last: every hook of the step is inside its window
    )
    trainer.fit(model, loader)
    return timer.times[USER_WARMUP:]


def user_view(name: str, rounds: int, steps: int, root: str, logger: str = "none") -> dict[str, Any]:
    """The user's-eye step-time ratio, four arms alternated in one process: dense; the same network with the same
    95% mask applied once and no callback; dense with a callback that overrides nothing (Lightning's cost of any
    callback); ``SNIPPruning(sparsity=0.95)`` with its defaults. Then the in-situ
    breakdown of the callback's per-step time, from extra SNIPPruning runs with every hook timed. Every fit has a
    fresh logger of kind ``logger`` (``none``, ``csv`` or ``tensorboard``)."""
    build, loader, sequence = network(name)
    torch.manual_seed(0)
    initial = UserModule(build(), sequence).state_dict()

    def fresh() -> Module:
        model = UserModule(build(), sequence)
        model.load_state_dict(initial)
        return model

    probe = SNIPPruning(sparsity=USER_SPARSITY, plot=False)
    _user_fit(fresh(), loader, [probe], 1, root)  # the masks the masked arm applies, and a warm-up
    masks = probe.masks
    medians: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in range(rounds):
        for arm in ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]:  # the order turns every round
            model = fresh()
            if arm == "masked":
                params = dict(model.named_parameters())
                apply_masks_([params[n] for n in masks], masks.values())
            callbacks: list[pl.Callback] = (
                [SNIPPruning(sparsity=USER_SPARSITY)] if arm == "snip" else [EmptyCallback()] if arm == "empty" else []
            )
            medians[arm].append(statistics.median(_user_fit(model, loader, callbacks, steps, root, logger)))
    ratios = {arm: [m / d for m, d in zip(medians[arm], medians["dense"], strict=True)] for arm in ARMS[1:]}
    hooks: dict[str, float] = {}
    measured = 0
    for _ in range(max(1, rounds // 2)):
        callback = SNIPPruning(sparsity=USER_SPARSITY)
        with HookTimer(callback) as timer:
            _user_fit(fresh(), loader, [callback], steps, root, logger)
        for hook, seconds in timer.totals.items():
            if hook not in ("on_fit_start", "on_train_start", "setup", "teardown", "on_train_end", "on_fit_end"):
                hooks[hook] = hooks.get(hook, 0.0) + seconds
        measured += USER_WARMUP + steps
    return {
        "steps": steps,
        "rounds": rounds,
        "logger": logger,
        "dense_ms": 1000 * statistics.median(medians["dense"]),
        "masked_ratio": statistics.median(ratios["masked"]),
        "masked_ratios": ratios["masked"],
        "empty_ratio": statistics.median(ratios["empty"]),
        "empty_ratios": ratios["empty"],
        "snip_ratio": statistics.median(ratios["snip"]),
        "snip_ratios": ratios["snip"],
        "per_step_us": {
            hook: 1e6 * seconds / measured for hook, seconds in sorted(hooks.items(), key=lambda kv: -kv[1])
        },
    }


def user_table(results: dict[str, dict[str, Any]], threads: int) -> str:
    lines = [
        "| network (batch) | dense step | masked once, no callback / dense | an empty callback / dense |"
        " SNIPPruning / dense (rounds) | target |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rounds = ", ".join(f"{x:.3f}" for x in r["snip_ratios"])
        target = f"<= {TARGETS[name]}" if name in TARGETS else "none"
        lines.append(
            f"| {_LABELS[name]} | {r['dense_ms']:.2f} ms | {r['masked_ratio']:.3f} | {r['empty_ratio']:.3f} |"
            f" **{r['snip_ratio']:.3f}**"
            f" ({rounds}) | {target} |"
        )
    lines += ["", "| network | SNIPPruning's own time per step, in situ (µs) |", "|---|---|"]
    for name, r in results.items():
        parts = ", ".join(f"{hook} {us:.0f}" for hook, us in r["per_step_us"].items() if us >= 0.5)
        lines.append(f"| {_LABELS[name].split(' (')[0]} | {sum(r['per_step_us'].values()):.0f}: {parts} |")
    plan = ", ".join(
        f"{_LABELS[n].split(' (')[0]} {r['steps']} steps x {r['rounds']} rounds" for n, r in results.items()
    )
    kinds = sorted({r["logger"] for r in results.values()})
    logged_by = "`logger=False`" if kinds == ["none"] else f"a fresh {'/'.join(kinds)} logger per run"
    return "\n".join(lines) + (
        "\n\nA user's own step timer (a callback reading `time.perf_counter()` in `on_train_batch_start` and"
        " `on_train_batch_end`, placed last), dense, masked-once, empty-callback and `SNIPPruning(sparsity=0.95)`"
        " runs of the same seeded model alternated in one process (the order turns every round), SGD with momentum"
        f" 0.9 and weight decay 5e-4, {logged_by}, no checkpointing, the first {USER_WARMUP} steps of every run"
        f" dropped; ratio of step-time medians per round, median over rounds. {plan}; {threads} threads. In situ:"
        " time inside every hook Lightning calls on the callback (those not due included; the gradient masking is in"
        " `on_after_backward`) and its optimizer post-step hook, from separate timed runs, per step."
    )


def bench_scoring(name: str, repeats: int) -> dict[str, Any]:
    """SNIP scoring on fresh models, as the callback reports it, against one forward and backward on the same batch."""
    build, loader, sequence = network(name)
    scoring: list[float] = []
    selection: list[float] = []
    fresh_pass: list[float] = []
    for seed in range(repeats):
        for probe in (False, True):  # alternate: a scoring fit, then a fit that only runs the fresh-model pass
            torch.manual_seed(seed)
            fresh, logger = Module(build(), sequence), _Capture()
            callback = (
                FreshPass(fresh_pass) if probe else SNIPPruning(sparsity=SPARSITY, log_per_layer=False, plot=False)
            )
            trainer = _quiet_trainer(max_steps=1, logger=logger, callbacks=[callback])
            with SelectionTimer() as timer:
                trainer.fit(fresh, loader)
            if not probe:
                scoring.append(logger.metrics["snip/scoring_time_s"])
                selection += timer.seconds
    fetch = []
    for _ in range(5):
        start = time.perf_counter()
        batch = next(iter(loader))
        fetch.append(time.perf_counter() - start)
    pass_s = fwd_bwd_time(fresh, batch)
    scoring_s, selection_s, fetch_s, fresh_s = (statistics.median(v) for v in (scoring, selection, fetch, fresh_pass))
    return {
        "fwd_bwd_ms": 1000 * pass_s,
        "fresh_fwd_bwd_ms": 1000 * fresh_s,
        "scoring_ms": 1000 * scoring_s,
        "selection_ms": 1000 * selection_s,
        "batch_fetch_ms": 1000 * fetch_s,
        "scorings": repeats,
        "scoring_over_fwd_bwd": (scoring_s - selection_s) / pass_s,
        "scoring_over_fwd_bwd_without_fetch": (scoring_s - selection_s - fetch_s) / pass_s,
        "scoring_over_fresh_fwd_bwd_without_fetch": (scoring_s - selection_s - fetch_s) / fresh_s,
    }


class FreshPass(pl.Callback):
    """Times what scoring cannot avoid, in scoring's own place: one forward and backward of a fresh model on a batch of
    the train dataloader, in ``on_fit_start``, gradients taken for the same candidate weights."""

    def __init__(self, seconds: list[float]) -> None:
        self.seconds = seconds

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, Module)
        trainer.fit_loop.setup_data()
        batch = next(iter(cast(DataLoader, trainer.train_dataloader)))
        weights = list(find_candidates(pl_module).values())
        start = time.perf_counter()
        torch.autograd.grad(pl_module.training_step(batch, 0), weights)
        self.seconds.append(time.perf_counter() - start)


_LABELS = {"lenet300": "LeNet-300-100 (100)", "resnet18": "ResNet-18 CIFAR (64)", "transformer": "Transformer (32x128)"}


def _cell(result: dict[str, Any], variant: str) -> str:
    s = result[variant]
    return f"{s['median_ms']:.2f} ms ± {s['iqr_ms']:.2f} (x{s['ratio_to_dense']:.3f})"


def table(results: dict[str, dict[str, Any]], threads: int) -> str:
    lines = [
        "| network (batch) | dense step | SNIPPruning step | ModelPruning step | SNIP enforcement in situ"
        " | memory per weight: SNIP / ModelPruning |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        e = r["enforcement"]
        lines.append(
            f"| {_LABELS[name]} | {r['dense']['median_ms']:.2f} ms ± {r['dense']['iqr_ms']:.2f} | {_cell(r, 'snip')} |"
            f" {_cell(r, 'modelpruning')} | {1000 * e['median_ms']:.0f} µs ± {1000 * e['iqr_ms']:.0f}"
            f" ({e['share_of_dense_step']:.2%} of dense; mean {e['mean_share_of_dense_step']:.2%})"
            f" | {r['snip_bytes_per_weight']:.2f} B"
            f" / {r['modelpruning_bytes_per_weight']:.2f} B |"
        )
    lines += [
        "",
        "| network (batch) | fwd+bwd: warm / fresh model | SNIP scoring | of which selection | batch fetch"
        " | (scoring - selection) / warm | without the fetch | without the fetch / fresh |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {_LABELS[name]} | {r['fwd_bwd_ms']:.2f} ms / {r['fresh_fwd_bwd_ms']:.2f} ms | {r['scoring_ms']:.2f} ms"
            f" | {r['selection_ms']:.2f} ms | {r['batch_fetch_ms']:.2f} ms | {r['scoring_over_fwd_bwd']:.2f}x"
            f" | {r['scoring_over_fwd_bwd_without_fetch']:.2f}x"
            f" | {r['scoring_over_fresh_fwd_bwd_without_fetch']:.2f}x |"
        )
    steps = ", ".join(f"{_LABELS[name].split(' (')[0]} {r['dense']['steps']}" for name, r in results.items())
    scorings = next(iter(results.values()))["scorings"]
    return "\n".join(lines) + (
        f"\n\nStep times: median ± interquartile range over {steps} steps per variant (rounds interleaved, warm-up"
        " discarded), ratio to dense in parentheses. SNIP enforcement in situ: time inside SNIPPruning's per-step"
        " work (masking the gradients after backward, the post-step hooks, the batch-end sparsity log and check of"
        f" the pruned weights, which runs every {CHECK_EVERY} steps here) per SNIPPruning step, as a share of the"
        " dense median step: median, and mean with the checks spread over the steps. Scoring: medians over"
        f" {scorings} fresh models; fwd+bwd is one forward and backward on the scoring batch, warm (repeated on a"
        " trained model) and on a fresh model in `on_fit_start`, where scoring runs; the fetch is one batch from the"
        f" data loader. {threads} threads; sparsity {SPARSITY:.0%}."
        " ModelPruning prunes the same weights except MultiheadAttention's output projections, which"
        " torch.nn.utils.prune cannot handle (the Transformer then fails on its second backward)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=["lenet300", "resnet18", "transformer"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="measured steps per round (default: 40 LeNet, 5 otherwise)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--scorings", type=int, default=3, help="fresh models scored per network (default: 3)")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--user-only", action="store_true", help="only the user's-eye four-arm measurement (the headline)"
    )
    parser.add_argument(
        "--user-rounds", type=int, help="rounds of the user's-eye measurement (default: 5 LeNet, else 3)"
    )
    parser.add_argument(
        "--user-logger",
        choices=USER_LOGGERS,
        default="none",
        help="the logger of every fit of the user's-eye measurement (default: none, `logger=False`)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    user: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as root:
        for name in args.networks:
            steps, rounds = USER_PLAN[name]
            user[name] = user_view(name, args.user_rounds or rounds, steps, root, args.user_logger)
            print(f"{name}: user's view done", flush=True)
    print(user_table(user, threads), flush=True)
    if args.user_only:
        if args.json:
            args.json.write_text(json.dumps({"user_view": user}, indent=1) + "\n")
        return
    results: dict[str, Any] = {}
    for name in args.networks:
        steps = args.steps or (40 if name == "lenet300" else 5)
        results[name] = {**bench_steps(name, args.rounds, steps, args.warmup), **bench_scoring(name, args.scorings)}
        print(f"{name}: done", flush=True)
    print("\n" + table(results, threads))
    if args.json:
        args.json.write_text(json.dumps({"user_view": user, **results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
