"""Tests whose expectations are worked out independently of the package, each planted against one realistic bug."""

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import BoringClassifier, ZeroInvariantChecker, fit, make_data, reference_top_k
from torch import nn
from torch.utils.data import DataLoader

from lightning_snip import SNIPPruning, pack_mask, select_masks

FIXTURES = Path(__file__).parent / "fixtures"


class BatchNormNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _reference_snip(model: BatchNormNet, x: torch.Tensor, y: torch.Tensor, train: bool) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).train(train)
    weights = {"net.0.weight": model.net[0].weight, "net.3.weight": model.net[3].weight}
    grads = torch.autograd.grad(nn.functional.cross_entropy(model.net(x), y), list(weights.values()))
    return {name: (g * w).abs().detach() for (name, w), g in zip(weights.items(), grads, strict=True)}


def test_scoring_runs_in_train_mode_even_when_the_module_is_in_eval_mode():
    torch.manual_seed(0)
    model = BatchNormNet().eval()  # e.g. left in eval mode by an earlier validation
    data = make_data(64)
    x, y = data.tensors[0][:16], data.tensors[1][:16]
    in_train = reference_top_k(_reference_snip(model, x, y, train=True), keep=128)
    in_eval = reference_top_k(_reference_snip(model, x, y, train=False), keep=128)
    assert any(not torch.equal(in_train[n], in_eval[n]) for n in in_train)  # the mode matters for this model
    pruning = SNIPPruning(sparsity=0.8)
    fit(model, [pruning], DataLoader(data, batch_size=16))
    assert pruning.masks.keys() == in_train.keys()
    assert all(torch.equal(pruning.masks[n], in_train[n]) for n in in_train)


def test_the_seed_of_the_random_criterion_decides_the_mask():
    def masks(seed: int, global_seed: int) -> dict[str, torch.Tensor]:
        pl.seed_everything(global_seed)
        pruning = SNIPPruning(sparsity=0.75, criterion="random", seed=seed)
        torch.manual_seed(0)
        fit(BoringClassifier(), [pruning])
        return pruning.masks

    # the reference: one generator seeded with `seed`, one uniform draw per candidate in parameter order
    generator = torch.Generator().manual_seed(3)
    draws = {
        name: torch.rand(shape, generator=generator)
        for name, shape in (("net.0.weight", (32, 16)), ("net.4.weight", (4, 32)))
    }
    expected = reference_top_k(draws, keep=160)
    first, other_global = masks(3, 0), masks(3, 1)
    for name in expected:
        assert torch.equal(first[name], expected[name])
        assert torch.equal(other_global[name], expected[name])  # the global stream plays no part
    assert any(not torch.equal(masks(4, 0)[n], expected[n]) for n in expected)


def test_layerwise_golden_case_that_differs_from_global_selection():
    # worked out by hand: a = [[9, 1], [2, 7]], b = [0.5, 0.4], sparsity 0.5
    # global: keep 3 of 6 -> 9, 7, 2 (all in a); layerwise: 2 of a (9, 7) and 1 of b (0.5)
    scores = {"a": torch.tensor([[9.0, 1.0], [2.0, 7.0]]), "b": torch.tensor([0.5, 0.4])}
    layerwise = select_masks(scores, 0.5, "layerwise")
    assert layerwise["a"].tolist() == [[True, False], [False, True]]
    assert layerwise["b"].tolist() == [True, False]
    global_ = select_masks(scores, 0.5, "global")
    assert global_["a"].tolist() == [[True, False], [True, True]]
    assert global_["b"].tolist() == [False, False]


def _fixture_masks() -> dict[str, torch.Tensor]:
    """The masks the committed checkpoint fixtures hold, from a rule independent of the package's packing."""
    return {
        "net.0.weight": (torch.arange(32 * 16) % 3 == 0).view(32, 16),
        "net.4.weight": (torch.arange(4 * 32) % 5 < 2).view(4, 32),
    }


@pytest.mark.parametrize("version", [1, 2], ids=["version-1-bool", "version-2-packed"])
def test_committed_checkpoint_states_still_load_to_the_right_masks(version):
    state = torch.load(FIXTURES / f"snip_state_v{version}.pt", weights_only=True)
    assert state.get("version", 1) == version
    if version == 2:  # the format itself: most significant bit first, row-major, 1 bit per weight
        assert state["masks"]["net.0.weight"][:2].tolist() == [0b10010010, 0b01001001]
        assert state["masks"]["net.4.weight"][:2].tolist() == [0b11000110, 0b00110001]
    pruning = SNIPPruning()
    pruning.load_state_dict(state)
    expected = _fixture_masks()
    assert pruning.masks.keys() == expected.keys()
    assert all(torch.equal(pruning.masks[n], expected[n]) for n in expected)
    if version == 2:  # and today's writer still writes those bytes
        assert all(torch.equal(pack_mask(expected[n]), state["masks"][n]) for n in expected)


