"""SNIPPruning inside real Trainer runs: the zero invariant, no-trace scoring, logging, warnings and errors."""

import logging
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import BoringClassifier, ZeroInvariantChecker, fit, make_data
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    XLAStrategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_snip import ScoringError, SNIPPruning
from lightning_snip._lightning import check_strategy as _check_strategy
from lightning_snip.enforcement import MaskSet
from lightning_snip.selection import kept_count


class ManualTwoOptimizers(BoringClassifier):
    """Manual optimization, one optimizer per layer, a scheduler stepped inside training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        first, second = self.optimizers()
        for opt in (first, second):
            self.toggle_optimizer(opt)
            loss = nn.functional.cross_entropy(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            self.untoggle_optimizer(opt)
        self.lr_schedulers().step()
        self.log("loss", loss)

    def configure_optimizers(self) -> Any:
        first = torch.optim.Adam(self.net[:2].parameters(), lr=0.05)
        second = torch.optim.SGD(self.net[2:].parameters(), lr=0.1, momentum=0.9)
        return [first, second], [torch.optim.lr_scheduler.StepLR(first, step_size=1, gamma=0.5)]


INVARIANT_CASES = {
    "sgd-momentum-nesterov-wd": (
        {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        {},
    ),
    "adam": ({"optimizer": "adam", "lr": 0.05}, {}),
    "adamw": ({"optimizer": "adamw", "lr": 0.05, "weight_decay": 0.1}, {}),
    "rmsprop": ({"optimizer": "rmsprop", "lr": 0.01, "centered": True}, {}),
    "accumulate-3": ({"optimizer": "adam", "lr": 0.05}, {"accumulate_grad_batches": 3}),
    "clip-norm": ({"optimizer": "sgd", "lr": 1.0, "momentum": 0.9}, {"gradient_clip_val": 0.1}),
    "clip-value": ({"optimizer": "adam", "lr": 0.05}, {"gradient_clip_val": 0.01, "gradient_clip_algorithm": "value"}),
    "bf16-mixed": ({"optimizer": "adamw", "lr": 0.05}, {"precision": "bf16-mixed"}),
}


@pytest.mark.parametrize(("model_kwargs", "trainer_kwargs"), INVARIANT_CASES.values(), ids=INVARIANT_CASES.keys())
def test_pruned_weights_stay_exactly_zero(model_kwargs, trainer_kwargs):
    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8)
    checker = ZeroInvariantChecker(pruning)
    model = BoringClassifier(**model_kwargs)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, [pruning, checker], max_epochs=2, **trainer_kwargs)
    assert checker.batches == 8
    assert checker.violations == [0] * 9
    total = sum(m.numel() for m in pruning.masks.values())
    assert sum(int(m.sum()) for m in pruning.masks.values()) == kept_count(total, 0.8)
    # the kept weights did train: the run is not trivially frozen
    params = dict(model.named_parameters())
    for name, kept in pruning.masks.items():
        assert int((params[name][kept] != initial[name][kept]).sum()) > 0.75 * int(kept.sum()), name


def test_manual_optimization_with_two_optimizers_and_a_scheduler():
    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.7)
    checker = ZeroInvariantChecker(pruning)
    model = ManualTwoOptimizers()
    trainer = fit(model, [pruning, checker], max_epochs=2)
    assert checker.violations == [0] * 9
    assert len(pruning.masks) == 2
    # scoring stepped neither the optimizers nor the scheduler: 8 batches -> 8 scheduler steps
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 8
    assert trainer.global_step == 16


class Recorder(pl.Callback):
    """Snapshots the model at the end of `on_fit_start` (it runs after SNIPPruning), the RNG at `on_train_start`,
    and every training batch."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.grads = [p.grad for p in pl_module.parameters()]
        self.modes = [m.training for m in pl_module.modules()]
        self.buffers = {k: v.clone() for k, v in pl_module.named_buffers()}

    def on_train_start(self, trainer, pl_module) -> None:
        self.rng = torch.get_rng_state()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch[0][:, 0].tolist())


