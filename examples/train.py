"""Train one of the SNIP paper's networks with LightningCLI, then test it and print test error and sparsity.

python examples/train.py fit --config examples/configs/lenet300_snip.yaml
python examples/train.py fit --config examples/configs/lenet300_snip.yaml --trainer.callbacks.init_args.sparsity=0.95
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the example modules, also when imported from elsewhere

import lightning.pytorch as pl
from classifier import ImageClassifier
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_snip import SNIPPruning, find_candidates, sparsity_report


def summary(trainer: pl.Trainer, model: pl.LightningModule, test_error: float) -> str:
    """One line: the network, the pruning, the test error, and the sparsity measured from the weights."""
    pruning = next((cb for cb in trainer.callbacks if isinstance(cb, SNIPPruning)), None)
    params = dict(model.named_parameters())
    weights = {n: params[n] for n in pruning.masks} if pruning else find_candidates(model)
    rows = sparsity_report(weights)
    kept, total = sum(r.kept for r in rows), sum(r.total for r in rows)
    how = f"{pruning.criterion} pruning at {pruning.sparsity:.0%}" if pruning else "dense"
    source = getattr(trainer.datamodule, "source", "")
    return (
        f"RESULT {model.hparams.get('arch', type(model).__name__)} ({how}): test error {test_error:.2%};"
        f" sparsity {1 - kept / total:.2%} ({kept:,} of {total:,} weights kept)"
        + (f"; data: {source}" if source else "")
    )


class TrainThenTestCLI(LightningCLI):
    """After ``fit``, test the trained model and print a one-line result."""

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        rank_zero_info(summary(self.trainer, self.model, results[0]["test_error"]))


def main(args: list[str] | None = None) -> TrainThenTestCLI:
    """Run the CLI (``args`` replaces ``sys.argv[1:]``, for tests)."""
    return TrainThenTestCLI(
        ImageClassifier, pl.LightningDataModule, subclass_mode_data=True, seed_everything_default=0, args=args
    )


if __name__ == "__main__":
    main()
