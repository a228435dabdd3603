"""SNIP's successors: iterative SNIP, FORCE, SynFlow and GraSP, each against an independent computation."""

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import fit, make_data, reference_top_k
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from lightning_snip import ScoringContext, ScoringError, SNIPPruning, get_criterion, select_masks
from lightning_snip.criteria.rounds import PRUNED
from lightning_snip.selection import kept_count


class TinyNet(pl.LightningModule):
    """Two Tanh layers (non-zero second derivatives, for GraSP); float64 for exact comparisons."""

    def __init__(self, features: int = 6, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))
        self.steps_run = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights stay at initialization: easy to compare


WEIGHTS = ("net.0.weight", "net.2.weight")


def _data(n: int = 32, features: int = 6, classes: int = 3) -> DataLoader:
    return DataLoader(make_data(n, features, classes, dtype=torch.float64), batch_size=4)


def _init_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().double()


def _masks(criterion: str, sparsity: float = 0.8, data: DataLoader | None = None, **options: Any) -> dict:
    model = _init_model()
    pruning = SNIPPruning(sparsity=sparsity, criterion=criterion, plot=False, **options)
    fit(model, [pruning], data if data is not None else _data(), max_steps=1, precision="64-true")
    return pruning.masks


def _top_k(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    return reference_top_k(scores, kept_count(sum(s.numel() for s in scores.values()), sparsity))


def _loss(model: TinyNet, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _batches(data: DataLoader) -> list:
    return list(data)


@pytest.mark.parametrize("criterion", ["iterative_snip", "force"])
def test_one_iteration_is_exactly_snip(criterion):
    snip = _masks("snip", num_batches=2)
    one = _masks(criterion, num_batches=2, iterations=1)
    for name in snip:
        assert torch.equal(snip[name], one[name]), name


@pytest.mark.parametrize(("criterion", "bring_back"), [("iterative_snip", False), ("force", True)])
@pytest.mark.parametrize("schedule", ["exponential", "linear"])
def test_rounds_match_a_hand_written_reference(criterion, bring_back, schedule):
    data, sparsity, rounds = _data(), 0.8, 3
    got = _masks(criterion, sparsity, data, iterations=rounds, schedule=schedule)
    # reference: fresh batch per round, gradient on the masked network, scores |g * w| (masked w for iterative
    # SNIP, dense w for FORCE), pruned weights never kept again unless FORCE, exact global top-k
    model = _init_model()
    weights = {n: dict(model.named_parameters())[n] for n in WEIGHTS}
    dense = {n: w.detach().clone() for n, w in weights.items()}
    batches = _batches(data)
    d = 1 - sparsity
    densities = [d ** (t / rounds) if schedule == "exponential" else 1 - (1 - d) * t / rounds for t in (1, 2, 3)]
    kept = {n: torch.ones_like(w, dtype=torch.bool) for n, w in dense.items()}
    for t in range(rounds):
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(dense[n] * kept[n])
        grads = torch.autograd.grad(_loss(model, batches[t]), list(weights.values()))
        scores = {}
        for (n, w), g in zip(weights.items(), grads, strict=True):
            s = (g * (dense[n] if bring_back else w.detach())).abs()
            scores[n] = s if bring_back or t == 0 else torch.where(kept[n], s, torch.full_like(s, PRUNED))
        kept = _top_k(scores, 1 - densities[t]) if t < rounds - 1 else _top_k(scores, sparsity)
    for name in WEIGHTS:
        assert torch.equal(got[name], kept[name]), name
    assert sum(int(m.sum()) for m in got.values()) == kept_count(8 * 6 + 3 * 8, sparsity)


def test_iterative_snip_never_brings_a_weight_back_and_force_can():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(1, 6, dtype=torch.float64))
    x = torch.randn(5, 6, dtype=torch.float64)
    selections = []

    def select(scores, sparsity):
        selections.append({n: s.clone() for n, s in scores.items()})
        return select_masks(scores, sparsity)

    original = w.detach().clone()
    for name in ("iterative_snip", "force"):
        selections.clear()
        context = ScoringContext(
            {"w": w}, loss_fn=lambda i: torch.tanh(x @ w.T).pow(2).sum() * (i + 1), sparsity=0.5, iterations=3
        )
        context.select = select
        final = get_criterion(name).score(context)["w"]
        first_kept = select_masks(selections[0], 1 - 0.5 ** (1 / 3))["w"]
        pruned_after_first = ~first_kept
        assert pruned_after_first.any()
        if name == "iterative_snip":
            assert bool((final[pruned_after_first] == PRUNED).all())
        else:  # FORCE scores a pruned weight by the dense weight times the masked network's gradient
            assert bool((final[pruned_after_first] > 0).all())
        assert torch.equal(w.detach(), original)  # the rounds masked it in place and restored it


def test_rounds_restore_the_weights_bit_for_bit_even_on_failure():
    model = _init_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def loss_fn(i):
        calls.append(i)
        if i == 2:
            raise RuntimeError("batch 2 is broken")
        return _loss(model, next(iter(_data())))

    weights = {n: dict(model.named_parameters())[n] for n in WEIGHTS}
    context = ScoringContext(weights, loss_fn=loss_fn, sparsity=0.9, iterations=4, select=select_masks)
    with pytest.raises(RuntimeError, match="batch 2 is broken"):
        get_criterion("iterative_snip").score(context)
    assert calls == [0, 1, 2]  # a fresh batch every round
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_synflow_matches_its_definition_and_never_calls_training_step():
    sparsity, rounds = 0.75, 2
    model = _init_model()
    model.example_input_array = torch.zeros(5, 6, dtype=torch.float64)
    pruning = SNIPPruning(sparsity=sparsity, criterion="synflow", iterations=rounds, plot=False)
    fit(model, [pruning], _data(), max_steps=1, precision="64-true")
    assert model.steps_run == 1  # the one training step; scoring ran none
    got = pruning.masks

    ref = _init_model()
    params = {n: p.detach().double().abs() for n, p in ref.named_parameters()}
    kept = {n: torch.ones_like(params[n], dtype=torch.bool) for n in WEIGHTS}
    d = 1 - sparsity
    for t in range(rounds):
        leaves = {n: (params[n] * kept[n] if n in kept else params[n]).requires_grad_() for n in params}
        h = torch.tanh(torch.ones(1, 6, dtype=torch.float64) @ leaves["net.0.weight"].T + leaves["net.0.bias"])
        out = h @ leaves["net.2.weight"].T + leaves["net.2.bias"]
        grads = torch.autograd.grad(out.sum(), [leaves[n] for n in WEIGHTS])
        scores = {n: (g * leaves[n].detach()).abs() for n, g in zip(WEIGHTS, grads, strict=True)}
        if t > 0:
            scores = {n: torch.where(kept[n], s, torch.full_like(s, PRUNED)) for n, s in scores.items()}
        kept = _top_k(scores, 1 - d ** ((t + 1) / rounds)) if t < rounds - 1 else _top_k(scores, sparsity)
    for name in WEIGHTS:
        assert torch.equal(got[name], kept[name]), name


class BatchNormNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_synflow_leaves_no_trace_and_takes_the_input_shape_from_the_first_batch():
    torch.manual_seed(0)
    model = BatchNormNet().double()
    with torch.no_grad():
        model.net[1].running_mean.uniform_(-1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append({k: v.clone() for k, v in pl_module.state_dict().items()})
            seen.append({k: v.dtype for k, v in pl_module.state_dict().items()})
            seen.append(pl_module.training)

    pruning = SNIPPruning(sparsity=0.5, criterion="synflow", iterations=3, plot=False)
    fit(model, [pruning, Spy()], _data(), max_steps=1, precision="64-true")
    state, dtypes, training = seen
    assert training
    assert all(dtypes[k] == v.dtype for k, v in before.items())
    masks = pruning.masks
    for k, v in before.items():
        expected = v * masks[k] if k in masks else v  # only the pruned entries changed, to zero
        assert torch.equal(state[k], expected), k


def test_synflow_refuses_an_input_that_is_not_a_float_tensor():
    class Tokens(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.example_input_array = torch.zeros(2, 6, dtype=torch.long)

    model = Tokens().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ScoringError, match=r"`example_input_array` gives torch.int64.*float tensor"):
        fit(model, [SNIPPruning(sparsity=0.5, criterion="synflow", plot=False)], _data(), precision="64-true")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("temperature", "linear_reinit"), [(None, None), (None, False), (1.0, False), (7.0, True)])
def test_grasp_is_w_times_the_hessian_gradient_product(temperature, linear_reinit):
    """GraSP against a hand-written one by full Jacobian and Hessian, with the logits divided by T (None: 200).

    With the Linear weights redrawn (the default), the reference scores a copy whose Linear weights are Xavier-normal
    draws, ``N(0, 2 / (fan_in + fan_out))`` from a CPU generator seeded with ``seed``, layer by layer.
    """
    data = _data()
    before = {n: p.detach().clone() for n, p in _init_model().named_parameters()}
    model = _init_model()
    pruning = SNIPPruning(
        sparsity=0.7,
        criterion="grasp",
        num_batches=2,
        seed=11,
        temperature=temperature,
        linear_reinit=linear_reinit,
        plot=False,
    )
    fit(model, [pruning], data, max_steps=1, precision="64-true")
    got = pruning.masks
    for name, param in model.named_parameters():  # the model trains its own weights, never the draws
        kept = got[name] if name in got else torch.ones_like(param, dtype=torch.bool)
        assert torch.equal(param.detach()[kept], before[name][kept]), name
    divisor = 200.0 if temperature is None else temperature
    model = _init_model()
    if linear_reinit is not False:
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for layer in (model.net[0], model.net[2]):
                fan_out, fan_in = layer.weight.shape
                std = (2.0 / (fan_in + fan_out)) ** 0.5
                layer.weight.copy_((torch.randn(fan_out, fan_in, generator=generator) * std).double())
    batches = _batches(data)[:2]
    names = list(WEIGHTS)
    params = dict(model.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def loss_of(vector: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, torch.split(vector, sizes), strict=True))
        state = {n: (parts[n].view(params[n].shape) if n in parts else p) for n, p in params.items()}
        total = torch.zeros((), dtype=torch.float64)
        for x, y in batches:
            out = torch.func.functional_call(model, state, (x,))
            total = total + nn.functional.cross_entropy(out / divisor, y)
        return total / len(batches)

    g = torch.autograd.functional.jacobian(loss_of, flat)
    hessian = torch.autograd.functional.hessian(loss_of, flat)
    importance = flat * (hessian @ g)  # GraSP's score negated: the highest is kept
    parts = torch.split(importance, sizes)
    scores = {n: part.view(params[n].shape) for n, part in zip(names, parts, strict=True)}
    assert any(bool((s < 0).any()) for s in scores.values())  # signed scores, not absolute values
    expected = _top_k(scores, 0.7)
    for name in names:
        assert torch.equal(got[name], expected[name]), name


def test_the_temperature_changes_grasps_masks():
    data = _data()
    plain = _masks("grasp", 0.7, data, temperature=1.0, linear_reinit=False)
    default = _masks("grasp", 0.7, data, linear_reinit=False)  # T=200 by default
    assert any(not torch.equal(plain[name], default[name]) for name in plain)


def test_redrawn_linear_weights_change_grasps_masks_and_follow_the_seed():
    data = _data()
    own = _masks("grasp", 0.7, data, linear_reinit=False)
    drawn, again, other = (_masks("grasp", 0.7, data, seed=seed) for seed in (3, 3, 4))
    assert any(not torch.equal(own[name], drawn[name]) for name in own)
    assert all(torch.equal(drawn[name], again[name]) for name in own)  # same seed, same draws, same masks
    assert any(not torch.equal(drawn[name], other[name]) for name in own)


def test_xavier_draws_have_the_xavier_spread_and_skip_what_is_not_a_plain_linear_weight():
    from lightning_snip.criteria.grasp import xavier_linear_weights

    wide = nn.Linear(800, 500)
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(wide, normed, conv, nn.Sequential(wide))  # `wide` shared: drawn once
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with xavier_linear_weights(model, torch.Generator().manual_seed(0)) as names:
        assert names == ["0.weight"]
        std = float(wide.weight.std())
        assert abs(std / (2.0 / 1300) ** 0.5 - 1) < 0.01  # 400,000 draws: the spread is within 1%
        assert abs(float(wide.weight.mean())) < 1e-3
        assert torch.equal(conv.weight, before["2.weight"])
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


class LayersInTrainingStep(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)  # not through `forward`: a hook there never runs


class DictOutput(TinyNet):
    def forward(self, x: torch.Tensor) -> Any:
        return {"logits": self.net(x)}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x)["logits"], y)


