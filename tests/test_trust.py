"""What real projects hit first: resumes with other options, weight norm, reused callbacks, loader workers,
checkpoints written between checks, mixed backwards, failing extras, sparse embeddings, ddp_spawn."""

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import BoringClassifier, ZeroInvariantChecker, fit, make_data
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.data import DataLoader

from lightning_snip import SNIPPruning


def _no_scoring(*args: Any) -> None:
    raise AssertionError("a trained network was scored again")


def _pruned_run(tmp_path: Path, steps: int = 4) -> tuple[SNIPPruning, Path, BoringClassifier]:
    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.9)
    model = BoringClassifier(optimizer="adam", lr=0.05)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(model, [pruning, checkpoint], enable_checkpointing=True, max_steps=steps)
    return pruning, tmp_path / "last.ckpt", model


RESUME_OPTIONS = {
    "num_batches": ({"num_batches": 2}, ["num_batches=1 (this instance: 2)"]),
    "seed": ({"seed": 3}, ["seed=None (this instance: 3)"]),
    "sparsity": ({"sparsity": 0.5}, ["sparsity=0.9 (this instance: 0.5)"]),
    "include-exclude": (
        {"include": ["net.0.weight"], "exclude": ["net.4.*"]},
        ["include=None (this instance: ['net.0.weight'])", "exclude=None (this instance: ['net.4.*'])"],
    ),
}


@pytest.mark.parametrize(("options", "named"), RESUME_OPTIONS.values(), ids=RESUME_OPTIONS.keys())
def test_resume_with_other_options_restores_the_checkpoint_masks_and_says_which_differ(
    tmp_path, monkeypatch, caplog, options, named
):
    first, ckpt, _ = _pruned_run(tmp_path)
    resumed = SNIPPruning(**{"sparsity": 0.9, **options})
    monkeypatch.setattr(resumed, "_score", _no_scoring)
    checker = ZeroInvariantChecker(resumed)
    with pytest.warns(UserWarning, match="masks are restored as they are") as record, caplog.at_level(logging.INFO):
        fit(BoringClassifier(optimizer="adam", lr=0.05), [resumed, checker], ckpt_path=str(ckpt), max_epochs=2)
    ours = [str(w.message) for w in record if "`SNIPPruning`: the checkpoint's masks are restored" in str(w.message)]
    assert len(ours) == 1
    for option in named:
        assert option in ours[0]
    assert all(torch.equal(first.masks[n], m) for n, m in resumed.masks.items())
    assert resumed.masks.keys() == first.masks.keys()
    assert checker.violations == [0] * 5
    restored = "masks restored from the checkpoint, not scored again: 64 of 640 weights kept (90.00% sparsity)"
    assert restored in caplog.text
    # the checkpoint written by the resumed run still names the options the masks were made with
    assert resumed.state_dict()["config"]["sparsity"] == 0.9


def test_a_trained_checkpoint_without_masks_is_not_scored_silently(tmp_path):
    pl.seed_everything(0)
    fit(
        BoringClassifier(),
        [ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        enable_checkpointing=True,
        max_steps=3,
    )
    pruning = SNIPPruning(sparsity=0.8)
    with pytest.warns(UserWarning, match=r"no `SNIPPruning` masks but weights trained for 3 steps.*prunes a trained"):
        fit(BoringClassifier(), [pruning], ckpt_path=str(tmp_path / "last.ckpt"), max_steps=5)
    assert len(pruning.masks) == 2


def test_two_unmatched_states_in_a_checkpoint_are_ambiguous(tmp_path):
    _, ckpt, _ = _pruned_run(tmp_path)
    checkpoint = torch.load(ckpt, weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("SNIPPruning")]
    checkpoint["callbacks"]["SNIPPruning{'other': 1}"] = state
    torch.save(checkpoint, tmp_path / "two.ckpt")
    model = BoringClassifier()
    with pytest.raises(MisconfigurationException, match="masks of 2 `SNIPPruning` callbacks"):
        fit(model, [SNIPPruning(sparsity=0.7)], ckpt_path=str(tmp_path / "two.ckpt"))


class WeightNormed(BoringClassifier):
    def __init__(self, old_api: bool) -> None:
        super().__init__(dropout=0.0)
        norm = torch.nn.utils.weight_norm if old_api else parametrizations.weight_norm
        self.net = nn.Sequential(norm(nn.Linear(16, 64)), nn.ReLU(), norm(nn.Linear(64, 4)))


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("old_api", [False, True], ids=["parametrizations", "old-hook"])
def test_weight_norm_models_keep_training_at_high_sparsity(old_api):
    pl.seed_everything(0)
    model = WeightNormed(old_api)
    pruning = SNIPPruning(sparsity=0.9)
    losses = LossRecorder()
    fit(model, [pruning, losses], max_epochs=3)
    v = "weight_v" if old_api else "parametrizations.weight.original1"
    assert set(pruning.masks) == {f"net.0.{v}", f"net.2.{v}"}  # the gains are never candidates
    for name, mask in pruning.masks.items():
        assert bool(mask.any(dim=1).all()), f"a whole row of {name} was pruned"
    assert sum(int(m.sum()) for m in pruning.masks.values()) == 128  # exact count: 10% of 1024 + 256
    assert all(torch.isfinite(torch.tensor(losses.losses)))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    gain = model.net[0].weight_g if old_api else model.net[0].parametrizations.weight.original0
    assert float(gain.abs().min()) > 0


def test_weight_norm_rows_that_cannot_all_keep_a_weight_are_refused_before_any_change():
    model = WeightNormed(old_api=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"fewer weights than the weight-normalized tensors.*have normed slices"):
        fit(model, [SNIPPruning(sparsity=0.96)])  # keeps 51 of 1280, but 68 rows need one each
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_one_callback_a_new_model_is_scored_and_the_same_model_keeps_its_masks(monkeypatch, caplog):
    pruning = SNIPPruning(sparsity=0.8)
    pl.seed_everything(0)
    first = BoringClassifier()
    fit(first, [pruning])
    first_masks = pruning.masks
    pl.seed_everything(1)
    second = BoringClassifier()  # a seed sweep with one callback list
    with caplog.at_level(logging.INFO):
        fit(second, [pruning])
    assert "a different model from the earlier fit: its masks are dropped, this one is scored" in caplog.text
    assert any(not torch.equal(first_masks[n], m) for n, m in pruning.masks.items())
    # the new masks are the second model's own: the same as a fresh callback's on an identical model
    pl.seed_everything(1)
    reference = SNIPPruning(sparsity=0.8)
    fit(BoringClassifier(), [reference])
    assert all(torch.equal(reference.masks[n], m) for n, m in pruning.masks.items())
    caplog.clear()
    monkeypatch.setattr(pruning, "_score", _no_scoring)
    with caplog.at_level(logging.INFO):
        fit(second, [pruning])  # the same module again: trained on with its masks
    assert "the model of the earlier fit, already pruned" in caplog.text


class BatchRecorder(pl.Callback):
    def __init__(self) -> None:
        self.batches: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch[0][:, 0].tolist())


