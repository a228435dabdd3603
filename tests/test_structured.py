"""`structure='channel'`: channel groups traced, scored as sums of per-weight scores, removed physically; the shrunk
network computes what the dense one computes with those channels zeroed; resumes and reloads never re-score."""

import copy
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch_pruning as tp
import torchvision
from helpers import BoringClassifier, FixedOrder, ddp_channel_rank_main, fit, free_port, make_data, spawn_and_wait
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_snip import SNIPPruning, find_candidates, restore_structure
from lightning_snip.selection import kept_count
from lightning_snip.structured import (
    SizeCounter,
    UntraceableError,
    count_weight_macs,
    group_scores,
    select_channels,
    select_channels_within,
    shrink,
    trace_channel_groups,
)

# ------------------------------------------------------------------ models


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def lenet5() -> nn.Module:  # Caffe's LeNet-5, as the examples build it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from models import lenet_5_caffe

    return lenet_5_caffe()


class Concat(nn.Module):
    """Two branches concatenated along the channels, then a 1x1 convolution and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.mix = nn.Conv2d(14, 10, 1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mix(torch.cat([self.a(x), self.b(x)], 1)).relu().mean((2, 3)))


def mobilenet_block() -> nn.Module:
    """A MobileNetV2 inverted residual (expand 1x1, depthwise 3x3, project 1x1, residual sum) and a classifier."""
    block = torchvision.models.mobilenetv2.InvertedResidual(16, 16, stride=1, expand_ratio=6)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        block,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


MODELS = {
    "mlp": (mlp, (2, 8)),
    "lenet5-caffe": (lenet5, (2, 1, 28, 28)),
    "resnet18": (resnet18, (2, 3, 32, 32)),
    "concat": (Concat, (2, 3, 8, 8)),
    "mobilenetv2-block": (mobilenet_block, (2, 3, 8, 8)),
}


def _warm(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Running statistics from a few batches, so eval-mode outputs are not vanishingly small."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape[1:]))
    return model.eval()


def _zero_removed(dense: nn.Module, x: torch.Tensor, kept: dict[str, torch.Tensor]) -> None:
    """Zero, in the dense model, every parameter slice that writes to or reads from a removed channel.

    The slices come from Torch-Pruning's groups on the untouched dense model (its own coordinates), independently of
    how `shrink` removes them one group after another.
    """
    graph = tp.DependencyGraph().build_dependency(dense, example_inputs=x)
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, mask in kept.items():
            removed = (~mask).nonzero().squeeze(1).tolist()
            if not removed:
                continue
            root = modules[name]
            for item in graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, removed):
                module, idxs = item.dep.target.module, torch.as_tensor(list(item.idxs))
                handler = item.dep.handler.__name__
                if handler == "prune_out_channels":
                    for attribute in ("weight", "bias"):
                        p = getattr(module, attribute, None)
                        if isinstance(p, torch.Tensor):
                            p[idxs] = 0  # a layer's output channels, a BatchNorm's affine parameters
                elif isinstance(module, (nn.Conv2d, nn.Linear)) and getattr(module, "groups", 1) == 1:
                    module.weight[:, idxs] = 0  # what reads the removed channels


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("model_name", MODELS.keys())
def test_the_shrunk_network_equals_the_dense_one_with_the_removed_channels_zeroed(model_name, scope):
    build, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = _warm(build(), shape)
    x = torch.randn(*shape)
    dense = copy.deepcopy(model)
    candidates = find_candidates(model)
    graph, groups = trace_channel_groups(model, x, candidates)
    scores = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) for name, p in candidates.items()}
    kept = select_channels(group_scores(groups, scores), 0.5, scope)
    params_before = sum(p.numel() for p in model.parameters())
    shrink(model, graph, kept)
    _zero_removed(dense, x, kept)
    with torch.no_grad():
        expected, got = dense(x), model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert sum(p.numel() for p in model.parameters()) < params_before
    assert all(
        type(m)
        in (
            nn.Sequential,
            nn.Conv2d,
            nn.Linear,
            nn.BatchNorm2d,
            nn.ReLU,
            nn.ReLU6,
            nn.MaxPool2d,
            nn.Flatten,
            nn.AdaptiveAvgPool2d,
            nn.Identity,
        )
        or not list(m.parameters(recurse=False))
        for m in model.modules()
    )  # ordinary layers, smaller


def test_group_scores_are_the_sums_of_the_per_weight_scores_golden():
    model = mlp()
    candidates = find_candidates(model)
    _, groups = trace_channel_groups(model, torch.randn(1, 8), candidates)
    g = torch.Generator().manual_seed(0)
    s = {name: torch.rand(p.shape, generator=g).double() for name, p in candidates.items()}
    got = group_scores(groups, s)
    assert set(got) == {"0", "2"}  # the output layer's channels are never a group
    torch.testing.assert_close(got["0"], s["0.weight"].sum(1) + s["2.weight"].sum(0))
    torch.testing.assert_close(got["2"], s["2.weight"].sum(1) + s["4.weight"].sum(0))


def test_a_residual_group_sums_every_branch_and_every_reader_golden():
    model = resnet18()
    candidates = find_candidates(model)
    _, groups = trace_channel_groups(model, torch.randn(1, 3, 32, 32), candidates)
    g = torch.Generator().manual_seed(0)
    s = {name: torch.rand(p.shape, generator=g).double() for name, p in candidates.items()}
    scores = group_scores(groups, s)
    (stem,) = [name for name in scores if name in ("conv1", "layer1.0.conv2", "layer1.1.conv2")]

    def out(name: str) -> torch.Tensor:
        return s[name].sum((1, 2, 3))

    def into(name: str) -> torch.Tensor:
        return s[name].sum((0, 2, 3))

    # conv1, layer1's two residual branches write to the 64 channels; four convolutions read them
    expected = out("conv1.weight") + out("layer1.0.conv2.weight") + out("layer1.1.conv2.weight")
    expected += into("layer1.0.conv1.weight") + into("layer1.1.conv1.weight")
    expected += into("layer2.0.conv1.weight") + into("layer2.0.downsample.0.weight")
    torch.testing.assert_close(scores[stem], expected)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75])
def test_global_and_layerwise_counts_are_exact(sparsity):
    scores = {"a": torch.rand(64), "b": torch.rand(10), "c": torch.rand(3)}
    kept = select_channels(scores, sparsity, "global")
    assert sum(int(k.sum()) for k in kept.values()) == kept_count(77, sparsity)
    layerwise = select_channels(scores, sparsity, "layerwise")
    assert {n: int(k.sum()) for n, k in layerwise.items()} == {
        n: max(1, kept_count(s.numel(), sparsity)) for n, s in scores.items()
    }
    top = select_channels({"a": torch.arange(10.0)}, sparsity, "global")["a"]
    assert top[: 10 - int(top.sum())].sum() == 0  # the lowest scores go


def test_every_layer_keeps_a_channel_min_density_and_width_multiples():
    scores = {"big": torch.arange(100.0) + 10, "small": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    kept = select_channels(scores, 0.9, "global")
    assert int(kept["small"].sum()) == 1  # alive, with its best channel
    assert bool(kept["small"][3])
    kept = select_channels(scores, 0.4, "global", min_density=0.5)  # floors: 50 and 2; 10 more by score
    assert int(kept["small"].sum()) == 2
    kept = select_channels(scores, 0.5, "layerwise", multiple=8)
    assert int(kept["big"].sum()) == 56  # 50, rounded up to a multiple of 8
    assert int(kept["small"].sum()) == 4  # 2, rounded up, at most its size


def _counted(model_name: str) -> tuple[nn.Module, torch.Tensor, Any, list[Any], SizeCounter]:
    """A freshly built model of ``MODELS``, one input, its graph and channel groups, and their size counter."""
    build, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(1, *shape[1:])
    graph, groups = trace_channel_groups(model, x, find_candidates(model))
    return model, x, graph, groups, SizeCounter(model, graph, groups, x)


@pytest.mark.parametrize("model_name", MODELS.keys())
def test_the_size_is_known_before_the_model_changes(model_name):
    model, x, graph, groups, counter = _counted(model_name)
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(2)
    kept = {group.name: torch.rand(group.size, generator=g) < 0.6 for group in groups}
    for mask in kept.values():
        mask[0] = True
    parameters, macs = counter.parameters(kept), counter.macs(kept)
    everything = {name: torch.ones_like(mask) for name, mask in kept.items()}
    assert counter.parameters(everything) == counter.dense_parameters == sum(p.numel() for p in model.parameters())
    assert counter.macs(everything) == counter.dense_macs == count_weight_macs(model, x)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # counting changed nothing
    shrink(model, graph, kept)
    assert parameters == sum(p.numel() for p in model.parameters())
    assert macs == count_weight_macs(model, x)  # measured by a forward of the shrunk model
    assert macs < counter.dense_macs


def test_weight_macs_golden():
    torch.manual_seed(0)
    model = Concat()  # two 3x3 convolutions on 8x8, a 1x1 convolution of 14 channels, a linear layer
    expected = 8 * 3 * 9 * 64 + 6 * 3 * 9 * 64 + 10 * 14 * 64 + 4 * 10
    assert count_weight_macs(model, torch.randn(1, 3, 8, 8)) == expected
    assert (
        count_weight_macs(mobilenet_block(), torch.randn(1, 3, 8, 8))
        == 64
        * (
            16 * 3 * 9 + 96 * 16 + 96 * 9 + 16 * 96  # stem, expand 1x1, depthwise 3x3 (one input each), project 1x1
        )
        + 5 * 16
    )


def _shrunk_size(build: Any, shape: tuple[int, ...], kept: dict[str, torch.Tensor], unit: str) -> int:
    """The parameters (or weight MACs) of a freshly built model after `shrink`, measured on the real, shrunk model."""
    torch.manual_seed(0)
    model = build()
    x = torch.randn(1, *shape[1:])
    graph, _ = trace_channel_groups(model, x, find_candidates(model))
    shrink(model, graph, kept)
    return sum(p.numel() for p in model.parameters()) if unit == "parameters" else count_weight_macs(model, x)


@pytest.mark.parametrize("unit", ["parameters", "MACs"])
@pytest.mark.parametrize("model_name", ["mlp", "concat"])
@pytest.mark.parametrize("budget", [0.8, 0.5, 0.3])
def test_a_size_budget_removes_the_fewest_channels_that_fit_it(model_name, budget, unit):
    build, shape = MODELS[model_name]
    model, x, _, groups, counter = _counted(model_name)
    size = counter.parameters if unit == "parameters" else counter.macs
    dense = sum(p.numel() for p in model.parameters()) if unit == "parameters" else count_weight_macs(model, x)
    g = torch.Generator().manual_seed(3)
    scores = {group.name: torch.rand(group.size, generator=g) for group in groups}
    total = sum(group.size for group in groups)
    limit = int(budget * dense)
    # global, by brute force on really shrunk models: rank by score per unit of size one channel of the group frees
    # from the dense model, then remove the lowest-ranked 0, 1, 2, ... channels
    everything = {name: torch.ones(s.numel(), dtype=torch.bool) for name, s in scores.items()}
    cost = {
        name: dense - _shrunk_size(build, shape, {**everything, name: torch.arange(s.numel()) > 0}, unit)
        for name, s in scores.items()
    }
    ranked = {name: s.double() / cost[name] for name, s in scores.items()}
    for removed in range(total):
        expected = select_channels(ranked, removed / total, "global")
        if _shrunk_size(build, shape, expected, unit) <= limit:
            break
    kept = select_channels_within(scores, limit, size, "global", unit=unit)
    assert {n: m.tolist() for n, m in kept.items()} == {n: m.tolist() for n, m in expected.items()}
    # layerwise: the smallest fraction on a grid finer than any two groups' rounding steps
    for fraction in torch.linspace(0, 0.999, 2000).tolist():
        expected = select_channels(scores, fraction, "layerwise")
        if size(expected) <= limit:
            break
    kept = select_channels_within(scores, limit, size, "layerwise", unit=unit)
    assert {n: int(m.sum()) for n, m in kept.items()} == {n: int(m.sum()) for n, m in expected.items()}
    assert _shrunk_size(build, shape, kept, unit) <= limit


def test_a_parameter_budget_too_small_for_the_floors_is_refused():
    torch.manual_seed(0)
    model = mlp()
    graph, groups = trace_channel_groups(model, torch.randn(2, 8), find_candidates(model))
    scores = {group.name: torch.rand(group.size) for group in groups}
    # one channel per hidden layer leaves 8*1+1 + 1*1+1 + 1*3+3 = 17 parameters
    counter = SizeCounter(model, graph, groups, torch.randn(1, 8))
    assert counter.parameters({n: torch.arange(s.numel()) == 0 for n, s in scores.items()}) == 17
    assert counter.macs({n: torch.arange(s.numel()) == 0 for n, s in scores.items()}) == 8 + 1 + 3
    for scope in ("global", "layerwise"):
        with pytest.raises(ValueError, match=r"still leaves 17 parameters, more than the 16 that `sparsity` allows"):
            select_channels_within(scores, 16, counter.parameters, scope)
        with pytest.raises(ValueError, match=r"still leaves 12 MACs, more than the 11 .* `sparsity_of='macs'`"):
            select_channels_within(scores, 11, counter.macs, scope, unit="MACs")
        kept = select_channels_within(scores, 17, counter.parameters, scope)
        assert [int(m.sum()) for m in kept.values()] == [1, 1]


# ------------------------------------------------------------------ through the callback


class Classifier(pl.LightningModule):
    def __init__(self, arch: str = "lenet5") -> None:
        super().__init__()
        self.net = lenet5() if arch == "lenet5" else mlp()
        self.example_input_array = torch.zeros(1, 1, 28, 28) if arch == "lenet5" else torch.zeros(1, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_structure(self, checkpoint)  # makes `load_from_checkpoint` work

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _images(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)), batch_size=8
    )


class OptimizerShapes(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.shapes = [tuple(p.shape) for group in trainer.optimizers[0].param_groups for p in group["params"]]
        self.devices = {p.device.type for group in trainer.optimizers[0].param_groups for p in group["params"]}


@pytest.mark.parametrize("criterion", ["snip", "grasp", "synflow", "magnitude", "random"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_the_callback_shrinks_before_the_optimizer_is_built(criterion, scope):
    torch.manual_seed(0)
    model = Classifier()
    pruning = SNIPPruning(sparsity=0.5, structure="channel", criterion=criterion, scope=scope, plot=False)
    shapes = OptimizerShapes()
    fit(model, [pruning, shapes], _images(), max_steps=2)
    net = model.net
    widths = (net[0].out_channels, net[2].out_channels, net[5].out_features)
    assert net[2].in_channels == widths[0]
    assert net[5].in_features == widths[1] * 16
    assert net[7].in_features == widths[2]
    assert net[7].out_features == 10  # the output is never pruned
    if scope == "layerwise":
        assert widths == (10, 25, 250)
    else:
        assert sum(widths) == kept_count(570, 0.5)
        assert all(w >= 1 for w in widths)
    assert shapes.shapes == [tuple(p.shape) for p in model.parameters()]  # the optimizer holds the smaller ones
    assert not pruning.masks  # nothing is masked during training
    assert pruning.state_dict()["structure"]


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_sparsity_of_parameters_leaves_at_most_that_share_of_the_parameters(scope):
    torch.manual_seed(0)
    model = Classifier()
    dense = sum(p.numel() for p in model.parameters())
    pruning = SNIPPruning(sparsity=0.75, structure="channel", scope=scope, sparsity_of="parameters", plot=False)
    fit(model, [pruning], _images(), max_steps=1)
    left = sum(p.numel() for p in model.parameters())
    assert left <= int(0.25 * dense)
    assert left > 0.2 * dense  # the fewest channels that fit: not far below the budget on LeNet-5-Caffe
    by_channels = Classifier()
    fit(by_channels, [SNIPPruning(sparsity=0.5, structure="channel", scope=scope, plot=False)], _images(), max_steps=1)
    widths = [m.weight.shape[0] for m in model.net if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert widths != [m.weight.shape[0] for m in by_channels.net if isinstance(m, (nn.Conv2d, nn.Linear))]
    if scope == "layerwise":
        # widths (10, 25, w, 10) leave 6,545 + 411 w parameters; the budget is floor(0.25 * 431,080) = 107,770, so
        # w = 246 (a fraction of 0.508 removed from every layer still rounds 20 and 50 to 10 and 25)
        assert widths == [10, 25, 246, 10]
        assert left == 6_545 + 411 * 246
    assert pruning.state_dict()["structure"]


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_sparsity_of_macs_leaves_at_most_that_share_of_the_weight_macs(scope):
    torch.manual_seed(0)
    model = Classifier()
    x = torch.zeros(1, 1, 28, 28)
    dense = count_weight_macs(model, x)
    assert dense == 20 * 25 * 24 * 24 + 50 * 20 * 25 * 8 * 8 + 500 * 800 + 10 * 500  # LeNet-5-Caffe: 2,293,000
    pruning = SNIPPruning(sparsity=0.5, structure="channel", scope=scope, sparsity_of="macs", plot=False)
    fit(model, [pruning], _images(), max_steps=1)
    assert 0.45 * dense < count_weight_macs(model, x) <= dense // 2


def test_sparsity_of_parameters_refuses_an_impossible_budget_before_any_change():
    torch.manual_seed(0)
    model = Classifier()
    before = copy.deepcopy(model.state_dict())
    pruning = SNIPPruning(sparsity=0.9999, structure="channel", sparsity_of="parameters", plot=False)
    with pytest.raises(ValueError, match=r"still leaves [\d,]+ parameters, more than the 43 that `sparsity` allows"):
        fit(model, [pruning], _images(), max_steps=1)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def _shrunk_run(tmp_path: Path, sparsity: float, steps: int) -> "Classifier":
    """A channel-pruned LeNet-5-Caffe trained for ``steps`` with ``last.ckpt`` written to ``tmp_path``."""
    torch.manual_seed(0)
    model = Classifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    pruning = SNIPPruning(sparsity=sparsity, structure="channel", plot=False)
    fit(model, [pruning, checkpoint], _images(), enable_checkpointing=True, max_steps=steps)
    return model


def test_resume_and_reload_restore_the_structure_and_never_score(tmp_path, monkeypatch):
    model = _shrunk_run(tmp_path, 0.5, 3)
    import lightning_snip.callback as callback_module

    def no_scoring(*args: Any) -> None:
        raise AssertionError("a resumed run scored again")

    monkeypatch.setattr(callback_module, "prune_channels", no_scoring)
    fresh = Classifier()  # freshly built, unpruned
    resumed = SNIPPruning(sparsity=0.5, structure="channel", plot=False)
    trainer = fit(fresh, [resumed], _images(), ckpt_path=str(tmp_path / "last.ckpt"), max_steps=5, max_epochs=3)
    assert trainer.global_step == 5
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in model.parameters()]
    loaded = torch.load(tmp_path / "last.ckpt", weights_only=True)
    again = restore_structure(Classifier(), tmp_path / "last.ckpt")
    again.load_state_dict(loaded["state_dict"])  # strict
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))
    reloaded = Classifier.load_from_checkpoint(tmp_path / "last.ckpt")
    assert all(
        torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    torch.save(reloaded, tmp_path / "whole.pt")  # an ordinary module
    exported = torch.export.export(reloaded.net.eval(), (torch.randn(2, 1, 28, 28),))
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(exported.module()(x), reloaded.net(x))


class CustomFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.flip(1)


class WithCustom(Classifier):
    def __init__(self) -> None:
        super().__init__("mlp")
        self.shuffle = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2:](CustomFunction.apply(self.net[:2](x)))


class WithLSTM(Classifier):
    def __init__(self) -> None:
        super().__init__("mlp")
        self.rnn = nn.LSTM(8, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.rnn(x.unsqueeze(1))[0][:, 0])


@pytest.mark.parametrize(
    ("model_cls", "message"),
    [
        (WithCustom, r"custom autograd function 'CustomFunction' in module '<model>'"),
        (WithLSTM, r"recurrent layer 'rnn' \(LSTM\).*exclude=\['rnn\.\*'\]"),
    ],
    ids=["custom-function", "lstm"],
)
def test_untraceable_models_are_refused_before_any_change(model_cls, message):
    torch.manual_seed(0)
    model = model_cls()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UntraceableError, match=message):
        fit(
            model,
            [SNIPPruning(sparsity=0.5, structure="channel", plot=False)],
            DataLoader(make_data(32, 8, 3), batch_size=8),
        )
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_channel_structure_refuses_what_it_cannot_do_in_init():
    with pytest.raises(ValueError, match=r"`structure` must be 'weight' .* got 'channels'"):
        SNIPPruning(structure="channels")
    with pytest.raises(ValueError, match=r"`criterion='force'` prunes single weights between its rounds"):
        SNIPPruning(structure="channel", criterion="force")
    with pytest.raises(ValueError, match=r"`scope` must be 'global' or 'layerwise', got '2:4'"):
        SNIPPruning(structure="channel", scope="2:4", sparsity=0.5)
    with pytest.raises(ValueError, match=r"`width_multiple=8` rounds kept channel counts"):
        SNIPPruning(width_multiple=8)
    assert SNIPPruning(structure="channel", width_multiple=8).width_multiple == 8
    with pytest.raises(ValueError, match=r"`sparsity_of='parameters'` says what `sparsity` counts .* needs"):
        SNIPPruning(sparsity_of="parameters")
    with pytest.raises(ValueError, match=r"`sparsity_of` must be 'channels', 'parameters' or 'macs', got 'weights'"):
        SNIPPruning(structure="channel", sparsity_of="weights")
    assert SNIPPruning(structure="channel", sparsity_of="parameters").sparsity_of == "parameters"
    assert (
        SNIPPruning(structure="channel").state_key == SNIPPruning(structure="channel", sparsity_of="channels").state_key
    )
    assert "sparsity_of" not in SNIPPruning(structure="channel").state_key  # checkpoints of earlier versions load
    assert "sparsity_of" in SNIPPruning(structure="channel", sparsity_of="parameters").state_key
    with pytest.raises(ValueError, match=r"`sparsity_of='macs'` says what `sparsity` counts .* needs"):
        SNIPPruning(sparsity_of="macs")


def test_sharded_strategies_are_refused_before_any_change(monkeypatch):
    import lightning_snip._lightning as glue

    monkeypatch.setattr(glue, "is_sharding", lambda strategy: True)
    model = Classifier()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(MisconfigurationException, match=r"structure='channel'\)` shrinks the model before"):
        fit(model, [SNIPPruning(sparsity=0.5, structure="channel", plot=False)], _images())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.slow
def test_ddp_ranks_shrink_alike_and_match_single_process_union(tmp_path):
    spawn_and_wait(ddp_channel_rank_main, (2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["structure"] == ranks[1]["structure"]
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    dataset = make_data(32)  # each rank's first batch of 4, from its DistributedSampler (seed 0, epoch 0)
    order = [i for r in range(2) for i in list(DistributedSampler(dataset, num_replicas=2, rank=r, seed=0))[:4]]
    torch.manual_seed(0)  # rank 0's initialization, which DDP gives every rank
    single = SNIPPruning(sparsity=0.5, structure="channel", num_batches=2, plot=False)
    model = BoringClassifier(dropout=0.0, optimizer="adam", lr=0.05)
    fit(model, [single], DataLoader(dataset, batch_size=4, sampler=FixedOrder(order)), precision="64-true", max_steps=1)
    assert single.state_dict()["structure"] == ranks[0]["structure"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_callback_shrinks_on_a_gpu():
    torch.manual_seed(0)
    model = Classifier()
    pruning = SNIPPruning(sparsity=0.5, structure="channel", scope="layerwise", plot=False)
    shapes = OptimizerShapes()
    fit(model, [pruning, shapes], _images(), max_steps=2, accelerator="gpu")
    assert (model.net[0].out_channels, model.net[2].out_channels, model.net[5].out_features) == (10, 25, 250)
    assert shapes.devices == {"cuda"}  # the optimizer trains the smaller parameters on the GPU


@pytest.mark.slow  # a new process
def test_a_fresh_process_restores_a_global_structure_and_its_weights(tmp_path):
    import subprocess

    model = _shrunk_run(tmp_path, 0.6, 2)
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_structured import Classifier
from lightning_snip import restore_structure
path = {str(tmp_path / "last.ckpt")!r}
model = restore_structure(Classifier(), path)
model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
again = Classifier.load_from_checkpoint(path)
torch.save({{"restored": model.state_dict(), "reloaded": again.state_dict()}}, {str(tmp_path / "out.pt")!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for state in out.values():
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    widths = (model.net[0].out_channels, model.net[2].out_channels, model.net[5].out_features)
    assert sum(widths) == kept_count(570, 0.6)


@pytest.mark.slow  # Inductor compiles C++ (about 30 s)
def test_the_shrunk_network_compiles_with_torch_compile():
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    torch.manual_seed(0)
    model = Classifier()
    fit(model, [SNIPPruning(sparsity=0.5, structure="channel", scope="layerwise", plot=False)], _images(), max_steps=1)
    net = model.net.eval()
    compiled = torch.compile(net)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)