class WritesWeightsAtFitStart(BoringClassifier):
    """The module's own `on_fit_start` (after the callbacks') sets every weight to 1."""

    def on_fit_start(self) -> None:
        with torch.no_grad():
            for p in self.parameters():
                p.fill_(1.0)


class FirstBatchWeights(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_weights_written_between_binding_and_the_first_step_are_zero_when_training_starts():
    pl.seed_everything(0)
    pruning = SNIPPruning(sparsity=0.8)
    first = FirstBatchWeights()
    fit(WritesWeightsAtFitStart(), [pruning, first])
    for name, kept in pruning.masks.items():
        assert int((first.weights[name][~kept] != 0).sum()) == 0
        assert bool((first.weights[name][kept] == 1.0).all())


def test_kept_weights_train_and_pruned_ones_do_not():
    pl.seed_everything(0)
    model = BoringClassifier(optimizer="sgd", lr=0.1, momentum=0.9)
    pruning = SNIPPruning(sparsity=0.8)
    first = FirstBatchWeights()
    checker = ZeroInvariantChecker(pruning)
    fit(model, [pruning, first, checker], max_epochs=2)
    assert checker.violations == [0] * 9
    params = dict(model.named_parameters())
    for name, kept in pruning.masks.items():
        moved = params[name].detach() != first.weights[name]
        # a kept weight into or out of a unit that never fires (all its inputs pruned) gets no gradient; most move
        assert float(moved[kept].float().mean()) > 0.75, f"kept weights of {name} did not train"
        assert not bool(moved[~kept].any())


# ------------------------------------------------------------------ planted bugs the suite must catch


def test_protect_slices_keeps_the_best_of_every_slice_along_the_dim_it_is_given():
    from lightning_snip.selection import protect_slices_

    scores = torch.tensor([[1.0, 5.0, 2.0], [4.0, 3.0, 6.0]])
    top = torch.finfo(torch.float32).max
    along_rows = scores.clone()
    assert protect_slices_(along_rows, 0) == 2  # one per row: 5.0 and 6.0
    assert (along_rows == top).nonzero().tolist() == [[0, 1], [1, 2]]
    along_columns = scores.clone()
    assert protect_slices_(along_columns, 1) == 3  # one per column: 4.0, 5.0 and 6.0
    assert (along_columns == top).nonzero().tolist() == [[0, 1], [1, 0], [1, 2]]
    wide = scores.double()
    protect_slices_(wide, 1)
    assert float(wide.max()) == torch.finfo(torch.float64).max  # above every float64 score


def test_attaching_twice_leaves_one_hook_per_optimizer():
    from lightning_snip.enforcement import Enforcer

    layer = nn.Linear(6, 4)
    kept = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) < 0.3
    enforcer = Enforcer({"weight": layer.weight}, {"weight": kept})
    optimizer = torch.optim.Adam(layer.parameters())
    enforcer.attach([optimizer], automatic=True)
    enforcer.attach([optimizer], automatic=True)
    assert len(optimizer._optimizer_step_post_hooks) == 1
    enforcer.detach()
    assert not optimizer._optimizer_step_post_hooks


