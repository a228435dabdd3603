"""Masks in checkpoints: resume with the identical mask, weights_only loading, strict loading into a dense model."""

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import BoringClassifier, ZeroInvariantChecker, fit
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_snip import SNIPPruning
from lightning_snip.packing import unpack_mask


class LateRestoreStrategy(SingleDeviceStrategy):
    """Restores checkpoints after `on_fit_start`, as FSDP and DeepSpeed do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def _first_run(tmp_path: Path, **pruning_kwargs: Any) -> tuple[SNIPPruning, Path]:
    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8, **pruning_kwargs)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(BoringClassifier(optimizer="adam", lr=0.05), [pruning, checkpoint], enable_checkpointing=True)
    return pruning, tmp_path / "last.ckpt"


def _no_scoring(*args: Any) -> None:
    raise AssertionError("the resumed run scored again")


@pytest.mark.parametrize("late_restore", [False, True], ids=["ddp-like-restore", "restore-after-setup"])
def test_resume_trains_with_the_identical_mask(tmp_path, monkeypatch, late_restore):
    first, ckpt = _first_run(tmp_path)
    resumed = SNIPPruning(sparsity=0.8)
    monkeypatch.setattr(resumed, "_score", _no_scoring)
    checker = ZeroInvariantChecker(resumed)
    model = BoringClassifier(optimizer="adam", lr=0.05)  # fresh, dense init
    extra = {"strategy": LateRestoreStrategy(torch.device("cpu"))} if late_restore else {}
    trainer = fit(model, [resumed, checker], ckpt_path=str(ckpt), max_epochs=3, **extra)
    assert trainer.current_epoch == 3
    assert first.masks.keys() == resumed.masks.keys()
    assert all(torch.equal(first.masks[n], resumed.masks[n]) for n in first.masks)
    assert checker.batches == 8
    assert checker.violations == [0] * 9


def test_restore_after_setup_without_masks_scores_at_train_start(tmp_path):
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(BoringClassifier(), [checkpoint], enable_checkpointing=True)  # a dense checkpoint
    pruning = SNIPPruning(sparsity=0.8)
    checker = ZeroInvariantChecker(pruning)
    with pytest.warns(UserWarning, match="no `SNIPPruning` masks but weights trained for 4 steps"):
        fit(
            BoringClassifier(),
            [pruning, checker],
            ckpt_path=str(tmp_path / "last.ckpt"),
            max_epochs=2,
            strategy=LateRestoreStrategy(torch.device("cpu")),
        )
    assert len(pruning.masks) == 2
    assert checker.violations == [0] * 5


def test_checkpoint_loads_weights_only_and_into_a_never_pruned_model(tmp_path):
    pruning, ckpt = _first_run(tmp_path)
    checkpoint = torch.load(ckpt, weights_only=True)
    state = checkpoint["callbacks"][pruning.state_key]
    assert state["version"] == 2
    assert state["config"]["sparsity"] == 0.8
    assert set(state["masks"]) == {"net.0.weight", "net.4.weight"}
    masks = {n: unpack_mask(packed, state["shapes"][n]) for n, packed in state["masks"].items()}
    assert all(torch.equal(masks[n], m) for n, m in pruning.masks.items())
    # 1 bit per weight: 512 + 128 weights in 64 + 16 bytes
    assert [p.numel() for p in state["masks"].values()] == [64, 16]
    assert all(p.dtype == torch.uint8 and p.device.type == "cpu" for p in state["masks"].values())
    state["masks"] = masks  # for the checks below

    dense = BoringClassifier()
    assert set(checkpoint["state_dict"]) == set(dense.state_dict())
    dense.load_state_dict(checkpoint["state_dict"], strict=True)
    weight = dense.net[0].weight
    assert torch.equal(weight == 0, ~state["masks"]["net.0.weight"] | (weight == 0))
    assert int((weight == 0).sum()) >= int((~state["masks"]["net.0.weight"]).sum())


def test_state_key_separates_configurations():
    assert SNIPPruning(sparsity=0.9).state_key != SNIPPruning(sparsity=0.95).state_key
    assert SNIPPruning(criterion="random").state_key != SNIPPruning().state_key
    assert SNIPPruning(log_per_layer=False).state_key == SNIPPruning().state_key


def test_state_dict_round_trip_older_format_and_validation():
    pruning = SNIPPruning(sparsity=0.5)
    masks = {"net.0.weight": torch.rand(32, 16) > 0.5, "net.4.weight": torch.rand(4, 33) > 0.5}
    version_1 = {"version": 1, "config": pruning.state_dict()["config"], "masks": masks}
    pruning.load_state_dict(version_1)  # checkpoints written before bit-packing still load
    assert all(torch.equal(pruning.masks[n], m) for n, m in masks.items())
    restored = SNIPPruning(sparsity=0.5)
    restored.load_state_dict(pruning.state_dict())
    assert all(torch.equal(restored.masks[n], m) for n, m in masks.items())
    with pytest.raises(ValueError, match="dict of bool tensors"):
        pruning.load_state_dict({"masks": {"w": torch.ones(2)}})
    with pytest.raises(ValueError, match=r"lacks the 'shapes' of masks \['w'\]"):
        pruning.load_state_dict({"version": 2, "masks": {"w": torch.ones(1, dtype=torch.uint8)}, "shapes": {}})
    with pytest.raises(ValueError, match="needs 2 uint8 bytes, got 1"):
        pruning.load_state_dict({"version": 2, "masks": {"w": torch.ones(1, dtype=torch.uint8)}, "shapes": {"w": [9]}})
    with pytest.raises(ValueError, match="got version 3"):
        pruning.load_state_dict({"version": 3, "masks": {}})
    other = SNIPPruning(sparsity=0.9)
    other.load_state_dict({"config": {"sparsity": 0.5}, "masks": masks})  # said at fit start, with the trainer
    assert other.differing_options() == ["sparsity=0.5 (this instance: 0.9)"]


def test_masks_that_do_not_fit_the_model_are_refused(tmp_path):
    pruning = SNIPPruning(sparsity=0.5)
    pruning.load_state_dict(
        {"masks": {"net.0.weight": torch.ones(3, 3, dtype=torch.bool), "gone.weight": torch.ones(2, dtype=torch.bool)}}
    )
    model = BoringClassifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MisconfigurationException, match=r"missing parameters \['gone.weight'\].*net\.0\.weight"):
        fit(model, [pruning])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weights_only_load_of_the_callback_state_alone(tmp_path):
    pruning = SNIPPruning(sparsity=0.5)
    fit(BoringClassifier(), [pruning])
    path = tmp_path / "state.pt"
    torch.save(pruning.state_dict(), path)
    restored = SNIPPruning(sparsity=0.5)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert all(torch.equal(restored.masks[n], m) for n, m in pruning.masks.items())


def test_pruning_from_a_dense_checkpoint_zeroes_the_restored_momentum_of_pruned_weights(tmp_path):
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(BoringClassifier(optimizer="sgd", lr=0.1, momentum=0.9), [checkpoint], enable_checkpointing=True)
    dense_momentum = torch.load(tmp_path / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    assert all(bool((s["momentum_buffer"] != 0).all()) for s in dense_momentum.values())
    pruning = SNIPPruning(sparsity=0.8)
    checker = ZeroInvariantChecker(pruning)
    model = BoringClassifier(optimizer="sgd", lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="no `SNIPPruning` masks but weights trained for 4 steps"):
        trainer = fit(model, [pruning, checker], ckpt_path=str(tmp_path / "last.ckpt"), max_epochs=2)
    # SGD skips the weight re-zeroing, so a restored momentum would have moved the pruned weights
    assert checker.violations == [0] * 5
    params = dict(model.named_parameters())
    for name, kept in pruning.masks.items():
        momentum = trainer.optimizers[0].state[params[name]]["momentum_buffer"]
        assert momentum[~kept].abs().max() == 0
        assert momentum[kept].abs().max() > 0