@pytest.mark.parametrize("criterion", ["snip", "random", "magnitude"], ids=["snip", "random", "magnitude"])
def test_scoring_leaves_no_trace_and_training_sees_the_same_batches(criterion):
    def run(callbacks: list[pl.Callback]) -> tuple[Recorder, BoringClassifier]:
        pl.seed_everything(7)
        model = BoringClassifier()
        model.eval()
        model.net[1].train()  # a mixed-mode model
        before = ([m.training for m in model.modules()], {k: v.clone() for k, v in model.named_buffers()})
        recorder = Recorder()
        loader = DataLoader(make_data(), batch_size=16, shuffle=True)
        fit(model, [*callbacks, recorder], loader, max_epochs=2)
        recorder.before = before
        return recorder, model

    dense, _ = run([])
    pruned, _ = run([SNIPPruning(sparsity=0.5, num_batches=2, criterion=criterion)])
    assert pruned.batches == dense.batches
    assert torch.equal(pruned.rng, dense.rng)
    assert all(g is None for g in pruned.grads)
    assert pruned.modes == pruned.before[0]
    for name, value in pruned.before[1].items():
        assert torch.equal(pruned.buffers[name], value), name


class CapturingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


@pytest.mark.parametrize("log_per_layer", [True, False], ids=["per-layer", "totals-only"])
def test_logging_to_every_logger(log_per_layer, caplog):
    loggers = [CapturingLogger(), CapturingLogger()]
    pruning = SNIPPruning(sparsity=0.75, log_per_layer=log_per_layer)
    with caplog.at_level(logging.INFO):
        fit(BoringClassifier(), [pruning], logger=loggers, log_every_n_steps=2, max_epochs=2)
    for logger in loggers:
        step, first = logger.logged[0]
        assert step == 0
        assert first["snip/sparsity"] == pytest.approx(0.75, abs=1 / 640)
        assert first["snip/total_params"] == 16 * 32 + 32 * 4
        assert first["snip/kept_params"] == kept_count(640, 0.75)
        assert first["snip/scoring_time_s"] > 0
        per_layer = {k for k in first if k.startswith("snip/sparsity/")}
        assert per_layer == ({"snip/sparsity/net.0.weight", "snip/sparsity/net.4.weight"} if log_per_layer else set())
        during = [(s, m["snip/sparsity"]) for s, m in logger.logged[1:] if "snip/sparsity" in m]
        lightning_steps = [s for s, m in logger.logged if "train_loss" in m]  # `self.log` in training_step
        assert lightning_steps == [1, 3, 5, 7]
        assert [s for s, _ in during] == lightning_steps
        assert all(v == pytest.approx(first["snip/sparsity"]) for _, v in during)
    assert "net.0.weight" in caplog.text
    assert "sparsity" in caplog.text