@pytest.mark.parametrize(
    ("model_class", "message"),
    [
        (LayersInTrainingStep, r"temperature \(T=200\) divides the output .* the loss never went through it"),
        (DictOutput, r"temperature \(T=200\) divides the logits, but `DictOutput`'s forward returned a dict"),
    ],
)
def test_grasps_temperature_is_refused_where_it_cannot_divide_the_logits(model_class, message):
    torch.manual_seed(0)
    model = model_class().double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruning = SNIPPruning(sparsity=0.5, criterion="grasp", plot=False)
    with pytest.raises(ScoringError, match=message):
        fit(model, [pruning], _data(), max_steps=1, precision="64-true")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # untouched
    assert not model._forward_hooks  # the hook is gone
    fit(model, [SNIPPruning(sparsity=0.5, criterion="grasp", temperature=1.0, plot=False)], _data(), max_steps=1)


ARGUMENTS = {
    "temperature-snip": ({"criterion": "snip", "temperature": 200}, r"but `criterion='snip'` takes no temperature"),
    "temperature-zero": ({"criterion": "grasp", "temperature": 0}, r"`temperature` must be a positive number"),
    "temperature-text": ({"criterion": "grasp", "temperature": "hot"}, r"`temperature` must be a positive number"),
    "reinit-snip": ({"criterion": "snip", "linear_reinit": True}, r"but `criterion='snip'` does not take it"),
    "reinit-text": ({"criterion": "grasp", "linear_reinit": "yes"}, r"`linear_reinit` must be True, False or None"),
    "iterations-one-shot": ({"criterion": "snip", "iterations": 5}, r"`iterations=5` but `criterion='snip'`"),
    "iterations-grasp": ({"criterion": "grasp", "iterations": 2}, r"`criterion='grasp'` scores in one pass"),
    "iterations-zero": ({"criterion": "force", "iterations": 0}, r"`iterations` must be an integer >= 1 or None"),
    "iterations-float": ({"criterion": "force", "iterations": 2.0}, r"`iterations` must be an integer >= 1 or None"),
    "schedule": ({"criterion": "force", "schedule": "cosine"}, r"`schedule` must be 'exponential' or 'linear'"),
}


