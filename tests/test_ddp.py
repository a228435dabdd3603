"""DDP on CPU (gloo): every rank holds the mask of single-process scoring over the union of their batches."""

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    BoringClassifier,
    FixedOrder,
    SpawnDDP,
    ddp_rank_main,
    fit,
    free_port,
    make_data,
    spawn_and_wait,
    union_mean_gradients,
)
from torch.utils.data import DataLoader, DistributedSampler

from lightning_snip import SNIPPruning
from lightning_snip.selection import kept_count


@pytest.mark.slow
@pytest.mark.parametrize(
    ("criterion", "scope"),
    [("snip", "global"), ("random", "global"), ("snip", "2:4"), ("iterative_snip", "global")],
    ids=["snip", "random", "snip-2:4", "iterative-snip"],
)
def test_ddp_ranks_agree_and_match_single_process_union(tmp_path, criterion, scope):
    spawn_and_wait(ddp_rank_main, (2, free_port(), str(tmp_path), criterion, scope), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), f"ranks disagree on {name}"
    for rank in ranks:
        assert rank["violations"] == [0] * 9  # 4 batches per rank and epoch, 2 epochs, plus fit end
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), f"ranks' weights differ in {name}"
    if criterion == "iterative_snip":  # round r of the union: every rank's batches of round r
        dataset = make_data(32)
        per_rank = [list(DistributedSampler(dataset, num_replicas=2, rank=r, seed=0)) for r in range(2)]
        order = [i for rnd in range(2) for r in range(2) for i in per_rank[r][8 * rnd : 8 * rnd + 8]]
        torch.manual_seed(0)
        model = BoringClassifier(dropout=0.0, optimizer="adam", lr=0.05)
        single = SNIPPruning(sparsity=0.8, num_batches=4, criterion="iterative_snip", iterations=2)
        fit(model, [single], DataLoader(dataset, batch_size=4, sampler=FixedOrder(order)), precision="64-true")
        for name, mask in single.masks.items():
            assert torch.equal(mask, ranks[0]["masks"][name]), f"DDP mask of {name} differs from the union's"
        return
    if criterion != "snip":
        return

    # Lightning gives each rank a shuffled DistributedSampler (seed 0, epoch 0); its first 8 indices are the rank's
    # two scoring batches of 4.
    dataset = make_data(32)
    order = [i for r in range(2) for i in list(DistributedSampler(dataset, num_replicas=2, rank=r, seed=0))[:8]]
    torch.manual_seed(0)
    model = BoringClassifier(dropout=0.0, optimizer="adam", lr=0.05)
    single = SNIPPruning(sparsity=0.5 if scope == "2:4" else 0.8, num_batches=4, scope=scope)
    loader = DataLoader(dataset, batch_size=4, sampler=FixedOrder(order))
    fit(model, [single], loader, precision="64-true", max_steps=1)
    for name, mask in single.masks.items():
        assert torch.equal(mask, ranks[0]["masks"][name]), f"DDP mask of {name} differs from single-process scoring"
        if scope == "2:4":
            assert bool((mask.view(mask.shape[0], -1, 4).sum(-1) == 2).all()), f"{name} is not 2:4"
    # the values custom criteria read: the mean over all 4 batches (not a sum over ranks), worked out with autograd
    expected = union_mean_gradients(order)
    for rank in ranks:
        assert rank["gradients"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(rank["gradients"][name], grad, rtol=1e-9, atol=1e-12)


def _no_scoring(*args) -> None:
    raise AssertionError("the trained model was scored again")


@pytest.mark.slow
def test_ddp_spawn_hands_the_masks_back_and_a_second_fit_trains_on_with_them(tmp_path):
    pl.seed_everything(0)
    model = BoringClassifier(dropout=0.0)
    pruning = SNIPPruning(sparsity=0.8)
    fit(model, [pruning], DataLoader(make_data(32), batch_size=4), strategy=SpawnDDP(), devices=2)
    masks = pruning.masks  # made in the workers, read in this process
    assert sum(int(m.sum()) for m in masks.values()) == kept_count(640, 0.8)
    params = dict(model.named_parameters())
    assert all(int((params[n][~m] != 0).sum()) == 0 for n, m in masks.items())  # the weights came back pruned
    assert all(int((params[n][m] != 0).sum()) == int(m.sum()) for n, m in masks.items())
    pruning._score = _no_scoring  # pickled to the workers of the second fit
    fit(model, [pruning], DataLoader(make_data(32), batch_size=4), strategy=SpawnDDP(), devices=2, max_epochs=2)
    assert all(torch.equal(masks[n], m) for n, m in pruning.masks.items())
    assert all(int((params[n][~m] != 0).sum()) == 0 for n, m in masks.items())
