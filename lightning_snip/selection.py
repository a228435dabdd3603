"""From scores to masks: the exact count rule over all candidates, per tensor, or N:M.

Plain PyTorch, no Lightning. Masks are bool tensors shaped like their weights; ``True`` means kept. Selection works
through each tensor in chunks (a few tens of MB of extra memory whatever the model size) and finds the threshold by
a radix select, so it is exact past ``2**31`` weights and across the processes of a sharded model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

Scope = str
"""``"global"``, ``"layerwise"``, ``"constant_fan_in"`` or ``"N:M"`` (e.g. ``"2:4"``): see :func:`select_masks`."""

#: The scope whose masks keep the same number of inputs in every output unit (row) of a tensor.
CONSTANT_FAN_IN = "constant_fan_in"


def kept_count(total: int, sparsity: float) -> int:
    """Number of weights kept out of ``total``: ``total - round(sparsity * total)`` (Python's rounding).

    Example::

        >>> kept_count(1000, 0.95), kept_count(7, 0.5), kept_count(10, 0.0)
        (50, 3, 10)
    """
    return total - round(sparsity * total)


# Selection works through each tensor in chunks of this many elements, so its extra memory is a few tens of MB
# whatever the model size: no concatenation of all scores, no sort, no topk (which fail past 2**31 elements).
_CHUNK = 1 << 20
_BINS = 1 << 16


def _chunks(t: Tensor) -> Iterator[tuple[int, Tensor]]:
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield start, flat[start : start + _CHUNK]


def _is_wide(scores: Sequence[Tensor]) -> bool:
    """Whether the scores are compared in float64 (any of them is float64), else in float32."""
    return any(s.dtype == torch.float64 for s in scores)


def _sort_keys(chunk: Tensor, wide: bool = False) -> Tensor:
    """Integer keys ordered like the chunk's values (all finite values, negatives too).

    int32 keys of the values as float32, or (``wide``) int64 keys of the values as float64, which keep the order of
    float64 scores that float32 cannot hold (SynFlow's, beyond float32's range on deep networks).
    """
    if wide:
        bits = chunk.to(torch.float64).contiguous().view(torch.int64)
        return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
    bits = chunk.to(torch.float32).contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _histogram(scores: Sequence[Tensor], prefix: int | None, depth: int, wide: bool) -> Tensor:
    """Histogram of the keys' 16-bit digit number ``depth`` (0 = the highest).

    Over the keys whose higher digits are ``prefix``; over all keys at depth 0.
    """
    shift = (64 if wide else 32) - 16 * (depth + 1)
    hist = torch.zeros(_BINS, dtype=torch.int64)
    for s in scores:
        for _, chunk in _chunks(s):
            keys = _sort_keys(chunk, wide)
            digits = keys >> shift if shift else keys
            if prefix is None:  # the highest digit is signed: shift it to [0, _BINS)
                hist += torch.bincount(digits + _BINS // 2, minlength=_BINS).cpu()
            else:  # keys outside the prefix are counted in one extra bin, then dropped (cheaper than selecting them)
                inside = torch.where((keys >> (shift + 16)) == prefix, digits & (_BINS - 1), _BINS)
                hist += torch.bincount(inside, minlength=_BINS + 1)[:_BINS].cpu()
    return hist


def _kth_bin(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry (1-based) and how many entries lie in higher bins."""
    from_top = hist.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor(k)))
    bin_index = _BINS - 1 - position
    return bin_index, int(from_top[position]) - int(hist[bin_index])


def kth_largest_key(
    scores: Sequence[Tensor], k: int, all_reduce_sum: Callable[[Tensor], Tensor] | None = None
) -> tuple[int, int]:
    """Find the k-th largest score exactly by a two-pass radix select over 16-bit histograms.

    Args:
        scores: Finite score tensors (compared as float32, or as float64 when any of them is float64).
        k: Rank of the wanted score, ``1 <= k <= N``.
        all_reduce_sum: Sums a histogram across processes, when the scores are spread over ranks (each rank passes
            its own shards). Defaults to ``None`` (one process).

    Returns:
        ``(key, above)``: the sort key of the k-th largest score and how many scores are strictly larger.
        ``k - above`` of the scores equal to it are kept.

    Example::

        >>> kth_largest_key([torch.tensor([3.0, 1.0]), torch.tensor([2.0, 3.0])], k=3)[1]  # 3, 3 above the 2
        2
    """
    return _threshold(scores, k, all_reduce_sum)[:2]