@pytest.mark.parametrize(("options", "message"), ARGUMENTS.values(), ids=ARGUMENTS.keys())
def test_bad_arguments_are_refused_in_init(options, message):
    with pytest.raises((TypeError, ValueError), match=message):
        SNIPPruning(**options)


def test_one_iteration_of_a_one_shot_criterion_is_accepted():
    assert SNIPPruning(criterion="snip", iterations=1).iterations == 1


@pytest.mark.parametrize(("criterion", "bring_back"), [("iterative_snip", False), ("force", True)])
def test_rounds_past_the_end_of_the_loader_continue_with_a_fresh_pass(criterion, bring_back):
    data, sparsity, rounds = _data(n=12), 0.8, 5  # 3 batches per pass, 5 rounds: batches 0 1 2 0 1
    got = _masks(criterion, sparsity, data, iterations=rounds)
    model = _init_model()
    weights = {n: dict(model.named_parameters())[n] for n in WEIGHTS}
    dense = {n: w.detach().clone() for n, w in weights.items()}
    batches = _batches(data)
    d = 1 - sparsity
    kept = {n: torch.ones_like(w, dtype=torch.bool) for n, w in dense.items()}
    for t in range(rounds):
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(dense[n] * kept[n])
        grads = torch.autograd.grad(_loss(model, batches[t % len(batches)]), list(weights.values()))
        scores = {}
        for (n, w), g in zip(weights.items(), grads, strict=True):
            s = (g * (dense[n] if bring_back else w.detach())).abs()
            scores[n] = s if bring_back or t == 0 else torch.where(kept[n], s, torch.full_like(s, PRUNED))
        kept = _top_k(scores, 1 - d ** ((t + 1) / rounds))
    for name in WEIGHTS:
        assert torch.equal(got[name], kept[name]), name


