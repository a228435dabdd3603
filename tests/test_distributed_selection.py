"""Exact selection over scores sharded across processes (plain torch.distributed, gloo, CPU)."""

import time

import pytest
import torch
import torch.multiprocessing as mp
from helpers import distributed_selection_rank_main, shard_bounds, sharded_scores
from test_ddp import _free_port

from lightning_snip import select_masks


@pytest.mark.parametrize("world_size", [2, 3], ids=["2-ranks", "3-ranks"])
def test_sharded_selection_equals_single_process(tmp_path, world_size):
    context = mp.start_processes(
        distributed_selection_rank_main,
        args=(world_size, _free_port(), str(tmp_path)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish: a collective is missing on some rank")
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