def test_checkpoint_zeroing_reaches_every_alias_of_a_tied_weight():
    from lightning_snip.candidates import parameter_aliases
    from lightning_snip.enforcement import zero_pruned_entries

    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    kept = torch.rand(10, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    state = {"emb.weight": emb.weight.detach(), "head.weight": emb.weight.detach().clone()}  # a copy under the alias
    zero_pruned_entries(state, {"emb.weight": emb.weight}, {"emb.weight": kept}, parameter_aliases(model))
    assert not state["head.weight"][~kept].any()
    assert torch.equal(state["head.weight"][kept], emb.weight.detach()[kept])
    assert emb.weight.detach()[~kept].any()  # the parameter itself is the enforcer's, not touched here


@pytest.mark.parametrize(
    ("cols", "dtype"), [(255, torch.uint8), (256, torch.uint8), (257, torch.int16), (32768, torch.int16)]
)
def test_csr_column_indices_are_the_narrowest_that_hold_the_last_column(cols, dtype):
    from lightning_snip import compress_state_dict, decompress_state_dict

    w = torch.zeros(64, cols)
    w[:, -1] = 1.0  # the last column is the largest index stored
    w[0, 0] = 2.0
    entry = compress_state_dict({"w": w})["entries"]["w"]
    assert entry["form"] == "csr"
    assert entry["col_indices"].dtype == dtype
    assert torch.equal(decompress_state_dict(compress_state_dict({"w": w}))["w"], w)


@pytest.mark.parametrize(("nnz", "dtype"), [(255, torch.uint8), (256, torch.int16)])
def test_csr_row_pointers_are_the_narrowest_that_hold_the_nonzero_count(nnz, dtype):
    from lightning_snip import compress_state_dict, decompress_state_dict

    w = torch.zeros(8, 4096)
    w.view(-1)[torch.randperm(w.numel(), generator=torch.Generator().manual_seed(0))[:nnz]] = 1.0
    entry = compress_state_dict({"w": w})["entries"]["w"]
    assert entry["form"] == "csr"
    assert entry["crow_indices"].dtype == dtype
    assert torch.equal(decompress_state_dict(compress_state_dict({"w": w}))["w"], w)


def test_held_masks_must_match_the_shapes_not_just_the_sizes():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lightning_snip.guards import check_masks_fit

    check_masks_fit(object(), {"w": torch.ones(4, 8, dtype=torch.bool)}, {"w": torch.Size([4, 8])})
    with pytest.raises(MisconfigurationException, match=r"w: mask \(4, 8\) vs parameter \(8, 4\)"):
        check_masks_fit(object(), {"w": torch.ones(4, 8, dtype=torch.bool)}, {"w": torch.Size([8, 4])})


class WeightNormed(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))  # 3 normed rows of 4


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_the_weight_norm_budget_allows_exactly_one_weight_per_slice(scope):
    from lightning_snip import ScoringError
    from lightning_snip.guards import protect_weight_norm_slices

    model = WeightNormed()
    name = "fc.parametrizations.weight.original1"
    protect_weight_norm_slices(model, {name: torch.rand(3, 4)}, 0.75, scope)  # keeps 3 of 12: exactly one per slice
    with pytest.raises(ScoringError, match="normed slices"):
        protect_weight_norm_slices(model, {name: torch.rand(3, 4)}, 0.8, scope)  # keeps 2 of 12


class TwoRanks(pl.strategies.SingleDeviceStrategy):
    """A single process that answers collectives as rank 0 of two identical ranks would."""

    def __init__(self, rank_zero_value: int) -> None:
        super().__init__(device=torch.device("cpu"))
        self.rank_zero_value = rank_zero_value

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self.rank_zero_value if isinstance(obj, int) else obj

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        return tensor * 2 if reduce_op == "sum" else tensor


def test_the_seed_every_rank_uses_is_rank_zeros():
    from lightning_snip.pipeline import _shared_seed, all_reduce_sum

    strategy = TwoRanks(rank_zero_value=1234)
    assert _shared_seed(strategy, None) == 1234  # whatever this rank drew
    assert _shared_seed(strategy, 7) == 1234
    assert torch.equal(all_reduce_sum(strategy, torch.tensor([3, 5])), torch.tensor([6, 10]))  # a sum, not a mean
    pl.seed_everything(99)
    pruning = SNIPPruning(sparsity=0.75, criterion="random", plot=False)
    fit(BoringClassifier(), [pruning], strategy=TwoRanks(rank_zero_value=1234), max_steps=1)
    reference = SNIPPruning(sparsity=0.75, criterion="random", seed=1234, plot=False)
    fit(BoringClassifier(), [reference], max_steps=1)
    assert all(torch.equal(pruning.masks[n], m) for n, m in reference.masks.items())


def test_backward_mean_gradients_divide_by_the_number_of_batches():
    from lightning_snip.scoring import backward_mean_gradients

    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    xs = [torch.tensor([1.0, 1.0]), torch.tensor([3.0, 0.0]), torch.tensor([2.0, 5.0])]
    means = backward_mean_gradients({"w": w}, lambda i: (w * xs[i]).sum(), num_batches=3)
    assert torch.equal(means["w"], torch.tensor([2.0, 2.0]))
