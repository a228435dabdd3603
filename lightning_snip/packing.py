"""Masks as bits, for checkpoints and compressed files, and the callback's checkpoint state built from them.

Bits are row-major, most significant bit first: 1 bit per weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_snip.selection import _chunks

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool mask into bits: row-major, most significant bit first, ``ceil(numel / 8)`` bytes on CPU.

    Example::

        >>> pack_mask(torch.tensor([[True, False, True], [True, True, True]]))
        tensor([188], dtype=torch.uint8)
    """
    flat = mask.detach().reshape(-1)
    packed = torch.empty((flat.numel() + 7) // 8, dtype=torch.uint8)
    for start, part in _chunks(flat):  # _CHUNK is a multiple of 8
        part = part.cpu()
        if part.numel() % 8:
            part = torch.cat([part, part.new_zeros(8 - part.numel() % 8)])
        packed[start // 8 : start // 8 + part.numel() // 8] = (part.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS).sum(1)
    return packed


def unpack_mask(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_mask`.

    Raises:
        ValueError: If ``packed`` does not hold exactly ``ceil(prod(shape) / 8)`` bytes.

    Example::

        >>> unpack_mask(torch.tensor([188], dtype=torch.uint8), (2, 3))
        tensor([[ True, False,  True],
                [ True,  True,  True]])
    """
    total = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (total + 7) // 8:
        raise ValueError(
            f"A packed mask of shape {tuple(shape)} needs {(total + 7) // 8} uint8 bytes, got {packed.numel()}"
            f" {packed.dtype} values."
        )
    out = torch.empty(total, dtype=torch.bool)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    for start, part in _chunks(packed):
        bits = ((part.cpu().unsqueeze(1) >> shifts) & 1).view(-1).bool()
        begin = start * 8
        out[begin : begin + bits.numel()] = bits[: max(0, min(bits.numel(), total - begin))]
    return out.reshape(tuple(shape))


#: The version of the callback's checkpoint state: 1 held bool masks; 2 holds bit-packed masks and their shapes.
STATE_VERSION = 2


def pack_state(
    packed: Mapping[str, Tensor], shapes: Mapping[str, Sequence[int]], config: Mapping[str, Any]
) -> dict[str, Any]:
    """The callback's checkpoint state from bit-packed masks (:func:`pack_mask`), their shapes and the options.

    It holds tensors and plain values only, so it reads back with ``weights_only=True``.
    """
    return {
        "version": STATE_VERSION,
        "config": dict(config),
        "masks": dict(packed),
        "shapes": {name: list(shape) for name, shape in shapes.items()},
    }


def unpack_state(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The whole masks (bool, on CPU) and the options of a state written by :func:`pack_state` or version 1.

    Raises:
        ValueError: If the state is not one of ours, or a mask lacks its shape.
    """
    version = state.get("version", 1)
    masks = state.get("masks")
    shapes = state.get("shapes", {})
    if version not in (1, 2) or not isinstance(masks, Mapping) or not isinstance(shapes, Mapping):
        raise ValueError(
            "The `SNIPPruning` state must hold 'masks' by parameter name (bool tensors in version 1, bit-packed"
            f" with 'shapes' in version 2); got version {version!r} with {type(masks).__name__} masks. Was the"
            " checkpoint written by another callback or a newer lightning-snip?"
        )
    if version == 1:
        if not all(isinstance(m, Tensor) and m.dtype == torch.bool for m in masks.values()):
            raise ValueError("The version-1 `SNIPPruning` state must hold 'masks', a dict of bool tensors.")
        unpacked = {name: mask.cpu() for name, mask in masks.items()}
    else:
        missing = sorted(set(masks) - set(shapes))
        if missing:
            raise ValueError(f"The `SNIPPruning` state lacks the 'shapes' of masks {missing}.")
        unpacked = {name: unpack_mask(packed, shapes[name]) for name, packed in masks.items()}
    config = state.get("config")
    return unpacked, dict(config) if isinstance(config, Mapping) else None


def differing(held: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """The options in ``current`` that differ from ``held`` (those the masks were made with), as text.

    Example::

        >>> differing({"sparsity": 0.9, "num_batches": 1}, {"sparsity": 0.9, "num_batches": 2})
        ['num_batches=1 (this instance: 2)']
    """
    if held is None:
        return []
    return [
        f"{key}={held.get(key)!r} (this instance: {value!r})"
        for key, value in current.items()
        if key in held and held[key] != value
    ]