def _threshold(
    scores: Sequence[Tensor], k: int, all_reduce_sum: Callable[[Tensor], Tensor] | None
) -> tuple[int, int, int]:
    """:func:`kth_largest_key`, plus how many scores equal the k-th largest (read off the last histogram).

    One pass per 16-bit digit of the keys: two for float32 keys, four for float64 ones.
    """
    reduce = all_reduce_sum or (lambda t: t)
    wide = _is_wide(scores)
    prefix: int | None = None
    above = 0
    hist = torch.zeros(0)
    bin_index = 0
    for depth in range(4 if wide else 2):
        hist = reduce(_histogram(scores, prefix, depth, wide))
        bin_index, above_bin = _kth_bin(hist, k - above)
        above += above_bin
        prefix = bin_index - _BINS // 2 if prefix is None else prefix * _BINS + bin_index
    assert prefix is not None
    return prefix, above, int(hist[bin_index])


def all_finite(t: Tensor) -> bool:
    """Whether every entry is finite, checked chunk by chunk (no full-size temporary).

    Example::

        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("inf")]))
        (True, False)
    """
    # a sum is finite only if every term is (nan and inf propagate); a finite-but-overflowing sum gets the full check
    return all(math.isfinite(chunk.sum()) or bool(torch.isfinite(chunk).all()) for _, chunk in _chunks(t))


TieQuotas = Callable[[Sequence[Tensor], int, int], Sequence[int]]
"""Given the tensors, the threshold key and how many ties to keep, how many ties each tensor keeps."""


def _top_k(
    scores: Sequence[Tensor],
    k: int,
    total: int,
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
    tie_quotas: TieQuotas | None = None,
) -> list[Tensor]:
    """Masks keeping the ``k`` highest of ``total`` scores; ties go to the earlier position.

    By default the ties are given greedily in tensor order; the distributed path passes ``tie_quotas`` instead.
    """
    if k >= total:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    if k <= 0:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    key, above, ties = _threshold(scores, k, all_reduce_sum)
    wide = _is_wide(scores)
    if ties == k - above:  # every score equal to the threshold is kept (the rule with continuous scores)
        return [_compare(s, key, torch.ge, wide) for s in scores]
    quotas = tie_quotas(scores, key, k - above) if tie_quotas is not None else None
    ties_left = k - above
    masks = []
    for index, s in enumerate(scores):
        if quotas is not None:
            ties_left = quotas[index]
        kept = _compare(s, key, torch.gt, wide)
        if ties_left > 0:
            flat = kept.view(-1)
            for start, chunk in _chunks(s):
                tied = (_sort_keys(chunk, wide) == key).nonzero().squeeze(1)[:ties_left]
                flat[start + tied] = True
                ties_left -= tied.numel()
                if ties_left == 0:
                    break
        masks.append(kept)
    return masks


def _compare(scores: Tensor, key: int, op: Callable[..., Tensor], wide: bool) -> Tensor:
    """``op(sort key, key)`` for every score, written chunk by chunk into one bool tensor shaped like ``scores``."""
    out = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    flat = out.view(-1)
    for start, chunk in _chunks(scores):
        op(_sort_keys(chunk, wide), key, out=flat[start : start + chunk.numel()])
    return out


def _select(
    scores: Mapping[str, Tensor], numels: Mapping[str, int], sparsity: float, scope: Scope, **top_k: Any
) -> dict[str, Tensor]:
    """Apply the count rule to all tensors together (``global``) or to each alone (``layerwise``)."""
    names = list(scores)
    if scope == "global":
        groups = [names]
    elif scope == "layerwise":
        groups = [[name] for name in names]
    else:
        n_m = parse_n_m(scope)
        if n_m is not None:
            raise ValueError(f"`scope={scope!r}` selects within each tensor's rows; it cannot be used here.")
        raise ValueError(f"`scope` must be 'global', 'layerwise' or 'N:M', got {scope!r}.")
    masks: dict[str, Tensor] = {}
    for group in groups:
        total = sum(numels[name] for name in group)
        group_masks = _top_k([scores[name] for name in group], kept_count(total, sparsity), total, **top_k)
        masks.update(zip(group, group_masks, strict=True))
    return masks


