"""Exact selection over scores sharded across processes (plain torch.distributed, gloo, CPU)."""

import pytest
import torch
from helpers import distributed_selection_rank_main, free_port, shard_bounds, sharded_scores, spawn_and_wait

from lightning_snip import select_masks

pytestmark = pytest.mark.slow  # several processes


@pytest.mark.parametrize("world_size", [2, 3], ids=["2-ranks", "3-ranks"])
def test_sharded_selection_equals_single_process(tmp_path, world_size):
    spawn_and_wait(distributed_selection_rank_main, (world_size, free_port(), str(tmp_path)), nprocs=world_size)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    full = sharded_scores()
    assert any(
        b[r] == b[r + 1]
        for i, s in enumerate(full.values())
        for b in [shard_bounds(s.numel(), world_size, i)]
        for r in range(world_size)
    ), "the test should include an empty slice"
    for setting in ranks[0]:
        scope, sparsity = setting.split("-")
        expected = select_masks(full, float(sparsity), scope)
        groups = [list(full)] if scope == "global" else [[name] for name in full]
        for group in groups:  # an independent reference: a stable descending sort, ties to the earlier position
            flat = torch.cat([full[name].reshape(-1) for name in group])
            keep = flat.numel() - round(float(sparsity) * flat.numel())
            reference = torch.zeros_like(flat, dtype=torch.bool)
            reference[torch.sort(flat, descending=True, stable=True).indices[:keep]] = True
            joined = torch.cat([ranks[r][setting][name] for name in group for r in range(world_size)])
            assert torch.equal(joined, reference), f"{setting} {group}: not the stable-sort top {keep}"
        for name in full:
            joined = torch.cat([ranks[r][setting][name] for r in range(world_size)])
            assert torch.equal(joined, expected[name].reshape(-1)), f"{setting} {name}"
