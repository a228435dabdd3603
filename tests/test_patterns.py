"""Scoring in every training pattern: closures, short loaders, forward-less modules, losses without second
derivatives, complex weights, scores beyond float32, and options checked where they are given."""

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import BoringClassifier, fit, make_data
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from lightning_snip import ScoringContext, ScoringError, SNIPPruning, get_criterion, select_masks
from lightning_snip.selection import kept_count

# ------------------------------------------------------------------ manual optimization with a closure


class ClosureModule(BoringClassifier):
    """Lightning's documented closure pattern (the one L-BFGS needs): the loss is backpropagated inside the closure."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__(dropout=0.0)
        self.automatic_optimization = False
        self.closure_optimizer = optimizer
        self.closures_run = 0

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch

        def closure() -> torch.Tensor:
            self.closures_run += 1
            opt.zero_grad()
            loss = nn.functional.cross_entropy(self(x), y)
            self.manual_backward(loss)
            return loss

        opt.step(closure=closure)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.closure_optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=2)
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _automatic_twin(model: ClosureModule) -> BoringClassifier:
    twin = BoringClassifier(dropout=0.0)
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("criterion", ["snip", "iterative_snip", "force", "grasp"])
@pytest.mark.parametrize("optimizer", ["sgd", "lbfgs"])
def test_the_closure_pattern_scores_like_automatic_optimization(criterion, optimizer):
    torch.manual_seed(0)
    model = ClosureModule(optimizer)
    twin = _automatic_twin(model)
    options = {"sparsity": 0.8, "criterion": criterion, "plot": False, "seed": 0}
    if criterion in ("iterative_snip", "force"):
        options["iterations"] = 3
    manual, automatic = SNIPPruning(**options), SNIPPruning(**options)
    before = copy.deepcopy(model.state_dict())
    fit(model, [manual], max_steps=0)
    fit(twin, [automatic], max_steps=0)
    assert model.closures_run >= 1  # the closure ran while scoring ...
    for name, mask in automatic.masks.items():
        assert torch.equal(manual.masks[name], mask), name
        kept = mask.to(before[name].device)
        assert torch.equal(model.state_dict()[name], before[name] * kept)  # ... and no step moved a weight


# ------------------------------------------------------------------ a forward-less module, SynFlow


class NoForward(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.example_input_array = torch.zeros(1, 16)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_synflow_on_a_module_without_forward_is_refused_before_any_change():
    model = NoForward()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(MisconfigurationException, match=r"defines no `forward`.*example_input_array"):
        fit(model, [SNIPPruning(sparsity=0.9, criterion="synflow", plot=False)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    pruning = SNIPPruning(sparsity=0.9, plot=False)  # SNIP scores through `training_step`: fine
    fit(model, [pruning], max_steps=1)
    assert pruning.masks


# ------------------------------------------------------------------ GraSP without second derivatives


class CTCModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch  # (batch, time, features)
        log_probs = self.net(x).log_softmax(-1).transpose(0, 1)  # (time, batch, classes)
        targets = torch.ones(x.shape[0], 3, dtype=torch.long)
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        return nn.functional.ctc_loss(log_probs, targets, lengths, torch.full((x.shape[0],), 3, dtype=torch.long))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_grasp_with_a_loss_without_double_backward_names_what_to_do_and_changes_nothing():
    model = CTCModule()
    before = copy.deepcopy(model.state_dict())
    data = DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 10, 8)), batch_size=4)
    with pytest.raises(ScoringError, match=r"GraSP needs second derivatives.*'snip'.*'synflow'"):
        fit(model, [SNIPPruning(sparsity=0.9, criterion="grasp", temperature=1.0, plot=False)], data)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    pruning = SNIPPruning(sparsity=0.9, plot=False)
    fit(model, [pruning], data, max_steps=1)  # SNIP needs first derivatives only
    assert pruning.masks


# ------------------------------------------------------------------ complex-valued parameters


class WithComplex(BoringClassifier):
    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.spectral = nn.Parameter(torch.randn(4, 16, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + (x.to(torch.complex64) @ self.spectral.T).real


@pytest.mark.parametrize("criterion", ["snip", "iterative_snip", "force", "grasp", "synflow", "magnitude"])
def test_complex_parameters_are_left_out_with_a_warning(criterion):
    torch.manual_seed(0)
    model = WithComplex()
    spectral = model.spectral.detach().clone()
    rounds = 2 if criterion in ("iterative_snip", "force", "synflow") else None
    pruning = SNIPPruning(sparsity=0.5, criterion=criterion, iterations=rounds, min_density=0.1, plot=False)
    with pytest.warns(UserWarning, match=r"\['spectral'\] are complex-valued and are not pruned"):
        fit(model, [pruning], max_steps=1)
    assert set(pruning.masks) == {"net.0.weight", "net.4.weight"}
    assert torch.equal(model.spectral.detach().abs() > 0, spectral.abs() > 0)  # nothing zeroed


def test_complex_parameters_excluded_or_named_explicitly():
    model = WithComplex()
    fit(model, [SNIPPruning(sparsity=0.9, exclude=["spectral"], plot=False)], max_steps=1)  # no warning
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"`include` names `spectral`, a torch.complex64 parameter"):
        fit(model, [SNIPPruning(sparsity=0.9, include=["spectral", "net.0.weight"], plot=False)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ SynFlow beyond float32's range


class DeepChain(pl.LightningModule):
    def __init__(self, depth: int = 12, width: int = 32, scale: float = 100.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.normal_().mul_(scale)
        self.example_input_array = torch.zeros(1, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _synflow_float64(model: DeepChain) -> dict[str, torch.Tensor]:
    """One round of SynFlow written out: |w| in float64, R = sum of the output for an all-ones input, |w * dR/dw|."""
    weights = [layer.weight.detach().double().abs().requires_grad_() for layer in model.layers]
    out = torch.ones(1, 32, dtype=torch.float64)
    for w in weights:
        out = out @ w.T
    grads = torch.autograd.grad(out.sum(), weights)
    return {f"layers.{i}.weight": (g * w).abs().detach() for i, (w, g) in enumerate(zip(weights, grads, strict=True))}


def test_synflow_scores_beyond_float32_are_ranked_in_float64():
    model = DeepChain()
    scores = _synflow_float64(model)
    assert max(float(s.max()) for s in scores.values()) > float(torch.finfo(torch.float32).max)  # float32 overflows
    keep = kept_count(sum(s.numel() for s in scores.values()), 0.5)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]  # a float64 sort
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[order] = True
    pruning = SNIPPruning(sparsity=0.5, criterion="synflow", iterations=1, plot=False)
    fit(model, [pruning], DataLoader(make_data(8, 32), batch_size=4), max_steps=0)
    got = torch.cat([pruning.masks[name].reshape(-1) for name in scores])
    assert torch.equal(got, expected)
    per_layer = [float(pruning.masks[name].float().mean()) for name in scores]
    assert max(per_layer) < 1.0
    assert min(per_layer) > 0.0


def test_float64_scores_are_ranked_by_every_bit():
    base = torch.tensor([1.0, 1.0 + 2**-40, 1.0 + 2**-41, 1.0 - 2**-45], dtype=torch.float64)  # equal in float32
    kept = select_masks({"a": base}, sparsity=0.5)["a"]
    assert kept.tolist() == [False, True, True, False]
    beyond = {"a": base * 1e300, "b": torch.tensor([3e300, 0.5], dtype=torch.float64)}
    masks = select_masks(beyond, sparsity=0.5)
    assert masks["b"].tolist() == [True, False]
    assert masks["a"].tolist() == [False, True, True, False]


def test_synflow_restores_every_module_mode_and_never_leaves_float64_weights():
    model = DeepChain(depth=3, scale=1.0)
    model.train()
    model.layers[1].eval()
    modes = [m.training for m in model.modules()]
    context = ScoringContext(
        dict(model.named_parameters()),
        sparsity=0.5,
        iterations=2,
        module=model,
        example_input=torch.zeros(1, 32),
        select=lambda scores, sparsity: select_masks(scores, sparsity),
    )
    scores = get_criterion("synflow").score(context)
    assert [m.training for m in model.modules()] == modes
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(s.dtype == torch.float64 for s in scores.values())


# ------------------------------------------------------------------ options: resume and __init__


DEFAULTED = {
    "iterations": ({"criterion": "iterative_snip", "iterations": 5}, "iterations=None", "iterations=5"),
    "schedule": ({"criterion": "force", "schedule": "linear"}, "schedule='exponential'", "schedule='linear'"),
    "min_density": ({"min_density": 0.01}, "min_density=0.0", "min_density=0.01"),
    "shuffle": ({"shuffle": True}, "shuffle=False", "shuffle=True"),
}


@pytest.mark.parametrize(("options", "default", "changed"), DEFAULTED.values(), ids=DEFAULTED.keys())
def test_a_resume_names_options_that_differ_from_their_defaults_either_way(options, default, changed):
    criterion = options.get("criterion", "snip")
    plain = SNIPPruning(sparsity=0.9, criterion=criterion)
    special = SNIPPruning(sparsity=0.9, **options)
    special.load_state_dict(plain.state_dict())  # masks made at the default, resumed with the option set
    assert special.differing_options() == [f"{default} (this instance: {changed.split('=', 1)[1]})"]
    plain.load_state_dict(SNIPPruning(sparsity=0.9, **options).state_dict())  # and the other way round
    assert plain.differing_options() == [f"{changed} (this instance: {default.split('=', 1)[1]})"]


def test_min_density_above_one_minus_sparsity_is_refused_in_init():
    with pytest.raises(ValueError, match=r"`min_density=0.2` asks every tensor to keep more than the 1 - sparsity"):
        SNIPPruning(sparsity=0.9, min_density=0.2)
    assert SNIPPruning(sparsity=0.9, min_density=0.1).min_density == 0.1  # exactly the kept fraction is allowed
