"""A minimal LightningCLI program: an MLP on a synthetic 10-class problem, pruned with SNIP from YAML.

Run:
    python examples/quickstart.py fit --config examples/configs/quickstart_snip.yaml

Any option can be overridden on the command line, for example ``--trainer.max_epochs=5``. To change the callback's
arguments, edit the YAML or pass the whole callback list:
``--trainer.callbacks+=lightning_snip.SNIPPruning --trainer.callbacks.sparsity=0.95``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class BlobsDataModule(pl.LightningDataModule):
    """Gaussian clusters around random class centres: learnable, offline, generated from a fixed seed."""

    def __init__(
        self, features: int = 64, classes: int = 10, samples: int = 4000, batch_size: int = 100, seed: int = 0
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        h = self.hparams
        g = torch.Generator().manual_seed(h.seed)
        centres = torch.randn(h.classes, h.features, generator=g) * 1.5
        labels = torch.randint(0, h.classes, (h.samples,), generator=g)
        points = centres[labels] + torch.randn(h.samples, h.features, generator=g)
        split = int(0.8 * h.samples)
        self.train_set = TensorDataset(points[:split], labels[:split])
        self.val_set = TensorDataset(points[split:], labels[split:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=500)


class MLPClassifier(pl.LightningModule):
    """A 300-100 MLP (the LeNet-300-100 shape) with an SGD optimizer."""

    def __init__(self, features: int = 64, classes: int = 10, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(features, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_error", (logits.argmax(1) != y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main() -> None:
    LightningCLI(MLPClassifier, BlobsDataModule, seed_everything_default=0)


if __name__ == "__main__":
    main()
