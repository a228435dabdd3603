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
        for name in full:
            joined = torch.cat([ranks[r][setting][name] for r in range(world_size)])
            assert torch.equal(joined, expected[name].reshape(-1)), f"{setting} {name}"