def select_masks_distributed(
    local_scores: Mapping[str, Tensor],
    global_numels: Mapping[str, int],
    sparsity: float,
    scope: Scope = "global",
    group: Any = None,
) -> dict[str, Tensor]:
    """:func:`select_masks` for scores sharded across the processes of a ``torch.distributed`` group.

    Every rank passes the same tensor names in the same order; for each tensor, rank ``r`` holds a contiguous slice
    of its row-major flattened scores (possibly empty) and rank ``r + 1`` the slice that follows, as with row-wise
    (``Shard(0)``) or flat-parameter sharding. The threshold is found with all-reduced histograms and the ties at it
    are shared out in the single-process order (tensor, then position), so the concatenated local masks equal
    ``select_masks`` on the whole tensors. Extra memory stays a small constant per rank.

    Args:
        local_scores: This rank's slice of each tensor's scores.
        global_numels: Each tensor's total number of elements over all ranks.
        sparsity: Fraction of weights to prune, in ``[0, 1)``.
        scope: ``"global"`` or ``"layerwise"`` (``"N:M"`` selects within rows, which shards may split). Defaults to
            ``"global"``.
        group: The process group. Defaults to ``None`` (the default group).

    Returns:
        This rank's kept masks (``True`` = kept), shaped like ``local_scores``.

    Raises:
        ValueError: On every rank, if a score on any rank is not finite.
    """
    import torch.distributed as dist

    device = collective_device(group)

    def all_reduce_sum(t: Tensor) -> Tensor:
        t = t.to(device) if device is not None else t.clone()
        dist.all_reduce(t, group=group)
        return t.cpu()

    def tie_quotas(scores: Sequence[Tensor], key: int, ties_left: int) -> list[int]:
        counts = all_gather_ints(_tie_counts(scores, key, _is_wide(scores)), group)  # [rank][tensor]
        rank, quotas = dist.get_rank(group), []
        for t in range(len(scores)):
            for r, row in enumerate(counts):
                take = min(row[t], ties_left)
                ties_left -= take
                if r == rank:
                    quotas.append(take)
        return quotas

    bad = [name for name, s in local_scores.items() if not all_finite(s)]
    if int(all_reduce_sum(torch.tensor([len(bad)]))):  # every rank learns of it, so none waits in a collective
        raise ValueError(f"Scores are not all finite (on this rank: {bad or 'none'}); masks cannot be selected.")
    return _select(local_scores, global_numels, sparsity, scope, all_reduce_sum=all_reduce_sum, tie_quotas=tie_quotas)


def collective_device(group: Any = None) -> torch.device | None:
    """The device collectives of ``group`` need their tensors on: the current CUDA device for NCCL, else ``None``."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None


def all_gather_ints(values: Sequence[int], group: Any = None) -> list[list[int]]:
    """Every rank's ``values`` (the same length on all ranks), in rank order. A collective."""
    import torch.distributed as dist

    local = torch.tensor(values, dtype=torch.int64, device=collective_device(group))
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return [g.tolist() for g in gathered]


def _tie_counts(scores: Sequence[Tensor], key: int, wide: bool) -> list[int]:
    return [sum(int((_sort_keys(chunk, wide) == key).sum()) for _, chunk in _chunks(s)) for s in scores]


def parse_n_m(scope: str) -> tuple[int, int] | None:
    """``(N, M)`` for an ``"N:M"`` scope, ``None`` for ``"global"`` and ``"layerwise"``.

    Raises:
        ValueError: If ``scope`` is none of these, or ``N`` and ``M`` are not integers with ``0 < N < M``.

    Example::

        >>> parse_n_m("2:4"), parse_n_m("global")
        ((2, 4), None)
    """
    if scope in ("global", "layerwise", CONSTANT_FAN_IN):
        return None
    if not isinstance(scope, str):
        raise ValueError(
            f"`scope` must be 'global', 'layerwise', 'constant_fan_in' or 'N:M' (e.g. '2:4'), got {scope!r}."
        )
    parts = scope.split(":")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts) or not 0 < int(parts[0]) < int(parts[1]):
        raise ValueError(
            f"`scope` must be 'global', 'layerwise', 'constant_fan_in' or 'N:M' with integers 0 < N < M (keep N of"
            f" every M consecutive weights, e.g. '2:4'), got {scope!r}."
        )
    return int(parts[0]), int(parts[1])


