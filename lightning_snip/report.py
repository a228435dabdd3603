"""How sparse tensors are, measured from their values, and the table the callback prints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from lightning_snip.enforcement import _zero_counts


@dataclass(frozen=True)
class TensorSparsity:
    """How sparse one tensor is.

    Attributes:
        name: Parameter name.
        shape: Tensor shape.
        kept: Number of non-zero (kept) entries.
        total: Number of entries.
    """

    name: str
    shape: tuple[int, ...]
    kept: int
    total: int

    @property
    def sparsity(self) -> float:
        """Fraction of entries that are zero."""
        return 1.0 - self.kept / self.total if self.total else 0.0


def sparsity_report(weights: Mapping[str, Tensor]) -> list[TensorSparsity]:
    """Measure each tensor's sparsity from its values (zeros count as pruned).

    Example::

        >>> import torch
        >>> [r.sparsity for r in sparsity_report({"w": torch.tensor([[0.0, 2.0], [0.0, 0.0]])})]
        [0.75]
    """
    return [
        TensorSparsity(name, tuple(w.shape), w.numel() - zeros, w.numel())
        for (name, w), zeros in zip(weights.items(), _zero_counts(weights.values()), strict=True)
    ]


def format_report(rows: Sequence[TensorSparsity]) -> str:
    """Render a per-tensor table (tensor, shape, kept, sparsity) with a total line."""
    kept = sum(r.kept for r in rows)
    total = sum(r.total for r in rows)
    table = [("tensor", "shape", "kept", "sparsity")]
    table += [(r.name, str(tuple(r.shape)), f"{r.kept:,}/{r.total:,}", f"{r.sparsity:.2%}") for r in rows]
    table.append(("total", "", f"{kept:,}/{total:,}", f"{1 - kept / total if total else 0.0:.2%}"))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)