def test_regrowth_would_show_in_the_logged_sparsity():
    class Regrow(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            with torch.no_grad():
                pl_module.net[0].weight.fill_(1.0)  # something outside the callback undoes the mask

    logger = CapturingLogger()
    with pytest.warns(UserWarning, match="non-zero after step 1"):
        fit(
            BoringClassifier(),
            [Regrow(), SNIPPruning(sparsity=0.75)],
            logger=logger,
            log_every_n_steps=1,
            limit_train_batches=1,
        )
    during = [m["snip/sparsity"] for m in [m for _, m in logger.logged if "snip/sparsity" in m][1:]]
    assert during
    assert during[0] < 0.75


def test_second_fit_keeps_masks(monkeypatch):
    pruning = SNIPPruning(sparsity=0.6)
    model = BoringClassifier()
    fit(model, [pruning])
    masks = pruning.masks

    def no_rescoring(*args: Any) -> None:
        raise AssertionError("scored again")

    monkeypatch.setattr(pruning, "_score", no_rescoring)
    checker = ZeroInvariantChecker(pruning)
    fit(model, [pruning, checker])
    assert all(torch.equal(masks[n], m) for n, m in pruning.masks.items())
    assert checker.violations == [0] * 5


def test_layer_collapse_and_zero_scores_warn():
    class Lopsided(BoringClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(3, 3)
            with torch.no_grad():
                self.net[4].weight.mul_(1e-6)

    with pytest.warns(UserWarning, match=r"`net\.4\.weight` \(4, 32\) is pruned entirely"):
        fit(Lopsided(), [SNIPPruning(sparsity=0.5, criterion="magnitude", exclude=["unused.*"])])
    with (
        pytest.warns(UserWarning, match=r"every snip score of `unused\.weight` is zero"),
        pytest.warns(UserWarning, match=r"`unused\.weight` \(3, 3\) is pruned entirely"),
    ):
        fit(Lopsided(), [SNIPPruning(sparsity=0.1)])


BAD_ARGUMENTS = {
    "sparsity-one": ({"sparsity": 1.0}, ValueError, r"`sparsity` must be in \[0, 1\).*got 1\.0"),
    "sparsity-negative": ({"sparsity": -0.1}, ValueError, r"`sparsity` must be in \[0, 1\).*got -0\.1"),
    "sparsity-nan": ({"sparsity": float("nan")}, ValueError, r"`sparsity` must be in \[0, 1\).*got nan"),
    "sparsity-string": ({"sparsity": "0.9"}, TypeError, r"`sparsity` must be a real number.*got '0\.9'"),
    "sparsity-bool": ({"sparsity": True}, TypeError, r"`sparsity` must be a real number.*got True"),
    "num-batches-zero": ({"num_batches": 0}, ValueError, r"`num_batches` must be an integer >= 1, got 0"),
    "num-batches-float": ({"num_batches": 2.0}, ValueError, r"`num_batches` must be an integer >= 1, got 2\.0"),
    "criterion": (
        {"criterion": "prospr"},
        ValueError,
        r"`criterion` must be one of \[.force., .grasp., .iterative_snip., .magnitude., .random., .snip., .synflow.\]",
    ),
    "scope": (
        {"scope": "local"},
        ValueError,
        r"`scope` must be 'global', 'layerwise', 'constant_fan_in' .*got 'local'",
    ),
    "include-string": ({"include": "*.weight"}, TypeError, r"`include` must be a list .* got '\*\.weight'"),
    "exclude-int": ({"exclude": [1]}, TypeError, r"`exclude` must be a list .* got \[1\]"),
    "exclude-empty-pattern": ({"exclude": [""]}, TypeError, r"`exclude` must be a list of non-empty"),
    "log-per-layer": ({"log_per_layer": "yes"}, TypeError, r"`log_per_layer` must be True or False, got 'yes'"),
    "seed": ({"seed": 1.5}, TypeError, r"`seed` must be an integer or None, got 1\.5"),
}


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SNIPPruning(**kwargs)


class ReturnsNone(BoringClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> None:
        super().training_step(batch, batch_idx)


class ReturnsDictWithoutLoss(BoringClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return {"train_loss": super().training_step(batch, batch_idx)}


def _loader(n: int, nan: bool = False) -> DataLoader:
    data = make_data(n)
    x = data.tensors[0].clone()
    if nan:
        x[0, 0] = float("nan")
    return DataLoader(TensorDataset(x, data.tensors[1]), batch_size=16)


FIT_ERRORS = {
    "no-candidate": (BoringClassifier, {"exclude": ["*"]}, None, ValueError, r"No parameter is a pruning candidate"),
    "include-typo": (BoringClassifier, {"include": ["net.9.*"]}, None, ValueError, r"`include` pattern 'net\.9\.\*'"),
    "returns-none": (ReturnsNone, {}, None, ScoringError, r"`training_step` returned NoneType on scoring batch 0"),
    "dict-without-loss": (ReturnsDictWithoutLoss, {}, None, ScoringError, r"dict without a 'loss' key.*train_loss"),
    "non-finite-loss": (BoringClassifier, {}, _loader(32, nan=True), ScoringError, r"scoring batch 0 is nan"),
    "empty-loader": (BoringClassifier, {}, _loader(0), ScoringError, r"a pass over it yielded no batch"),
}


@pytest.mark.parametrize(
    ("model_cls", "kwargs", "loader", "error", "match"), FIT_ERRORS.values(), ids=FIT_ERRORS.keys()
)
def test_fit_start_errors_leave_the_model_untouched(model_cls, kwargs, loader, error, match):
    model = model_cls()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruning = SNIPPruning(sparsity=0.9, **kwargs)
    with pytest.raises(error, match=match):
        fit(model, [pruning], loader)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert pruning.masks == {}


@pytest.mark.parametrize("strategy", [DeepSpeedStrategy, XLAStrategy], ids=["deepspeed", "xla"])
def test_unsupported_strategies_are_refused_with_the_alternatives(strategy):
    name = strategy.__name__
    with pytest.raises(MisconfigurationException, match=rf"does not support `{name}`.*'fsdp'.*fully_shard.*'ddp'"):
        _check_strategy(object.__new__(strategy))  # no accelerator (or deepspeed package) needed to check the type


@pytest.mark.parametrize(
    "strategy", [DDPStrategy, SingleDeviceStrategy, FSDPStrategy, ModelParallelStrategy], ids=lambda s: s.__name__
)
def test_supported_strategies_pass(strategy):
    _check_strategy(object.__new__(strategy))


def test_optimizer_state_never_builds_up_for_pruned_weights():
    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8)
    model = BoringClassifier(optimizer="adam", lr=0.05)
    trainer = fit(model, [pruning], max_epochs=2)
    state = trainer.optimizers[0].state
    params = dict(model.named_parameters())
    for name, kept in pruning.masks.items():
        moments = state[params[name]]
        assert moments["exp_avg"][~kept].abs().max() == 0
        assert moments["exp_avg_sq"][~kept].abs().max() == 0
        assert moments["exp_avg"][kept].abs().max() > 0


class GoldenModule(pl.LightningModule):
    """Two bias-free layers with fixed weights; loss 0.5 * sum(out^2) on one fixed input."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(2, 2, bias=False)
        self.second = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.first.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
            self.second.weight.copy_(torch.tensor([[1.0, 0.25]]))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return 0.5 * (self.second(self.first(batch[0])) ** 2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_golden_masks_through_the_callback():
    # x = [1, 2]; h = W1 x = [-3, 4]; out = W2 h = -3 + 1 = -2; dL/dout = -2.
    # dL/dW2 = -2 * h = [6, -8]            -> |g * w| = [6, 2]
    # dL/dh = -2 * W2 = [-2, -0.5]; dL/dW1 = outer(dL/dh, x) = [[-2, -4], [-0.5, -1]]
    #                                      -> |g * w| = [[2, 8], [1.5, 0.5]]
    # Global, 6 weights, sparsity 0.5 -> keep 3: 8, 6 and one of the two 2s; the tie goes to the earlier tensor.
    loader = DataLoader(TensorDataset(torch.tensor([[1.0, 2.0]])), batch_size=1)
    pruning = SNIPPruning(sparsity=0.5)
    fit(GoldenModule(), [pruning], loader)
    assert pruning.masks["first.weight"].tolist() == [[True, True], [False, False]]
    assert pruning.masks["second.weight"].tolist() == [[True, False]]
    layerwise = SNIPPruning(sparsity=0.5, scope="layerwise")
    fit(GoldenModule(), [layerwise], loader)
    assert layerwise.masks["first.weight"].tolist() == [[True, True], [False, False]]
    assert layerwise.masks["second.weight"].tolist() == [[True, False]]
    # Sparsity 0.34, where the scopes differ. Global: prune round(2.04) = 2 of 6, keep 8, 6, 2, 2.
    # Layerwise: first prunes round(1.36) = 1 of 4 (keeps 8, 2, 1.5); second prunes round(0.68) = 1 of 2 (keeps 6).
    global_ = SNIPPruning(sparsity=0.34)
    fit(GoldenModule(), [global_], loader)
    assert global_.masks["first.weight"].tolist() == [[True, True], [False, False]]
    assert global_.masks["second.weight"].tolist() == [[True, True]]
    layerwise = SNIPPruning(sparsity=0.34, scope="layerwise")
    fit(GoldenModule(), [layerwise], loader)
    assert layerwise.masks["first.weight"].tolist() == [[True, True], [True, False]]
    assert layerwise.masks["second.weight"].tolist() == [[True, False]]


class DriftingSGD(torch.optim.Optimizer):
    """Plain SGD that also moves every weight on every step, pruned or not: not a zero-preserving optimizer."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
                p.add_(0.01)
        return loss


class WithOptimizer(BoringClassifier):
    def __init__(self, make: Any) -> None:
        super().__init__()
        self.make = make

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make(self.parameters())


def _count_weight_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts `MaskSet.zero_` calls on the weights themselves (gradient passes get `.grad` tensors)."""
    passes = [0]
    original = MaskSet.zero_

    def counted(masks: MaskSet, tensors: Any) -> None:
        values = list(tensors)
        passes[0] += any(isinstance(v, nn.Parameter) for v in values)
        original(masks, values)

    monkeypatch.setattr(MaskSet, "zero_", counted)
    return passes


@pytest.mark.parametrize(
    ("make", "weight_passes"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01), 2),
        (lambda p: DriftingSGD(p, lr=0.1), 2 + 4),
    ],
    ids=["sgd-skips-the-weight-pass", "other-optimizer-rezeroes-after-every-step"],
)
def test_weights_are_rezeroed_after_a_step_only_where_it_can_move_them(monkeypatch, make, weight_passes):
    passes = _count_weight_passes(monkeypatch)
    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8)
    checker = ZeroInvariantChecker(pruning)
    fit(WithOptimizer(make), [pruning, checker], log_every_n_steps=1)
    assert checker.batches == 4
    assert checker.violations == [0] * 5
    # zeroing when the masks are made and at train start, then one pass per step only where the step moves zeros
    assert passes[0] == weight_passes
    assert not pruning._enforcer.rezero_every_step


class WriteToPrunedWeights(pl.Callback):
    """Something besides the optimizer writing to every weight of the first layer after one batch."""

    def __init__(self, at_batch: int) -> None:
        self.at_batch = at_batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.at_batch:
            with torch.no_grad():
                pl_module.net[0].weight.add_(1.0)


def test_a_write_to_pruned_weights_is_caught_warned_and_rezeroed_after_every_step_from_then_on(monkeypatch):
    passes = _count_weight_passes(monkeypatch)
    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8)
    checker = ZeroInvariantChecker(pruning)
    warning = r"non-zero after step 2 \(\d+ in `net.0.weight`\).*after every optimizer step"
    with pytest.warns(UserWarning, match=warning):
        fit(BoringClassifier(), [WriteToPrunedWeights(at_batch=1), pruning, checker], log_every_n_steps=2)
    assert checker.violations == [0] * 5  # the check at step 2 ran before the checker saw the write
    assert pruning._enforcer.rezero_every_step
    # made, train start, the check at step 2, then after steps 3 and 4
    assert passes[0] == 2 + 1 + 2


def test_a_write_between_checks_is_caught_at_the_end_of_training():
    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8)
    checker = ZeroInvariantChecker(pruning)
    with pytest.warns(UserWarning, match="non-zero at the end of training"):
        fit(BoringClassifier(), [WriteToPrunedWeights(at_batch=3), pruning, checker], log_every_n_steps=50)
    assert checker.violations[:3] == [0, 0, 0]
    assert checker.violations[3] > 0  # the write stood until the next check
    assert checker.violations[4] == 0  # which zeroed it when training ended


def test_a_write_is_caught_before_validation_sees_it():
    class ValidationChecker(ZeroInvariantChecker):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            self.violations.append(self._count(pl_module))

    class Validated(BoringClassifier):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self(batch[0])

    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8)
    checker = ValidationChecker(pruning)
    with pytest.warns(UserWarning, match="non-zero before validation at step 4"):
        fit(
            Validated(),
            [WriteToPrunedWeights(at_batch=3), pruning, checker],
            val_data=DataLoader(make_data(), batch_size=16),
            log_every_n_steps=50,
        )
    # after batch 3 the write stood (no check at step 4 of 50); validation's 4 batches saw it zeroed
    assert checker.violations[3] > 0
    assert checker.violations[4:8] == [0, 0, 0, 0]


class RawBackward(BoringClassifier):
    """Manual optimization with a plain `loss.backward()`: Lightning runs no `on_after_backward`."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd", lr=0.1, momentum=0.9)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        nn.functional.cross_entropy(self(x), y).backward()
        opt.step()


def test_a_step_on_unmasked_gradients_is_followed_by_the_rezeroing(recwarn):
    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8, criterion="magnitude")  # SNIP needs the loss, which this step does not give
    checker = ZeroInvariantChecker(pruning)
    fit(RawBackward(), [pruning, checker], log_every_n_steps=1)
    assert checker.violations == [0] * 5
    assert not [w for w in recwarn if "non-zero" in str(w.message)]


class GradientSpy(pl.Callback):
    """Counts, in its `on_after_backward`, the pruned gradient entries that are not zero."""

    def __init__(self, pruning: SNIPPruning) -> None:
        self.pruning = pruning
        self.unmasked: list[int] = []

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        self.unmasked.append(sum(int(params[n].grad[~m].count_nonzero()) for n, m in self.pruning.masks.items()))


def test_gradients_are_masked_in_on_after_backward_with_accumulation_and_no_hook_is_left_after():
    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8)
    before, after, checker = GradientSpy(pruning), GradientSpy(pruning), ZeroInvariantChecker(pruning)
    model = BoringClassifier(optimizer="sgd", lr=0.1, momentum=0.9)
    fit(model, [before, pruning, after, checker], accumulate_grad_batches=2)
    assert after.unmasked == [0] * 4  # every backward, accumulated ones included
    assert all(before.unmasked)  # a callback listed before the callback sees the gradients as backward left them
    assert checker.violations == [0] * 5
    assert not pruning._enforcer._handles
    assert not model.trainer.optimizers[0]._optimizer_step_post_hooks
    model.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(4, 16)), torch.tensor([0, 1, 2, 3])).backward()
    assert model.net[0].weight.grad[~pruning.masks["net.0.weight"]].any()  # after fit, gradients are the model's own


class FailsAtBatch(BoringClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_a_failed_fit_leaves_no_hook_behind():
    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8)
    model = FailsAtBatch(optimizer="sgd", lr=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        fit(model, [pruning])
    assert not model.trainer.optimizers[0]._optimizer_step_post_hooks
    model.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(4, 16)), torch.tensor([0, 1, 2, 3])).backward()
    weight, kept = model.net[0].weight, pruning.masks["net.0.weight"]
    assert weight.grad[~kept].any()  # outside training, gradients are the model's own


def test_the_callback_pickles_after_a_fit_for_a_later_spawned_one():
    import pickle

    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8)
    fit(BoringClassifier(), [pruning])
    loaded = pickle.loads(pickle.dumps(pruning))  # what `ddp_spawn` does to the callbacks of the next fit
    assert loaded.masks.keys() == pruning.masks.keys()
    assert all(torch.equal(loaded.masks[n], m) for n, m in pruning.masks.items())