def test_the_default_60_rounds_run_on_a_short_loader():
    pruning = SNIPPruning(sparsity=0.9, criterion="iterative_snip", plot=False)
    model = _init_model()
    fit(model, [pruning], _data(n=8), max_steps=1, precision="64-true")  # 2 batches per pass, 60 rounds
    assert model.steps_run == 60 + 1  # every round scored one batch; then one training step
    assert sum(int(m.sum()) for m in pruning.masks.values()) == kept_count(8 * 6 + 3 * 8, 0.9)


def test_an_empty_loader_is_an_error_before_any_work_and_the_model_is_untouched():
    model = _init_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruning = SNIPPruning(sparsity=0.9, criterion="iterative_snip", iterations=20, plot=False)
    with pytest.raises(ScoringError, match=r"a pass over it yielded no batch"):
        fit(model, [pruning], DataLoader(make_data(0, 6, 3, dtype=torch.float64), batch_size=4), precision="64-true")
    assert model.steps_run == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("criterion", ["iterative_snip", "force", "synflow", "grasp"])
def test_sharded_models_are_refused_before_any_change(monkeypatch, criterion):
    import lightning_snip._lightning as lightning_glue

    monkeypatch.setattr(lightning_glue, "is_sharding", lambda strategy: True)
    model = _init_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MisconfigurationException, match=rf"`criterion='{criterion}'` does not score sharded models"):
        fit(model, [SNIPPruning(sparsity=0.5, criterion=criterion, plot=False)], _data(), precision="64-true")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("criterion", ["iterative_snip", "force", "synflow", "grasp"])
