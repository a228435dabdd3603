"""Shard layouts on plain ``torch.distributed`` gloo processes: slices, DTensors, FSDP1 shapes and refusals."""

import pytest
import torch
from helpers import free_port, sharding_rank_main, spawn_and_wait

from lightning_snip.packing import unpack_mask

pytestmark = pytest.mark.slow  # several processes


def test_layouts_gathering_and_refusals(tmp_path):
    spawn_and_wait(sharding_rank_main, (2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    whole = torch.arange(21).reshape(7, 3)
    for rank, result in enumerate(ranks):
        start = (0, 9)[rank]
        assert result["layout"] == {"w": ((7, 3), start, (9, 12)), "empty": ((4,), (0, 4)[rank], (4, 0))}
        assert torch.equal(result["take"], (whole * 10).reshape(-1)[start : start + (9, 12)[rank]])
        assert torch.equal(unpack_mask(result["packed"], (7, 3)), whole % 2 == 0)  # every rank gets the whole mask
        assert "hold [21, 21] elements of `w` (7, 3)" in result["replicated"]
        assert "'ddp'" in result["replicated"]
        assert result["row_layout"] == (0, 12)[rank]  # rows 0-3 on rank 0 (chunks of ceil(7 / 2))
        assert "placements (Shard(dim=1),)" in result["column"]
        assert result["use_orig_params=True"] == ""
        assert result["use_orig_params=True shapes"] == {
            "0.weight": (3, 5),
            "0.bias": (3,),
            "1.weight": (2, 3),
            "1.bias": (2,),
        }
        assert "use_orig_params=True" in result["use_orig_params=False"]
