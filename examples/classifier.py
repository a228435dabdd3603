"""An image classifier LightningModule over the paper's networks, trained with SGD as in the SNIP paper."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from models import Arch, build
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier; SGD with momentum, weight decay and step decay of the learning rate.

    Args:
        arch: ``"lenet300"``, ``"lenet5"``, ``"vgg_d"`` or ``"resnet18"``.
        num_classes: Number of classes.
        lr: Initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        lr_milestones: Epochs (or steps, with ``lr_interval="step"``) at which the learning rate is multiplied by
            ``lr_gamma``.
        lr_gamma: Learning-rate decay factor.
        lr_interval: Whether ``lr_milestones`` count epochs or optimizer steps.
    """

    def __init__(
        self,
        arch: Arch = "lenet300",
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_milestones: list[int] | None = None,
        lr_gamma: float = 0.1,
        lr_interval: Literal["epoch", "step"] = "epoch",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build(arch, num_classes)
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_accuracy.update(self(x), y)

    def on_validation_epoch_end(self) -> None:
        self.log("val_error", 1.0 - self.val_accuracy.compute(), prog_bar=True)
        self.val_accuracy.reset()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_accuracy.update(self(x), y)

    def on_test_epoch_end(self) -> None:
        self.log("test_error", 1.0 - self.test_accuracy.compute())
        self.test_accuracy.reset()

    def configure_optimizers(self) -> Any:
        h: Any = self.hparams  # Lightning's AttributeDict: the saved arguments as attributes
        optimizer = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        if not h.lr_milestones:
            return optimizer
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=h.lr_milestones, gamma=h.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": h.lr_interval}}
