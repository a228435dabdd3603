"""FSDP (``FSDPStrategy``) and ``fully_shard`` (``ModelParallelStrategy``) on CPU with gloo, 2 ranks.

Each rank scores and masks its own shards; the whole masks equal single-process scoring of the same model on the
union of the ranks' batches; pruned entries stay zero on every shard; checkpoints carry the whole masks and a resumed
run (these strategies restore after ``on_fit_start``) trains with them without scoring again.
"""

import csv

import pytest
import torch
from helpers import (
    BoringClassifier,
    FixedOrder,
    fit,
    free_port,
    make_data,
    sharded_rank_main,
    spawn_and_wait,
    union_mean_gradients,
)
from torch.utils.data import DataLoader, DistributedSampler

from lightning_snip import SNIPPruning, load_compressed
from lightning_snip.packing import unpack_mask

pytestmark = pytest.mark.slow  # several processes


def _scoring_order() -> list[int]:
    # Lightning gives each rank a shuffled DistributedSampler (seed 0, epoch 0); its first 8 indices are the rank's
    # two scoring batches of 4
    dataset = make_data(32)
    return [i for r in range(2) for i in list(DistributedSampler(dataset, num_replicas=2, rank=r, seed=0))[:8]]


def _single_process_masks(criterion: str) -> dict[str, torch.Tensor]:
    dataset, order = make_data(32), _scoring_order()
    torch.manual_seed(0)
    model = BoringClassifier(dropout=0.0, optimizer="adam", lr=0.05)
    single = SNIPPruning(sparsity=0.8, num_batches=4, criterion=criterion, seed=7)
    fit(model, [single], DataLoader(dataset, batch_size=4, sampler=FixedOrder(order)), precision="64-true", max_steps=1)
    return single.masks


@pytest.mark.parametrize(
    ("strategy", "criterion"),
    [("fsdp", "snip"), ("fsdp", "random"), ("model-parallel", "snip")],
    ids=["fsdp-snip", "fsdp-random", "fully-shard-snip"],
)
def test_sharded_masks_equal_single_process_and_survive_resume(tmp_path, strategy, criterion):
    spawn_and_wait(sharded_rank_main, (2, free_port(), str(tmp_path), strategy, criterion), nprocs=2, timeout_s=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected = _single_process_masks(criterion)
    assert list(expected) == ["net.0.weight", "net.4.weight"]
    for rank in ranks:
        assert rank["masks"].keys() == expected.keys()
        for name, mask in expected.items():
            assert torch.equal(rank["masks"][name], mask), f"{strategy} mask of {name} differs from single process"
            assert torch.equal(rank["resumed_masks"][name], mask), f"resumed mask of {name} differs"
            state = rank["state"]
            assert torch.equal(unpack_mask(state["masks"][name], state["shapes"][name]), mask)
        assert rank["violations"] == [0] * 4
        if strategy == "fsdp":  # a gathered (whole) state dict: pruned weights written after the last step are zero
            assert rank["saved_pruned_nonzero"] == 0
        if criterion == "snip":  # the mean gradients' values, reassembled from the two ranks' slices
            for name, grad in union_mean_gradients(_scoring_order()).items():
                whole = torch.full((grad.numel(),), float("nan"), dtype=grad.dtype)
                for other in ranks:
                    start, part = other["gradients"][name]
                    whole[start : start + part.numel()] = part
                # Lightning's FSDP precision plugin computes in float32 under "32-true": float32 tolerances
                tolerance = {"rtol": 1e-4, "atol": 1e-6} if strategy == "fsdp" else {"rtol": 1e-9, "atol": 1e-12}
                torch.testing.assert_close(whole.view(grad.shape), grad, **tolerance)
        assert rank["resumed_violations"] == [0] * 4  # the second epoch only
    # the resumed run wrote the whole trained weights, compressed, once (rank 0)
    compressed = load_compressed(tmp_path / "logs" / "version_0" / "snip_compressed.pt")
    for name, mask in expected.items():
        assert compressed[name].shape == mask.shape
        assert not compressed[name][~mask].any()
        assert bool(compressed[name][mask].ne(0).all())
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as handle:
        logged = [float(row["snip/sparsity"]) for row in csv.DictReader(handle) if row.get("snip/sparsity")]
    # the scoring report, then the sparsity counted from all shards after every step of both runs
    assert len(logged) >= 4
    assert all(abs(value - 0.8) < 1e-9 for value in logged)