def check_n_m_sparsity(scope: str, sparsity: float) -> None:
    """Check that an ``"N:M"`` scope comes with ``sparsity == 1 - N/M``, written to at least three decimals.

    ``"2:3"`` accepts 0.333, 0.3333 and ``1 - 2/3``: the masks keep exactly N of every M weights either way.

    Raises:
        ValueError: If it does not, saying which ``sparsity`` to use.
    """
    n_m = parse_n_m(scope)
    if n_m is None:
        return
    target = 1 - n_m[0] / n_m[1]
    if abs(sparsity - target) > 5e-4 + 1e-12:
        raise ValueError(
            f"`scope={scope!r}` keeps {n_m[0]} of every {n_m[1]} weights, so `sparsity` must be 1 - {n_m[0]}/{n_m[1]} ="
            f" {target:.3g}; got {sparsity!r}."
        )


def n_m_rows(shape: Sequence[int]) -> tuple[int, int]:
    """The ``(rows, reduction)`` view N:M groups run along: ``(shape[0], -1)``, a 1-D tensor as one row.

    ``nn.Linear``: ``(out_features, in_features)``; a convolution: ``(out_channels, in_channels * kernel elements)``.
    """
    rows = shape[0] if len(shape) > 1 else 1
    return rows, math.prod(shape) // rows if rows else 0


def n_m_unfit(shapes: Mapping[str, Sequence[int]], m: int) -> list[str]:
    """The tensors whose reduction dimension (see :func:`n_m_rows`) is not a multiple of ``m``: N:M leaves them dense.

    Example::

        >>> n_m_unfit({"fc1": (300, 784), "fc3": (10, 100), "bias": (10,)}, 8)
        ['fc3', 'bias']
    """
    return [name for name, shape in shapes.items() if n_m_rows(shape)[1] % m]


