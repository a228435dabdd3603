"""Masks as bits, for checkpoints and compressed files: 1 bit per weight, row-major, most significant bit first."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
