"""Where each weight lives when the model is sharded across processes (FSDP, ``fully_shard``).

Plain PyTorch (``torch.distributed``), no Lightning. A sharded weight is described by its whole shape and by the
contiguous slice of its row-major flattening that this process holds: rank 0 holds the first slice, rank 1 the one
that follows, and so on. That is what FSDP's flat-parameter sharding (``FULL_SHARD``, ``SHARD_GRAD_OP``) and
``fully_shard``'s row-wise ``Shard(0)`` placement produce, and what
:func:`~lightning_snip.selection.select_masks_distributed` expects. Layouts that replicate a weight on several processes
(``NO_SHARD``, hybrid sharding, tensor parallelism) are refused with a clear error.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_snip.packing import pack_mask
from lightning_snip.report import TensorSparsity
from lightning_snip.scoring import ScoringError
from lightning_snip.selection import all_gather_ints, collective_device, select_masks_distributed

# Prefixes that FSDP's and activation checkpointing's wrappers insert into parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class ShardingError(ValueError):
    """The model's parameters are distributed in a way the masks cannot follow."""


def clean_name(name: str) -> str:
    """A parameter name as the unwrapped model has it: FSDP and activation-checkpointing prefixes removed.

    Example::

        >>> clean_name("net.0._fsdp_wrapped_module._checkpoint_wrapped_module.weight")
        'net.0.weight'
    """
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@functools.cache  # asked for every parameter on every step of a sharded run
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed support
        return None
    return DTensor


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (as ``fully_shard`` makes parameters)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local_tensor(t: Tensor) -> Tensor:
    """This process's part of ``t``: the local tensor of a ``DTensor`` (sharing its storage), else ``t`` itself."""
    if is_dtensor(t):
        with torch.no_grad():  # without autograd, `to_local` hands out the local tensor itself
            return t.to_local()  # type: ignore[attr-defined]
    return t