def select_n_m_masks(scores: Mapping[str, Tensor], n: int, m: int) -> dict[str, Tensor]:
    """Keep the ``n`` highest of every ``m`` consecutive scores along each tensor's rows (see :func:`n_m_rows`).

    Ties go to the earlier position; scores are compared as float32 (float64 ones as float64), like
    :func:`select_masks`. A tensor whose
    reduction dimension is not a multiple of ``m`` (:func:`n_m_unfit`) is kept whole.

    Raises:
        ValueError: If a score is not finite.

    Example::

        >>> select_n_m_masks({"w": torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0, 0.0, 5.0, 0.0]])}, 2, 4)["w"].int()
        tensor([[0, 1, 1, 0, 1, 0, 1, 0]], dtype=torch.int32)
    """
    masks = {}
    for name, s in scores.items():
        if not all_finite(s):
            raise ValueError(f"The scores of `{name}` are not all finite; masks cannot be selected from them.")
        rows, width = n_m_rows(tuple(s.shape))
        if width % m:
            masks[name] = torch.ones_like(s, dtype=torch.bool)
            continue
        flat = s.detach().reshape(rows, width)
        kept = torch.zeros((rows, width), dtype=torch.bool, device=s.device)
        step = max(1, _CHUNK // max(width, 1))
        for start in range(0, rows, step):
            groups = _sort_keys(flat[start : start + step].reshape(-1), s.dtype == torch.float64).view(
                -1, width // m, m
            )
            order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
            kept[start : start + step].view(-1, width // m, m).scatter_(-1, order, True)
        masks[name] = kept.view(s.shape)
    return masks


def select_masks(
    scores: Mapping[str, Tensor], sparsity: float, scope: Scope = "global", min_density: float = 0.0
) -> dict[str, Tensor]:
    """Keep the highest scores so that exactly ``round(sparsity * N)`` weights are pruned.

    ``scope="global"`` ranks all scores together (N is the total number of weights); ``"layerwise"`` applies the same
    count rule to each tensor on its own; ``"constant_fan_in"`` spreads each tensor's global count evenly over its
    rows (:func:`select_constant_fan_in`); ``"N:M"`` keeps the ``N`` best of every ``M`` consecutive weights along each
    tensor's rows (:func:`select_n_m_masks`; then ``sparsity`` must be ``1 - N/M``, and a tensor whose rows are not a
    multiple of ``M`` long is kept whole). Equal scores at the threshold are resolved deterministically: the weight
    that comes first (tensor order of ``scores``, then row-major position) is kept. Scores are compared as float32,
    or all as float64 when any of them is float64, so float64 scores beyond float32's range or precision keep their
    order.
    The threshold is found exactly by a radix select over per-chunk histograms, so the extra memory is a small
    constant (no concatenation of all scores) and any number of weights works, also past ``2**31``.

    Args:
        scores: Non-negative, finite scores by name, shaped like their weights.
        sparsity: Fraction of weights to prune, in ``[0, 1)``.
        scope: ``"global"``, ``"layerwise"`` or ``"N:M"``. Defaults to ``"global"``.
        min_density: Every tensor keeps at least ``ceil(min_density * numel)`` weights, its best-scored ones, taken
            from the global budget, so the total stays exact (a guard against layer collapse). Defaults to ``0.0``.

    Returns:
        Bool masks by name (``True`` = kept), on the scores' devices.

    Raises:
        ValueError: If a score is not finite, ``scope`` is malformed or does not fit ``sparsity``, or
            ``min_density`` cannot be met.

    Example::

        >>> scores = {"a": torch.tensor([[4.0, 1.0]]), "b": torch.tensor([3.0, 1.0, 2.0])}
        >>> select_masks(scores, sparsity=0.6)
        {'a': tensor([[ True, False]]), 'b': tensor([ True, False, False])}
        >>> select_masks(scores, sparsity=0.5, scope="layerwise")["b"]
        tensor([ True, False, False])
    """
    n_m = parse_n_m(scope)
    check_min_density(min_density, sparsity, scope, {name: s.numel() for name, s in scores.items()})
    if n_m is not None:
        check_n_m_sparsity(scope, sparsity)
        return select_n_m_masks(scores, *n_m)
    for name, s in scores.items():
        if not all_finite(s):
            raise ValueError(f"The scores of `{name}` are not all finite; masks cannot be selected from them.")
    numels = {name: s.numel() for name, s in scores.items()}
    if scope == CONSTANT_FAN_IN:
        return select_constant_fan_in(scores, sparsity, min_density)
    if min_density <= 0 or scope != "global":  # layerwise keeps at least the density everywhere already
        return _select(scores, numels, sparsity, scope)
    return _select_with_floors(scores, numels, sparsity, min_density)


def select_constant_fan_in(
    scores: Mapping[str, Tensor], sparsity: float, min_density: float = 0.0
) -> dict[str, Tensor]:
    """Masks whose every row (output unit) keeps the same number of its best-scored inputs.

    Each tensor keeps about as many weights as global selection (with ``min_density``) gives it, spread evenly over
    its rows: ``k = max(1, round(count / rows))`` per row, at most the row's length, so a tensor's count is exactly
    ``k * rows`` and the total may differ from the exact global count by less than one weight per row of each
    tensor. Rows are those of :func:`n_m_rows` (``(shape[0], -1)``). Ties go to the earlier position. This is the
    layout the fastest batch-1 sparse kernel reads (every row the same length, as SRigL's condensed layers).

    Example::

        >>> kept = select_constant_fan_in({"w": torch.tensor([[9.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]])}, 0.5)
        >>> kept["w"].int().tolist()  # global keeps 9, 7, 6, 5: 1 and 3 per row; constant fan-in: 2 per row
        [[1, 0, 0, 1], [0, 0, 1, 1]]
    """
    counts = {name: int(m.sum()) for name, m in select_masks(scores, sparsity, "global", min_density).items()}
    masks = {}
    for name, s in scores.items():
        rows, width = n_m_rows(tuple(s.shape))
        k = min(width, max(1, round(counts[name] / rows))) if rows and width else 0
        flat = _sort_keys(s.detach().reshape(-1), s.dtype == torch.float64).view(rows, width)
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
        kept = torch.zeros((rows, width), dtype=torch.bool, device=s.device)
        kept.scatter_(1, order, True)
        masks[name] = kept.view(s.shape)
    return masks


def _floors(numels: Mapping[str, int], min_density: float) -> dict[str, int]:
    return {name: min(n, math.ceil(min_density * n - 1e-9)) for name, n in numels.items()}


def check_min_density(min_density: float, sparsity: float, scope: Scope, numels: Mapping[str, int]) -> None:
    """Check that every tensor can keep ``ceil(min_density * numel)`` weights within the budget ``sparsity`` leaves.

    Raises:
        ValueError: If ``min_density`` is outside ``[0, 1]`` or the combination is impossible, saying why.
    """
    if not 0.0 <= min_density <= 1.0:
        raise ValueError(f"`min_density` must be in [0, 1] (a fraction of each tensor), got {min_density!r}.")
    if min_density == 0:
        return
    n_m = parse_n_m(scope)
    density = n_m[0] / n_m[1] if n_m is not None else 1.0 - sparsity
    if scope not in ("global", CONSTANT_FAN_IN) and min_density > density + 1e-12:
        raise ValueError(
            f"`min_density={min_density}` is more than the {density:.4g} of each tensor that `scope={scope!r}` with"
            f" `sparsity={sparsity}` keeps. Lower `min_density` to at most {density:.4g}."
        )
    if scope in ("global", CONSTANT_FAN_IN) and min_density > density + 1e-12:  # the floors alone exceed the budget
        raise ValueError(
            f"`min_density={min_density}` asks every tensor to keep more than the 1 - sparsity = {density:.4g} of all"
            f" weights that `sparsity={sparsity}` keeps, which no model can. Lower `min_density` to at most"
            f" {density:.4g}, or `sparsity`."
        )
    if scope in ("global", CONSTANT_FAN_IN):
        need, budget = sum(_floors(numels, min_density).values()), kept_count(sum(numels.values()), sparsity)
        if need > budget:
            raise ValueError(
                f"`min_density={min_density}` needs {need:,} weights (at least that fraction of every tensor) but"
                f" `sparsity={sparsity}` keeps only {budget:,}. Lower `min_density` or `sparsity`."
            )


def _select_with_floors(
    scores: Mapping[str, Tensor], numels: Mapping[str, int], sparsity: float, min_density: float
) -> dict[str, Tensor]:
    """Global selection where each tensor first keeps its best ``ceil(min_density * numel)``; the rest by score."""
    floors = _floors(numels, min_density)
    kept = {name: _top_k([s], floors[name], numels[name])[0] for name, s in scores.items()}
    dtype = torch.float64 if _is_wide(list(scores.values())) else torch.float32
    lowest = torch.finfo(dtype).min  # the floor-kept entries rank last in the global pass
    rest = {name: s.to(dtype).masked_fill(kept[name], lowest) for name, s in scores.items()}
    extra_budget = kept_count(sum(numels.values()), sparsity) - sum(floors.values())
    extra = _top_k(list(rest.values()), extra_budget, sum(numels.values()))
    return {name: kept[name] | more for name, more in zip(scores, extra, strict=True)}


def shuffle_masks(masks: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """Permute each mask's entries at random, keeping its count: the per-layer shuffle sanity check.

    Frankle et al. (ICLR 2021) found that shuffling each layer's mask this way did not hurt SNIP, GraSP or SynFlow:
    much of their value is in the per-layer densities. The permutation comes from ``generator`` alone.

    Example::

        >>> m = shuffle_masks({"w": torch.tensor([True, True, False, False])}, torch.Generator().manual_seed(0))["w"]
        >>> int(m.sum())
        2
    """
    out = {}
    for name, mask in masks.items():
        order = torch.randperm(mask.numel(), generator=generator).to(mask.device)
        out[name] = mask.reshape(-1)[order].view(mask.shape)
    return out


def protect_slices_(scores: Tensor, dim: int | None) -> int:
    """Raise the best score of every slice along ``dim`` above all others, so selection keeps it; in place.

    Used where pruning a whole slice would break the model (weight normalization divides each slice by its norm).
    The raised score is the largest finite value of the scores' comparison dtype (float32, or float64 for float64
    scores), so the exact count still holds: the slices' best weights are
    kept first and the rest of the budget goes by score, as before. Ties go to the earlier position.

    Args:
        scores: Finite scores of one tensor.
        dim: The dimension whose slices each keep one weight; ``None`` for the whole tensor as one slice.

    Returns:
        The number of slices, that is of weights now certain to be kept.

    Example::

        >>> s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
        >>> protect_slices_(s, 0), (s == torch.finfo(torch.float32).max).tolist()
        (2, [[False, True], [True, False]])
    """
    if scores.numel() == 0:
        return 0
    top = torch.finfo(torch.float64 if scores.dtype == torch.float64 else torch.float32).max
    if dim is None:
        scores.view(-1)[int(scores.reshape(-1).argmax())] = top
        return 1
    view = scores.movedim(dim, 0)
    best = view.reshape(view.shape[0], -1).argmax(dim=1)
    index = [torch.arange(view.shape[0], device=scores.device)]
    if view.ndim > 1:
        index += list(torch.unravel_index(best, view.shape[1:]))
    view[tuple(index)] = top
    return int(view.shape[0])