def test_layerwise_and_resume_keep_their_guarantees(tmp_path, criterion):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = _init_model()
    model.example_input_array = torch.zeros(1, 6, dtype=torch.float64)
    options = {"iterations": 3} if criterion != "grasp" else {}
    first = SNIPPruning(sparsity=0.75, criterion=criterion, scope="layerwise", plot=False, **options)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(model, [first, checkpoint], _data(), max_steps=2, precision="64-true", enable_checkpointing=True)
    for name, mask in first.masks.items():
        assert int(mask.sum()) == kept_count(mask.numel(), 0.75), name  # the exact count, tensor by tensor
    resumed = SNIPPruning(sparsity=0.75, criterion=criterion, scope="layerwise", plot=False, **options)
    resumed._score = lambda *a: pytest.fail("a resumed run scored again")  # type: ignore[method-assign]
    fit(_init_model(), [resumed], _data(), max_epochs=2, ckpt_path=str(tmp_path / "last.ckpt"), precision="64-true")
    for name, mask in first.masks.items():
        assert torch.equal(resumed.masks[name], mask)


def test_iterative_rounds_under_n_m_end_in_n_m_masks():
    torch.manual_seed(0)
    model = TinyNet(features=8).double()
    pruning = SNIPPruning(sparsity=0.5, criterion="iterative_snip", scope="2:4", iterations=3, plot=False)
    fit(model, [pruning], _data(features=8), max_steps=1, precision="64-true")
    masks = pruning.masks
    assert set(masks) == set(WEIGHTS)
    for name, mask in masks.items():
        assert bool((mask.view(mask.shape[0], -1, 4).sum(-1) == 2).all()), name