def _fsdp1_flat_params(model: nn.Module) -> Iterator[Any]:
    """The flat parameters of every FSDP1 (``FullyShardedDataParallel``) unit inside ``model``."""
    for module in model.modules():
        handle = getattr(module, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if flat is not None:
            yield flat


def whole_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Each parameter's whole (unsharded) shape, by its clean name.

    FSDP1 with ``use_orig_params=True`` turns parameters into 1-D views of the local shard and keeps their shapes
    with its flat parameters; a ``DTensor`` reports its global shape itself.

    Raises:
        ShardingError: For FSDP1 with ``use_orig_params=False`` (the original parameters are not reachable).
    """
    by_id: dict[int, torch.Size] = {}
    for flat in _fsdp1_flat_params(model):
        params = getattr(flat, "_params", None)
        if params is None:
            raise ShardingError(
                "FSDP runs with `use_orig_params=False`, so the original parameters (and their names) are not"
                " reachable for masking. Use `FSDPStrategy(use_orig_params=True)` (Lightning's default)."
            )
        by_id.update({id(p): torch.Size(shape) for p, shape in zip(params, flat._shapes, strict=True)})
    return {clean_name(name): by_id.get(id(p), p.shape) for name, p in model.named_parameters()}


@contextmanager
def restore_flat_grads(model: nn.Module) -> Iterator[None]:
    """Put back the gradients of FSDP1's flat parameters on exit; they are not in ``model.parameters()``."""
    saved = [(flat, flat.grad) for flat in _fsdp1_flat_params(model)]
    try:
        yield
    finally:
        for flat, grad in saved:
            flat.grad = grad


@dataclass(frozen=True)
class Shard:
    """This process's part of one weight: a contiguous slice of the weight's row-major flattening.

    Attributes:
        shape: The whole weight's shape.
        start: Where this process's slice starts.
        counts: How many elements each rank holds, in rank order (slices follow each other).
    """

    shape: torch.Size
    start: int
    counts: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements of the whole weight."""
        return math.prod(self.shape)

    def take(self, whole: Tensor, like: Tensor) -> Tensor:
        """This process's part of ``whole`` (shaped like the whole weight), shaped like the local tensor ``like``."""
        return whole.reshape(-1)[self.start : self.start + like.numel()].view(like.shape)


def _check_placement(name: str, param: Tensor, world_size: int) -> None:
    if not is_dtensor(param):
        return
    mesh, placements = param.device_mesh, param.placements  # type: ignore[attr-defined]
    row_sharded = len(placements) == 1 and placements[0].is_shard(0)
    if not row_sharded or mesh.mesh.flatten().tolist() != list(range(world_size)):
        raise ShardingError(
            f"`{name}` is a DTensor with placements {tuple(placements)} on a mesh of shape {tuple(mesh.mesh.shape)};"
            " masks follow only row-wise sharding over all processes (`fully_shard` on a 1-D mesh of every rank,"
            " `Shard(0)`). Use `ModelParallelStrategy(tensor_parallel_size=1)`, or `exclude` this parameter."
        )


def shard_layout(
    params: Mapping[str, Tensor], shapes: Mapping[str, Sequence[int]], group: Any = None
) -> dict[str, Shard]:
    """Find where each rank's slice of each weight starts. A collective: every rank calls it with the same names.

    Args:
        params: Each weight as this process holds it (a local shard view, or a ``DTensor``).
        shapes: Each weight's whole shape.
        group: The process group. Defaults to ``None`` (the default group).

    Returns:
        The :class:`Shard` of each weight on this rank.

    Raises:
        ShardingError: If a weight is not split into consecutive, non-overlapping slices across all ranks.
    """
    import torch.distributed as dist

    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    for name, param in params.items():
        _check_placement(name, param, world_size)
    table = all_gather_ints([local_tensor(p).numel() for p in params.values()], group)  # [rank][weight]
    layout: dict[str, Shard] = {}
    for index, name in enumerate(params):
        shape = torch.Size(shapes[name])
        counts = tuple(row[index] for row in table)
        if sum(counts) != math.prod(shape):
            raise ShardingError(
                f"The ranks hold {list(counts)} elements of `{name}` {tuple(shape)} ({math.prod(shape)} in all), so"
                " it is not split into non-overlapping slices across all processes (replicated, `NO_SHARD` or"
                " hybrid sharding). Use FSDP's `FULL_SHARD` or `SHARD_GRAD_OP`, `fully_shard` over every rank, or"
                " `strategy='ddp'` for replicated training."
            )
        layout[name] = Shard(shape, sum(counts[:rank]), counts)
    return layout


def gather_packed_mask(local: Tensor, shard: Shard, group: Any = None) -> Tensor:
    """Assemble the whole mask of one weight from every rank's slice and pack it (1 bit per weight, on CPU).

    A collective. Extra memory: the whole mask of this one weight as bytes, plus one padded slice per rank.
    """
    import torch.distributed as dist

    device = collective_device(group) or local.device
    width = max(shard.counts)
    padded = torch.zeros(width, dtype=torch.uint8, device=device)
    padded[: local.numel()] = local.reshape(-1).to(device, torch.uint8)
    gathered = [torch.empty_like(padded) for _ in shard.counts]
    dist.all_gather(gathered, padded, group=group)
    whole = torch.cat([g[:count].cpu() for g, count in zip(gathered, shard.counts, strict=True)]).bool()
    return pack_mask(whole.view(shard.shape))


def select_shard_masks(
    scores: Mapping[str, Tensor],
    shards: Mapping[str, Shard],
    nonzero: Sequence[bool],
    sparsity: float,
    scope: str,
    all_reduce_sum: Callable[[Tensor], Tensor],
) -> tuple[dict[str, Tensor], list[TensorSparsity], list[str], dict[str, Tensor]]:
    """Select on a sharded model, every rank together.

    Returns each rank's masks of its shards, and for all ranks the kept counts per tensor, the tensors whose scores
    are all zero (``nonzero`` is this rank's view) and the whole masks, bit-packed.

    Raises:
        ScoringError: If the scores cannot be ranked (not finite).
    """
    try:
        kept = select_masks_distributed(scores, {name: shard.numel for name, shard in shards.items()}, sparsity, scope)
    except ValueError as error:
        raise ScoringError(
            f"{error} Check the data and the initialization; with `precision='16-mixed'` try 'bf16-mixed'."
        ) from None
    counts = torch.tensor(
        [[int(kept[n].sum()), int(z)] for n, z in zip(scores, nonzero, strict=True)], dtype=torch.int64
    )
    counts = all_reduce_sum(counts)
    rows = [
        TensorSparsity(name, tuple(shard.shape), int(counts[i, 0]), shard.numel)
        for i, (name, shard) in enumerate(shards.items())
    ]
    dead = [name for i, name in enumerate(scores) if not counts[i, 1]]
    packed = {name: gather_packed_mask(kept[name], shards[name]) for name in kept}  # collectives
    return kept, rows, dead, packed
