"""Keeping pruned weights at exactly zero: the per-step zeroing and which optimizers keep zeros by themselves.

Plain PyTorch, no Lightning. Masks are bool tensors shaped like their weights; ``True`` means kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

_T = TypeVar("_T", bound="Tensor | None")


def _to_host(values: Sequence[Tensor]) -> list[Any]:
    """0-dim tensors (on any devices) as Python numbers, with one synchronization: all are computed before a copy."""
    return torch.stack([v.cpu() for v in values]).tolist() if values else []


_BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(tensor: Tensor) -> Tensor | None:
    """The tensor's storage viewed as integers of the same width (no copy), or ``None`` where there is none."""
    dtype = _BITS_OF_SIZE.get(tensor.element_size())
    return None if dtype is None else tensor.view(dtype)


class MaskSet:
    """Bool masks prepared once for the per-step zeroing of a fixed list of tensors (their weights or gradients).

    Zeroing multiplies each tensor's bits, viewed as integers of the same width, by its mask viewed as uint8: one fused
    ``_foreach_mul_`` per device. A pruned entry becomes exactly ``+0.0`` whatever it held, ``inf`` and ``nan``
    included, so no finiteness check, no fallback and no host synchronization are needed, and kept entries are
    untouched bit for bit. :func:`apply_masks_` does the same for one call; a callback that zeroes the same tensors on
    every step keeps a ``MaskSet``, so the per-step work is only the multiply.

    Args:
        kept: Bool masks, ``True`` where kept, each on the device of the tensor it will zero.

    Raises:
        TypeError: If a mask is not a bool tensor.

    Example::

        >>> masks = MaskSet([torch.tensor([True, False, False])])
        >>> w = torch.tensor([1.0, float("inf"), -2.0])
        >>> masks.zero_([w])
        >>> w
        tensor([1., 0., 0.])
    """

    def __init__(self, kept: Iterable[Tensor]) -> None:
        self.kept = tuple(kept)
        bad = [tuple(m.shape) for m in self.kept if m.dtype != torch.bool]
        if bad:
            raise TypeError(f"`kept` must hold bool masks (True = kept); got non-bool masks of shapes {bad}.")
        self._factors = tuple(m.view(torch.uint8) for m in self.kept)

    def __len__(self) -> int:
        return len(self.kept)

    def _aligned(self, tensors: Iterable[_T]) -> list[_T]:
        values = list(tensors)
        if len(values) != len(self.kept):
            raise ValueError(f"Got {len(values)} tensors for {len(self.kept)} masks; pass one tensor per mask.")
        for index, (value, mask) in enumerate(zip(values, self.kept, strict=True)):
            if value is not None and value.shape != mask.shape:  # an elementwise op would broadcast the mask silently
                raise ValueError(
                    f"Tensor {index} has shape {tuple(value.shape)} but its mask {tuple(mask.shape)}; pass the tensors"
                    " the masks were made for, in the same order."
                )
        return values

    @torch.no_grad()
    def zero_(self, tensors: Iterable[Tensor | None]) -> None:
        """Set the pruned entries of each tensor to exactly zero, in place; ``None`` (no gradient) is skipped.

        Args:
            tensors: One tensor (or ``None``) per mask, in the masks' order, shaped like its mask.

        Raises:
            ValueError: If the number of tensors differs from the number of masks, or a tensor's shape from its
                mask's (a multiply would broadcast the mask silently).
        """
        groups: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
        for value, factor, mask in zip(self._aligned(tensors), self._factors, self.kept, strict=True):
            if value is None:
                continue
            bits = _as_bits(value)
            if bits is None:  # no integer of that width (complex128): overwrite instead
                value.masked_fill_(~mask, 0)
                continue
            group = groups.setdefault(value.device, ([], []))
            group[0].append(bits)
            group[1].append(factor)
        for bits_list, factors in groups.values():
            torch._foreach_mul_(bits_list, factors)

    @torch.no_grad()
    def count_pruned_nonzero(self, tensors: Iterable[Tensor]) -> list[int]:
        """Number of pruned entries of each tensor that are not zero (``nan`` counts).

        All zeros when the tensors respect the masks, found with one device synchronization; tensors that do not
        respect them are then counted exactly. Run occasionally (it allocates temporaries, one tensor at a time), not
        on every step.

        Args:
            tensors: One tensor per mask, in the masks' order, shaped like its mask.

        Raises:
            ValueError: If the number of tensors differs from the number of masks, or a tensor's shape from its
                mask's.

        Example::

            >>> MaskSet([torch.tensor([True, False, False])]).count_pruned_nonzero([torch.tensor([5.0, 0.0, 2.0])])
            [1]
        """
        values = self._aligned(tensors)
        if not values:
            return []
        # the largest pruned magnitude first (nan if any is nan): a vectorized multiply and max, where counting
        # booleans is several times slower on CPU; the exact count only for tensors that have one
        flags = _to_host([_largest_pruned(v, m) for v, m in zip(values, self.kept, strict=True)])
        return [int(((v != 0) & ~m).sum()) if f != 0 else 0 for v, m, f in zip(values, self.kept, flags, strict=True)]


