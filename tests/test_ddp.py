"""DDP on CPU (gloo): every rank holds the mask of single-process scoring over the union of their batches."""

import pytest
import torch
from helpers import BoringClassifier, FixedOrder, ddp_rank_main, fit, free_port, make_data, spawn_and_wait
from torch.utils.data import DataLoader, DistributedSampler

from lightning_snip import SNIPPruning


@pytest.mark.parametrize("criterion", ["snip", "random"], ids=["snip", "random"])
def test_ddp_ranks_agree_and_match_single_process_union(tmp_path, criterion):
    spawn_and_wait(ddp_rank_main, (2, free_port(), str(tmp_path), criterion), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), f"ranks disagree on {name}"
    for rank in ranks:
        assert rank["violations"] == [0] * 9  # 4 batches per rank and epoch, 2 epochs, plus fit end
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), f"ranks' weights differ in {name}"
    if criterion != "snip":
        return

    # Lightning gives each rank a shuffled DistributedSampler (seed 0, epoch 0); its first 8 indices are the rank's
    # two scoring batches of 4.
    dataset = make_data(32)
    order = [i for r in range(2) for i in list(DistributedSampler(dataset, num_replicas=2, rank=r, seed=0))[:8]]
    torch.manual_seed(0)
    model = BoringClassifier(dropout=0.0, optimizer="adam", lr=0.05)
    single = SNIPPruning(sparsity=0.8, num_batches=4)
    loader = DataLoader(dataset, batch_size=4, sampler=FixedOrder(order))
    fit(model, [single], loader, precision="64-true", max_steps=1)
    for name, mask in single.masks.items():
        assert torch.equal(mask, ranks[0]["masks"][name]), f"DDP mask of {name} differs from single-process scoring"