def test_min_density_takes_each_tensors_floor_from_the_global_budget():
    scores = {"a": torch.tensor([10.0, 9.0, 8.0, 7.0]), "b": torch.tensor([1.0, 0.5, 0.2, 0.1])}
    assert select_masks(scores, 0.5)["b"].tolist() == [False] * 4  # b collapses
    kept = select_masks(scores, 0.5, min_density=0.5)
    assert kept["a"].tolist() == [True, True, False, False]
    assert kept["b"].tolist() == [True, True, False, False]  # its best two, the floor
    kept = select_masks(scores, 0.5, min_density=0.2)  # ceil(0.8) = 1 weight of b, the rest by score
    assert kept["a"].tolist() == [True, True, True, False]
    assert kept["b"].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match=r"`min_density=0.6` asks every tensor to keep more than the 1 - sparsity"):
        select_masks(scores, 0.5, min_density=0.6)
    rounded_up = {"a": torch.ones(4), "b": torch.ones(1), "c": torch.ones(1)}  # ceil(2) + ceil(0.5) + ceil(0.5)
    with pytest.raises(ValueError, match=r"`min_density=0.5` needs 4 weights .* keeps only 3"):
        select_masks(rounded_up, 0.5, min_density=0.5)


MIN_DENSITY_ERRORS = {
    "layerwise": ({"sparsity": 0.9, "scope": "layerwise", "min_density": 0.2}, r"more than the 0.1 of each tensor"),
    "n-m": ({"sparsity": 0.5, "scope": "2:4", "min_density": 0.6}, r"more than the 0.5 of each tensor"),
    "range": ({"min_density": 1.5}, r"`min_density` must be in \[0, 1\]"),
    "shuffle-n-m": ({"sparsity": 0.5, "scope": "2:4", "shuffle": True}, r"`shuffle=True` would break the row pattern"),
}


@pytest.mark.parametrize(("options", "message"), MIN_DENSITY_ERRORS.values(), ids=MIN_DENSITY_ERRORS.keys())
def test_impossible_min_density_and_shuffle_combinations_are_refused_in_init(options, message):
    with pytest.raises(ValueError, match=message):
        SNIPPruning(**options)