LOADERS = {
    "workers-0": {"num_workers": 0},
    "workers-1": {"num_workers": 1},
    "persistent-workers": {"num_workers": 1, "persistent_workers": True},
    "own-generator": {"num_workers": 0, "generator": 5},
    "persistent-own-generator": {"num_workers": 1, "persistent_workers": True, "generator": 5},
}


@pytest.mark.parametrize("settings", LOADERS.values(), ids=LOADERS.keys())
def test_training_sees_the_same_batches_with_and_without_the_callback(settings):
    def run(with_pruning: bool) -> list[list[float]]:
        pl.seed_everything(0)
        kwargs = dict(settings)
        if "generator" in kwargs:
            kwargs["generator"] = torch.Generator().manual_seed(kwargs["generator"])
        loader = DataLoader(make_data(64), batch_size=16, shuffle=True, **kwargs)
        recorder = BatchRecorder()
        callbacks: list[pl.Callback] = [recorder] + ([SNIPPruning(sparsity=0.5)] if with_pruning else [])
        fit(BoringClassifier(), callbacks, loader, max_epochs=2)
        return recorder.batches

    dense, pruned = run(False), run(True)
    assert len(dense) == 8
    assert pruned == dense


class Noise(pl.Callback):
    """Writes noise into every weight after every batch, before checkpoints are saved."""

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        with torch.no_grad():
            for p in pl_module.parameters():
                p.add_(0.01)


def test_every_checkpoint_holds_the_zeros(tmp_path):
    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    with pytest.warns(UserWarning, match="non-zero before saving a checkpoint at step 1"):
        fit(BoringClassifier(), [Noise(), pruning, checkpoint], enable_checkpointing=True, log_every_n_steps=50)
    files = sorted(tmp_path.glob("*.ckpt"))
    assert len(files) == 4
    for path in files:
        state = torch.load(path, weights_only=True)["state_dict"]
        for name, kept in pruning.masks.items():
            assert int((state[name][~kept] != 0).sum()) == 0, f"{path.name}: pruned entries of {name} are non-zero"
            assert bool((state[name][kept] != 0).all())


class PlainAndManualBackward(BoringClassifier):
    """Manual optimization: `manual_backward` for the first optimizer, a plain `loss.backward()` for the second."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        first, second = self.optimizers()
        first.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        first.step()
        second.zero_grad()
        nn.functional.cross_entropy(self(x), y).backward()  # bypasses the callback: these gradients are not masked
        second.step()

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.net[:2].parameters(), lr=0.1), torch.optim.SGD(self.net[2:].parameters(), lr=0.1)]


def test_manual_optimization_mixing_plain_and_manual_backward_keeps_every_pruned_weight_zero():
    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8)
    checker = ZeroInvariantChecker(pruning)
    fit(PlainAndManualBackward(), [pruning, checker], max_epochs=2, log_every_n_steps=50)
    assert checker.batches == 8
    assert checker.violations == [0] * 9


def test_a_failing_plot_warns_and_training_goes_on(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the log directory should be")
    pruning = SNIPPruning(sparsity=0.5)
    with pytest.warns(UserWarning, match="sparsity chart could not be saved to .*training goes on"):
        trainer = fit(BoringClassifier(), [pruning], default_root_dir=str(blocker / "logs"))
    assert trainer.global_step == 4
    assert len(pruning.masks) == 2


class SparseEmbedding(BoringClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 16, sparse=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.emb(torch.zeros(len(x), dtype=torch.long)))


@pytest.mark.parametrize("criterion", ["snip", "magnitude"], ids=["snip", "magnitude"])
def test_sparse_embeddings_are_refused_before_any_change(criterion):
    model = SparseEmbedding()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MisconfigurationException, match=r"cannot prune \['emb.weight'\].*sparse=True.*exclude="):
        fit(model, [SNIPPruning(sparsity=0.5, criterion=criterion)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pruning = SNIPPruning(sparsity=0.5, criterion=criterion, exclude=["emb.weight"])  # the fix the error names
    fit(SparseEmbedding(), [pruning])
    assert "emb.weight" not in pruning.masks
