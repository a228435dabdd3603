"""Train one of the SNIP paper's networks with LightningCLI, then test it and print test error and sparsity.

python examples/train.py fit --config examples/configs/lenet300_snip.yaml
python examples/train.py fit --config examples/configs/lenet300_snip.yaml --trainer.callbacks.init_args.sparsity=0.95
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the example modules, also when imported from elsewhere

import lightning.pytorch as pl
from classifier import ImageClassifier
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_snip import SNIPPruning, find_candidates, sparsity_report
from lightning_snip.cli import SNIPCLIMixin
from lightning_snip.reporting import PLOT_FILE, output_directory

# harmless on a small CPU machine, and not the example's business
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
warnings.filterwarnings("ignore", ".*treespec.*")  # a deprecation inside Lightning with recent torch


class _NoTips(logging.Filter):
    """Drop Lightning's advertising tip; every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip")


for _name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):  # whichever logs it
    for _handler in logging.getLogger(_name).handlers:
        _handler.addFilter(_NoTips())


class EpochBarOnly(TQDMProgressBar):
    """Lightning's progress bar for training epochs only: no sanity, validation or test bars, which print several
    lines an epoch when the output is not a terminal. Validation error still shows on the epoch bar."""

    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_test_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)


def summary(trainer: pl.Trainer, model: pl.LightningModule, test_error: float) -> str:
    """One line: the network, the pruning, the test error, and the sparsity measured from the weights."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
    pruning = next((cb for cb in callbacks if isinstance(cb, SNIPPruning)), None)
    params = dict(model.named_parameters())
    source = getattr(getattr(trainer, "datamodule", None), "source", "")
    arch = model.hparams.get("arch", type(model).__name__)
    if pruning is not None and pruning.structure == "channel":
        how = f"{pruning.criterion} channel pruning at {pruning.sparsity:.0%}"
        size = f"{sum(p.numel() for p in model.parameters()):,} parameters"
    else:
        weights = {n: params[n] for n in pruning.masks} if pruning else find_candidates(model)
        rows = sparsity_report(weights)
        kept, total = sum(r.kept for r in rows), sum(r.total for r in rows)
        how = f"{pruning.criterion} pruning at {pruning.sparsity:.0%}" if pruning else "dense"
        size = f"sparsity {1 - kept / total:.2%} ({kept:,} of {total:,} weights kept)"
    return f"RESULT {arch} ({how}): test error {test_error:.2%}; {size}" + (f"; data: {source}" if source else "")


def where(trainer: pl.Trainer) -> str:
    """Where this run's logs, metrics, sparsity chart and checkpoints went."""
    lines = []
    for logger in trainer.loggers:
        kind = type(logger).__name__
        lines.append(f"  {kind}: {logger.log_dir}" + (" (metrics.csv)" if kind == "CSVLogger" else ""))
    chart = output_directory(trainer) / PLOT_FILE  # the logger's folder, or snip_logs/version_<n> without one
    if chart.exists():
        lines.append(f"  sparsity chart: {chart}")
    checkpoint = trainer.checkpoint_callback
    lines.append(
        f"  checkpoints: {getattr(checkpoint, 'dirpath', None)}"
        if checkpoint
        else "  checkpoints: none (enable_checkpointing)"
    )
    return "\n".join(["Where things went:", *(lines if trainer.loggers else ["  loggers: none", *lines])])


class TrainThenTestCLI(SNIPCLIMixin, LightningCLI):
    """After ``fit``, test the trained model and print a one-line result, then where the logs and files are.

    Lightning's default progress bar is replaced by :class:`EpochBarOnly` (a progress bar given in the config is kept).
    """

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks = [  # type: ignore[attr-defined]  # set by Lightning's callback connector
            EpochBarOnly() if type(c) is TQDMProgressBar else c
            for c in trainer.callbacks  # type: ignore[attr-defined]
        ]
        return trainer

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        rank_zero_info(summary(self.trainer, self.model, results[0]["test_error"]))
        rank_zero_info(where(self.trainer))


def main(args: list[str] | None = None) -> TrainThenTestCLI:
    """Run the CLI (``args`` replaces ``sys.argv[1:]``, for tests)."""
    return TrainThenTestCLI(
        ImageClassifier, pl.LightningDataModule, subclass_mode_data=True, seed_everything_default=0, args=args
    )


if __name__ == "__main__":
    main()