class Lopsided(TinyNet):
    """A first layer whose weights are a thousand times smaller: SNIP prunes it entirely at high sparsity."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.net[0].weight.mul_(1e-3)


def test_min_density_keeps_a_collapsing_layer_alive_with_the_exact_total():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"`net.0.weight` \(8, 6\) is pruned entirely"):
        fit(Lopsided().double(), [SNIPPruning(sparsity=0.9, plot=False)], _data(), max_steps=1, precision="64-true")
    torch.manual_seed(0)
    model = Lopsided().double()
    pruning = SNIPPruning(sparsity=0.9, min_density=0.05, plot=False)
    fit(model, [pruning], _data(), max_steps=1, precision="64-true")
    masks = pruning.masks
    assert int(masks["net.0.weight"].sum()) == 3  # ceil(0.05 * 48)
    assert sum(int(m.sum()) for m in masks.values()) == kept_count(48 + 24, 0.9)


def test_shuffle_keeps_each_count_moves_the_weights_and_follows_the_seed():
    plain = _masks("snip", 0.7)
    first = _masks("snip", 0.7, shuffle=True, seed=5)
    again = _masks("snip", 0.7, shuffle=True, seed=5)
    other = _masks("snip", 0.7, shuffle=True, seed=6)
    for name in WEIGHTS:
        assert int(first[name].sum()) == int(plain[name].sum()), name
        assert torch.equal(first[name], again[name]), name
    assert any(not torch.equal(first[n], plain[n]) for n in WEIGHTS)
    assert any(not torch.equal(first[n], other[n]) for n in WEIGHTS)


def test_shuffle_that_empties_a_weight_norm_slice_is_refused_before_any_change():
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = TinyNet(features=16, hidden=64).double()
    model.net[0] = parametrizations.weight_norm(model.net[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruning = SNIPPruning(sparsity=0.9, shuffle=True, seed=0, plot=False)
    with pytest.raises(ScoringError, match=r"`shuffle=True` left a normed slice of the weight-normalized"):
        fit(model, [pruning], _data(features=16), precision="64-true")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("options", [{"min_density": 0.01}, {"shuffle": True}], ids=["min-density", "shuffle"])
def test_min_density_and_shuffle_are_refused_on_sharded_models(monkeypatch, options):
    import lightning_snip._lightning as lightning_glue

    monkeypatch.setattr(lightning_glue, "is_sharding", lambda strategy: True)
    with pytest.raises(MisconfigurationException, match=r"`min_density` and `shuffle` need the whole masks"):
        fit(_init_model(), [SNIPPruning(sparsity=0.5, plot=False, **options)], _data(), precision="64-true")


def _official_force_rounds(
    model: nn.Module, names: list[str], batches: list, keep_fraction: float, rounds: int
) -> list[dict[str, torch.Tensor]]:
    """FORCE as its official code runs it (`iterative_pruning` with `prune_method=3`, `mode='exp'`), one batch a
    round: each round starts again from the dense network, zeroes the pruned weights (gradients not blocked), takes
    the gradient there and scores every weight, pruned or not, by |dense weight * gradient|; it keeps the top
    `keep_fraction ** ((t + 1) / rounds)` of all weights. Written from the published algorithm, independently of the
    package. Returns each round's mask."""
    import copy
    import math

    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    total = sum(dense[n].numel() for n in names)
    masks: list[dict[str, torch.Tensor]] = []
    for t in range(rounds):
        net = copy.deepcopy(model)
        params = dict(net.named_parameters())
        with torch.no_grad():
            for n in names:
                if masks:
                    params[n].mul_(masks[-1][n])
        x, y = batches[t]
        loss = nn.functional.cross_entropy(net(x), y)
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        saliency = {n: (dense[n] * g).abs() for n, g in zip(names, grads, strict=True)}
        density = math.exp(-(t + 1) * -math.log(keep_fraction) / rounds)
        # the official code keeps int(total * density); the package prunes exactly round((1 - density) * total), which
        # can keep one more: the one documented difference, so the reference counts as the package does
        keep = total - round((1 - density) * total)
        threshold = torch.topk(torch.cat([saliency[n].flatten() for n in names]), keep).values[-1]
        masks.append({n: saliency[n] >= threshold for n in names})
    return masks


def test_force_equals_the_official_algorithm_round_by_round():
    torch.manual_seed(3)
    model = TinyNet(features=6, hidden=16, classes=3).double()
    names = list(WEIGHTS)
    rounds, keep_fraction = 6, 0.1
    batches = [(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(rounds)]
    reference = _official_force_rounds(model, names, batches, keep_fraction, rounds)

    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    chosen: list[dict[str, torch.Tensor]] = []

    def select(scores, sparsity):
        masks = select_masks(scores, sparsity)
        chosen.append(masks)
        return masks

    context = ScoringContext(
        weights={n: params[n] for n in names},
        loss_fn=lambda i: nn.functional.cross_entropy(model(batches[i][0]), batches[i][1]),
        sparsity=1 - keep_fraction,
        iterations=rounds,
        select=select,
        module=model,
    )
    scores = get_criterion("force").score(context)
    chosen.append(select_masks(scores, 1 - keep_fraction))  # the caller's final selection
    assert len(chosen) == rounds
    for t, (mine, theirs) in enumerate(zip(chosen, reference, strict=True)):
        for n in names:
            assert torch.equal(mine[n], theirs[n]), f"round {t}, {n}"
    came_back = sum(int((reference[t + 1][n] & ~reference[t][n]).sum()) for t in range(rounds - 1) for n in names)
    assert came_back > 0  # weights pruned in a round do come back: the reference exercises FORCE's defining step
    assert all(torch.equal(p, before[n]) for n, p in params.items())  # the weights are restored
