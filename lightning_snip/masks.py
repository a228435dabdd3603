"""From scores to masks, and keeping masked weights at zero.

Plain PyTorch, no Lightning. Masks are bool tensors shaped like their weights; ``True`` means kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Scope = Literal["global", "layerwise"]


def kept_count(total: int, sparsity: float) -> int:
    """Number of weights kept out of ``total``: ``total - round(sparsity * total)`` (Python's rounding).

    Example::

        >>> kept_count(1000, 0.95), kept_count(7, 0.5), kept_count(10, 0.0)
        (50, 3, 10)
    """
    return total - round(sparsity * total)


def _top_k(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """Masks keeping exactly the ``k`` highest scores over all tensors; ties go to the earlier position."""
    total = sum(s.numel() for s in scores)
    if k >= total:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    if k <= 0:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    device = scores[0].device
    flat = torch.cat([s.detach().reshape(-1).to(device=device, dtype=torch.float32) for s in scores])
    threshold = torch.kthvalue(flat, total - k + 1).values  # the k-th largest score
    del flat
    thresholds = [threshold.to(s.device, s.dtype) for s in scores]
    masks = [s > t for s, t in zip(scores, thresholds, strict=True)]
    ties_left = k - sum(int(m.sum()) for m in masks)
    for s, t, kept in zip(scores, thresholds, masks, strict=True):
        if ties_left <= 0:
            break
        positions = (s == t).reshape(-1).nonzero().squeeze(1)[:ties_left]
        kept.view(-1)[positions] = True
        ties_left -= positions.numel()
    return masks


def select_masks(scores: Mapping[str, Tensor], sparsity: float, scope: Scope = "global") -> dict[str, Tensor]:
    """Keep the highest scores so that exactly ``round(sparsity * N)`` weights are pruned.

    ``scope="global"`` ranks all scores together (N is the total number of weights); ``"layerwise"`` applies the same
    count rule to each tensor on its own. Equal scores at the threshold are resolved deterministically: the weight
    that comes first (tensor order of ``scores``, then row-major position) is kept.

    Args:
        scores: Non-negative, finite scores by name, shaped like their weights.
        sparsity: Fraction of weights to prune, in ``[0, 1)``.
        scope: ``"global"`` or ``"layerwise"``. Defaults to ``"global"``.

    Returns:
        Bool masks by name (``True`` = kept), on the scores' devices.

    Raises:
        ValueError: If a score is not finite.

    Example::

        >>> scores = {"a": torch.tensor([[4.0, 1.0]]), "b": torch.tensor([3.0, 1.0, 2.0])}
        >>> select_masks(scores, sparsity=0.6)
        {'a': tensor([[ True, False]]), 'b': tensor([ True, False, False])}
        >>> select_masks(scores, sparsity=0.5, scope="layerwise")["b"]
        tensor([ True, False, False])
    """
    names = list(scores)
    for name in names:
        if not torch.isfinite(scores[name]).all():
            raise ValueError(f"The scores of `{name}` are not all finite; masks cannot be selected from them.")
    tensors = [scores[n] for n in names]
    if scope == "global":
        masks = _top_k(tensors, kept_count(sum(t.numel() for t in tensors), sparsity))
    elif scope == "layerwise":
        masks = [_top_k([t], kept_count(t.numel(), sparsity))[0] for t in tensors]
    else:
        raise ValueError(f"`scope` must be 'global' or 'layerwise', got {scope!r}.")
    return dict(zip(names, masks, strict=True))


@torch.no_grad()
def zero_pruned_(tensors: Iterable[Tensor | None], pruned: Iterable[Tensor]) -> None:
    """Set the pruned entries of each tensor to exactly ``0.0`` in place; ``None`` entries are skipped.

    Used for weights after every optimizer step and for gradients after every backward. ``masked_fill_`` (not a
    multiplication) so that a pruned entry becomes 0 even if it held ``inf`` or ``nan``.

    Args:
        tensors: Weights or gradients.
        pruned: Bool masks, ``True`` where pruned (the complement of the kept masks).

    Example::

        >>> w = torch.tensor([1.0, float("nan"), 3.0])
        >>> zero_pruned_([w], [torch.tensor([False, True, True])])
        >>> w
        tensor([1., 0., 0.])
    """
    for tensor, mask in zip(tensors, pruned, strict=True):
        if tensor is not None:
            tensor.masked_fill_(mask, 0.0)


def count_zeros(tensors: Iterable[Tensor]) -> int:
    """Number of entries equal to zero over all tensors, with a single device synchronization."""
    counts = [(t == 0).sum() for t in tensors]
    return int(torch.stack([c.cpu() for c in counts]).sum()) if counts else 0


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

        >>> [r.sparsity for r in sparsity_report({"w": torch.tensor([[0.0, 2.0], [0.0, 0.0]])})]
        [0.75]
    """
    zeros = [(w == 0).sum() for w in weights.values()]
    counts = torch.stack([z.cpu() for z in zeros]).tolist() if zeros else []
    return [
        TensorSparsity(name, tuple(w.shape), w.numel() - int(z), w.numel())
        for (name, w), z in zip(weights.items(), counts, strict=True)
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
