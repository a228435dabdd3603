"""The same callback under the standalone `pytorch_lightning` package: fit, logging, checkpoints, resume, DDP, CLI."""

from typing import Any

import pytest
import pytorch_lightning as standalone
import torch
from helpers import LeavesTogether, make_data
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_snip import SNIPPruning
from lightning_snip._lightning import check_strategy, namespace
from lightning_snip.selection import kept_count


class StandaloneClassifier(standalone.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class PrunedZeros(standalone.Callback):
    """After every batch: how many pruned weights are non-zero (counted here, independently of the callback)."""

    def __init__(self, pruning: SNIPPruning) -> None:
        self.pruning, self.violations = pruning, []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        params = dict(pl_module.named_parameters())
        self.violations.append(sum(int((params[n][~m] != 0).sum()) for n, m in self.pruning.masks.items()))


def _trainer(tmp_path, callbacks, **kwargs) -> standalone.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        "logger": CSVLogger(tmp_path, name="logs", version=0),
        "log_every_n_steps": 2,
    }
    return standalone.Trainer(callbacks=callbacks, **{**options, **kwargs})


def _no_scoring(*args: Any) -> None:
    raise AssertionError("scored again")


def test_fit_logging_checkpoint_and_resume_with_the_standalone_package(tmp_path, monkeypatch):
    assert isinstance(SNIPPruning(), standalone.Callback)
    standalone.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8)
    zeros = PrunedZeros(pruning)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, [pruning, zeros, checkpoint])
    assert namespace(trainer).__name__ == "pytorch_lightning"
    trainer.fit(StandaloneClassifier(), DataLoader(make_data(64), batch_size=16))
    assert sum(int(m.sum()) for m in pruning.masks.values()) == kept_count(640, 0.8)
    assert zeros.violations == [0] * 4
    rows = (tmp_path / "logs/version_0/metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [dict(zip(header, r.split(","), strict=True)) for r in rows[1:]]
    assert float(logged[0]["snip/sparsity"]) == pytest.approx(0.8, abs=1e-3)
    snip_steps = [int(r["step"]) for r in logged[1:] if r["snip/sparsity"]]
    assert snip_steps == [int(r["step"]) for r in logged if r["train_loss"]] == [1, 3]

    resumed = SNIPPruning(sparsity=0.8)
    monkeypatch.setattr(resumed, "_score", _no_scoring)
    resumed_zeros = PrunedZeros(resumed)
    _trainer(tmp_path, [resumed, resumed_zeros], max_epochs=2).fit(
        StandaloneClassifier(), DataLoader(make_data(64), batch_size=16), ckpt_path=str(tmp_path / "ckpt/last.ckpt")
    )
    assert all(torch.equal(pruning.masks[n], m) for n, m in resumed.masks.items())
    assert resumed_zeros.violations == [0] * 4


def test_unsupported_strategies_of_the_standalone_package_name_only_themselves():
    from pytorch_lightning.strategies import DeepSpeedStrategy, SingleDeviceStrategy, XLAStrategy
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    check_strategy(object.__new__(SingleDeviceStrategy))
    with pytest.raises(MisconfigurationException, match=r"`DeepSpeedStrategy`: DeepSpeed ZeRO") as error:
        check_strategy(object.__new__(DeepSpeedStrategy))
    assert "XLA" not in str(error.value)
    with pytest.raises(MisconfigurationException, match=r"`XLAStrategy`: XLA") as error:
        check_strategy(object.__new__(XLAStrategy))
    assert "DeepSpeed" not in str(error.value)


def test_the_standalone_cli_accepts_the_callback(tmp_path):
    from pytorch_lightning.cli import LightningCLI

    cli = LightningCLI(
        StandaloneClassifier,
        run=False,
        args=[
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks=lightning_snip.SNIPPruning",
            "--trainer.callbacks.sparsity=0.95",
        ],
    )
    (pruning,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, SNIPPruning)]
    assert pruning.sparsity == 0.95


class StandaloneSpawnDDP(LeavesTogether, standalone.strategies.DDPStrategy):
    """The standalone package's ``ddp_spawn`` whose workers leave together (see ``helpers.SpawnDDP``)."""

    def __init__(self) -> None:
        super().__init__(start_method="spawn")


@pytest.mark.slow
def test_ddp_spawn_with_the_standalone_package(tmp_path):
    standalone.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8)
    model = StandaloneClassifier()
    trainer = _trainer(tmp_path, [pruning], strategy=StandaloneSpawnDDP(), devices=2, logger=False)
    trainer.fit(model, DataLoader(make_data(64), batch_size=8))
    masks = pruning.masks  # handed back by the workers
    assert sum(int(m.sum()) for m in masks.values()) == kept_count(640, 0.8)
    params = dict(model.named_parameters())
    assert all(int((params[n][~m] != 0).sum()) == 0 for n, m in masks.items())