def _largest_pruned(value: Tensor, kept: Tensor) -> Tensor:
    """The largest magnitude among the pruned entries of ``value`` (``nan`` if one is ``nan``), as a 0-dim float."""
    bits = _as_bits(value)
    if value.is_floating_point() and bits is not None and value.numel():
        return torch.mul(bits, (~kept).view(torch.uint8)).view(value.dtype).abs_().amax().float()
    return ((value != 0) & ~kept).any().float()


#: PyTorch optimizers whose update of an entry depends only on that entry's weight, gradient and optimizer state,
#: and is exactly zero when all of them are zero: weight decay (``wd * 0``), momentum and first moments (``0``) and
#: adaptive denominators (``eps`` at least) included. With masked gradients and zeroed state they keep a pruned weight
#: at exactly zero by themselves. Exact classes only: a subclass may change ``step``.
ZERO_PRESERVING_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
    torch.optim.Rprop,
    torch.optim.ASGD,
)


def keeps_zeros(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` leaves a weight at exactly zero when its gradient and optimizer state are zero.

    True for the exact classes in :data:`ZERO_PRESERVING_OPTIMIZERS`; False for anything else (L-BFGS, Muon,
    subclasses, third-party optimizers), whose pruned weights must be re-zeroed after every step.

    Example::

        >>> keeps_zeros(torch.optim.AdamW([torch.zeros(2, requires_grad=True)]))
        True
    """
    return type(optimizer) in ZERO_PRESERVING_OPTIMIZERS


def holds_nonzero(tensors: Iterable[Tensor]) -> list[bool]:
    """Whether each real tensor has an entry that is not zero (``nan`` counts), with one device synchronization.

    Example::

        >>> holds_nonzero([torch.zeros(3), torch.tensor([0.0, -1.0]), torch.zeros(0)])
        [False, True, False]
    """
    return _to_host(
        [
            torch.stack(torch.aminmax(t.detach().reshape(-1))).ne(0).any()
            if t.numel()
            else torch.zeros((), dtype=torch.bool, device=t.device)
            for t in tensors
        ]
    )


def apply_masks_(tensors: Iterable[Tensor | None], kept: Iterable[Tensor]) -> None:
    """Set the pruned entries (``kept`` is False) of each tensor to exactly zero, in place; ``None`` is skipped.

    One call of :meth:`MaskSet.zero_`: exact whatever the pruned entries held, ``inf`` and ``nan`` included.

    Args:
        tensors: Weights or gradients.
        kept: Bool masks, ``True`` where kept.

    Example::

        >>> w = torch.tensor([1.0, float("nan"), 3.0])
        >>> apply_masks_([w], [torch.tensor([True, False, False])])
        >>> w
        tensor([1., 0., 0.])
    """
    MaskSet(kept).zero_(tensors)


def _zero_counts(tensors: Iterable[Tensor]) -> list[int]:
    """Each tensor's number of entries equal to zero, with a single device synchronization."""
    return _to_host([t.numel() - torch.count_nonzero(t) for t in tensors])  # faster than summing `t == 0` on CPU


def count_zeros(tensors: Iterable[Tensor]) -> int:
    """Number of entries equal to zero over all tensors, with a single device synchronization."""
    return sum(_zero_counts(tensors))
