"""N:M masks (`scope="N:M"`): N of every M consecutive weights along each candidate's reduction dimension."""

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import BoringClassifier, fit, make_data
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.data import DataLoader

import lightning_snip.selection as masks_module
from lightning_snip import SNIPPruning, select_masks, select_n_m_masks
from lightning_snip.selection import n_m_unfit, parse_n_m


def _reference(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Python loops: in each group, the n largest (as float32), ties to the earlier position."""
    rows = scores.reshape(scores.shape[0], -1) if scores.dim() > 1 else scores.reshape(1, -1)
    kept = torch.zeros(rows.shape, dtype=torch.bool)
    for r in range(rows.shape[0]):
        for g in range(0, rows.shape[1], m):
            group = [(-float(rows[r, g + i].float()), i) for i in range(m)]
            for _, i in sorted(group)[:n]:
                kept[r, g + i] = True
    return kept.view(scores.shape)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8), (1, 2), (4, 16)])
def test_selection_matches_loops_with_many_ties_for_linear_and_conv_shapes(monkeypatch, n, m):
    monkeypatch.setattr(masks_module, "_CHUNK", 64)  # several row chunks per tensor
    g = torch.Generator().manual_seed(n * 100 + m)
    scores = {
        "linear": torch.randint(0, 3, (24, 48), generator=g).float(),  # few distinct values: ties everywhere
        "conv": torch.randint(0, 3, (8, 4, 2, 2), generator=g).double(),  # viewed as (8, 16)
        "bias": torch.randint(0, 3, (32,), generator=g).float(),  # one row
    }
    masks = select_n_m_masks(scores, n, m)
    for name, s in scores.items():
        assert torch.equal(masks[name], _reference(s, n, m)), name
        rows = masks[name].reshape(s.shape[0] if s.dim() > 1 else 1, -1)
        assert bool((rows.view(rows.shape[0], -1, m).sum(-1) == n).all())  # exactly n in every group


def test_hand_worked_groups_and_unfit_tensors():
    scores = {
        "a": torch.tensor([[0.1, 0.4, 0.4, 0.2, 5.0, 0.0, 0.0, 0.0]]),
        "odd": torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]),  # 6 is not a multiple of 4: kept whole
    }
    masks = select_masks(scores, 0.5, scope="2:4")
    assert masks["a"].int().tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]]
    assert bool(masks["odd"].all())
    assert n_m_unfit({name: s.shape for name, s in scores.items()}, 4) == ["odd"]


def test_non_finite_scores_are_refused():
    with pytest.raises(ValueError, match="scores of `w` are not all finite"):
        select_n_m_masks({"w": torch.tensor([[1.0, float("nan"), 0.0, 0.0]])}, 2, 4)


@pytest.mark.parametrize("scope", ["4:2", "two:four", "0:4", "2:2", "2:4:8", "2:", ":4", "-1:4", " 2:4", "2.0:4"])
def test_malformed_scopes_are_refused_in_init(scope):
    with pytest.raises(ValueError, match=rf"`scope` must be 'global', 'layerwise', 'constant_fan_in' .*got {scope!r}"):
        SNIPPruning(sparsity=0.5, scope=scope)


def test_sparsity_must_equal_one_minus_n_over_m():
    with pytest.raises(
        ValueError, match=r"`scope='2:4'` keeps 2 of every 4 weights, so `sparsity` must be 1 - 2/4 = 0.5"
    ):
        SNIPPruning(sparsity=0.9, scope="2:4")
    with pytest.raises(ValueError, match=r"must be 1 - 1/3 = 0.667; got 0.67\."):
        SNIPPruning(sparsity=0.67, scope="1:3")
    assert SNIPPruning(sparsity=1 - 1 / 3, scope="1:3").scope == "1:3"
    for written in (0.667, 0.6667, 0.6666):  # three decimals or more, as the message writes it
        assert SNIPPruning(sparsity=written, scope="1:3").scope == "1:3"
    with pytest.raises(ValueError, match=r"must be 1 - 2/3 = 0.333; got 0.33\."):
        SNIPPruning(sparsity=0.33, scope="2:3")
    assert parse_n_m("2:4") == (2, 4)
    assert parse_n_m("layerwise") is None
    with pytest.raises(ValueError, match="must be 1 - 2/4"):
        select_masks({"w": torch.ones(1, 4)}, 0.6, scope="2:4")


def _assert_n_m(masks: dict[str, torch.Tensor], n: int, m: int) -> None:
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        assert bool((rows.view(rows.shape[0], -1, m).sum(-1) == n).all()), name


@pytest.mark.parametrize("criterion", ["snip", "magnitude", "random"])
def test_the_callback_selects_n_m_masks_with_every_criterion_and_warns_about_unfit_tensors(criterion):
    pl.seed_everything(0)
    model = BoringClassifier(features=18, dropout=0.0)  # net.0.weight is (32, 18): 18 is not a multiple of 4
    pruning = SNIPPruning(sparsity=0.5, scope="2:4", criterion=criterion, plot=False)
    with pytest.warns(UserWarning, match=r"reduction dimension of \['net.0.weight'\] is not a multiple of 4"):
        fit(model, [pruning], DataLoader(make_data(features=18), batch_size=16), max_steps=3)
    masks = pruning.masks
    assert bool(masks["net.0.weight"].all())  # left dense
    _assert_n_m({"net.4.weight": masks["net.4.weight"]}, 2, 4)
    assert not model.net[4].weight[~masks["net.4.weight"]].any()
    if criterion == "magnitude":  # with magnitude, the kept ones are the two largest |w| of each group at init
        pl.seed_everything(0)
        init = BoringClassifier(features=18, dropout=0.0).net[4].weight.detach().abs()
        assert torch.equal(masks["net.4.weight"], _reference(init, 2, 4))


def test_the_logged_sparsity_is_what_was_achieved(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    pl.seed_everything(0)
    model = BoringClassifier(features=18, dropout=0.0)
    pruning = SNIPPruning(sparsity=0.5, scope="2:4", plot=False)
    with pytest.warns(UserWarning, match="stay dense"):
        fit(
            model,
            [pruning],
            DataLoader(make_data(features=18), batch_size=16),
            max_steps=1,
            logger=CSVLogger(tmp_path, name="logs", version=0),
            log_every_n_steps=1,
        )
    import csv

    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as handle:
        logged = [float(r["snip/sparsity"]) for r in csv.DictReader(handle) if r.get("snip/sparsity")]
    achieved = 64 / (32 * 18 + 4 * 32)  # half of net.4.weight's 128 weights; net.0.weight dense
    assert logged
    assert all(math.isclose(v, achieved) for v in logged)


def test_masks_stay_n_m_through_a_checkpoint_resume(tmp_path, monkeypatch):
    pl.seed_everything(0)
    model = BoringClassifier(dropout=0.0, optimizer="adam", lr=0.05)
    first = SNIPPruning(sparsity=0.75, scope="1:4", plot=False)
    fit(model, [first, ModelCheckpoint(dirpath=tmp_path, save_last=True)], enable_checkpointing=True, max_steps=4)
    _assert_n_m(first.masks, 1, 4)
    resumed = SNIPPruning(sparsity=0.75, scope="1:4", plot=False)
    monkeypatch.setattr(resumed, "_score", lambda *a: pytest.fail("a resumed run scored again"))
    model = BoringClassifier(dropout=0.0, optimizer="adam", lr=0.05)
    fit(model, [resumed], ckpt_path=str(tmp_path / "last.ckpt"), max_epochs=3)
    for name, mask in first.masks.items():
        assert torch.equal(resumed.masks[name], mask)
        assert not dict(model.named_parameters())[name][~mask].any()


class ColumnNormed(BoringClassifier):
    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.net = nn.Sequential(parametrizations.weight_norm(nn.Linear(16, 32), dim=1), nn.ReLU(), nn.Linear(32, 4))


def test_weight_norm_across_rows_is_refused_before_any_change():
    model = ColumnNormed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"may prune a whole slice of the weight-normalized tensors"):
        fit(model, [SNIPPruning(sparsity=0.5, scope="2:4", plot=False)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weight_norm_along_rows_trains_with_n_m():
    pl.seed_everything(0)
    model = BoringClassifier(dropout=0.0)
    model.net[0] = parametrizations.weight_norm(nn.Linear(16, 32))
    pruning = SNIPPruning(sparsity=0.5, scope="2:4", plot=False)
    fit(model, [pruning], max_epochs=2)
    _assert_n_m(pruning.masks, 2, 4)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sharded_models_are_refused_at_fit_start_before_any_change(monkeypatch):
    import lightning_snip._lightning as lightning_glue

    monkeypatch.setattr(lightning_glue, "is_sharding", lambda strategy: True)  # what FSDP/fully_shard report
    model = BoringClassifier(dropout=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        MisconfigurationException, match=r"cannot select N:M masks on a sharded model: a shard may split a group"
    ):
        fit(model, [SNIPPruning(sparsity=0.5, scope="2:4", plot=False)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
