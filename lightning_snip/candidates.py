"""Which parameters of a model are candidates for pruning.

Plain PyTorch, no Lightning: usable from any training loop.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

from torch import nn

from lightning_snip.sharding import clean_name

# Modules whose parameters are never pruned by default, whatever their shape.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)

_MAX_LISTED_NAMES = 30


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Map each parameter's canonical name to all names it is reachable under.

    The canonical name is the one :meth:`torch.nn.Module.named_parameters` yields (its first occurrence); a
    parameter shared by several modules (tied weights) has one canonical name and several aliases. Names are those of
    the unwrapped model: the prefixes FSDP and activation checkpointing insert are removed.

    Args:
        model: The model to inspect.

    Returns:
        ``{canonical_name: [canonical_name, alias, ...]}`` in ``named_parameters()`` order.

    Example::

        >>> emb = nn.Embedding(10, 4)
        >>> head = nn.Linear(4, 10, bias=False)
        >>> head.weight = emb.weight
        >>> parameter_aliases(nn.ModuleDict({"emb": emb, "head": head}))
        {'emb.weight': ['emb.weight', 'head.weight']}
    """
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(clean_name(name))
    return {names[0]: names for names in by_id.values()}


def _is_default_candidate(name_aliases: list[str], ndim: int, param: nn.Parameter, norm_ids: set[int]) -> bool:
    if ndim < 2 or id(param) in norm_ids or param.is_complex():  # norm_ids: normalization layers and weight-norm gains
        return False
    return not any("bias" in alias.rsplit(".", 1)[-1] for alias in name_aliases)


def _check_patterns(argument: str, patterns: Sequence[str], names: list[str]) -> None:
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            listed = ", ".join(names[:_MAX_LISTED_NAMES]) + (" ..." if len(names) > _MAX_LISTED_NAMES else "")
            raise ValueError(
                f"`{argument}` pattern {pattern!r} matches no parameter of the model. Patterns are shell-style globs"
                f" over the names of `named_parameters()`, for example 'features.*.weight'. Parameters: {listed}"
            )


def find_candidates(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, nn.Parameter]:
    """Select the parameters to prune.

    By default every trainable parameter with ``ndim >= 2`` is a candidate (Linear, ConvNd, RNN/LSTM/GRU matrices,
    Embedding, MultiheadAttention projections), except biases (any name containing ``bias``), the parameters of
    normalization layers, complex-valued parameters (see :func:`complex_parameters`), and the gains ``g`` of weight
    normalization (whose direction ``v`` is a candidate; see
    :func:`weight_norm_directions`). ``include`` replaces that default by shell-style glob patterns over parameter
    names and may name any trainable parameter, biases too; ``exclude`` removes matches. A tied parameter is one
    candidate, kept under its canonical name, and matches a pattern when any of its names does.

    Args:
        model: The model whose parameters are selected.
        include: Glob patterns naming the candidates. Defaults to ``None`` (the default rule above).
        exclude: Glob patterns naming parameters never to prune. Defaults to ``None``.
        shapes: Whole shapes by name, for parameters that are flat shard views (FSDP). Defaults to ``None``: each
            parameter's own shape.

    Returns:
        The candidates by canonical name (wrapper prefixes removed), in ``named_parameters()`` order.

    Raises:
        ValueError: If a pattern matches no parameter, ``include`` names a complex parameter, or no candidate
            remains.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> list(find_candidates(model))
        ['0.weight', '2.weight']
        >>> list(find_candidates(model, include=["*"], exclude=["1.*"]))
        ['0.weight', '0.bias', '2.weight', '2.bias']
    """
    aliases = parameter_aliases(model)
    params = canonical_parameters(model)
    shapes = shapes or {}
    all_names = [alias for names in aliases.values() for alias in names]
    _check_patterns("include", include or [], all_names)
    _check_patterns("exclude", exclude or [], all_names)

    norm_ids = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}
    norm_ids |= {id(gain) for gain, _, _ in _weight_norms(model)}

    def matches(names: list[str], patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)

    candidates: dict[str, nn.Parameter] = {}
    for name, names in aliases.items():
        param = params[name]
        if not param.requires_grad:
            continue
        ndim = len(shapes[name]) if name in shapes else param.ndim
        chosen = matches(names, include) if include is not None else _is_default_candidate(names, ndim, param, norm_ids)
        if chosen and not matches(names, exclude or []):
            if param.is_complex():
                raise ValueError(
                    f"`include` names `{name}`, a {param.dtype} parameter: complex weights are not pruned (their"
                    " scores and masks are defined for real weights only). Leave it out of `include`, or `exclude`"
                    " it."
                )
            candidates[name] = param

    if not candidates:
        listed = ", ".join(
            f"{n} {tuple(shapes.get(n, params[n].shape))}{'' if params[n].requires_grad else ' (frozen)'}"
            for n in list(aliases)[:_MAX_LISTED_NAMES]
        )
        raise ValueError(
            f"No parameter is a pruning candidate with `include={include!r}` and `exclude={exclude!r}`. Candidates"
            " must be trainable; by default they are the weights with 2 or more dimensions outside normalization"
            f" layers. Adjust `include`/`exclude`. Parameters: {listed or 'none'}"
        )
    return candidates


def _weight_norms(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter, int | None]]:
    """``(gain g, direction v, dim)`` of every weight normalization in ``model``, old and new API.

    ``dim`` is the dimension whose slices are normalized separately; ``None`` means the whole tensor at once.
    """
    from torch.nn.utils.weight_norm import WeightNorm

    found = []
    for module in model.modules():
        parametrizations = getattr(module, "parametrizations", None)
        for plist in (parametrizations or {}).values():
            if _is_weight_norm(plist):
                found.append((plist.original0, plist.original1, plist[0].dim))
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                found.append((getattr(module, f"{hook.name}_g"), getattr(module, f"{hook.name}_v"), hook.dim))
    return [(g, v, None if dim is None or dim == -1 else dim) for g, v, dim in found]


def weight_norm_directions(model: nn.Module) -> dict[str, int | None]:
    """The direction ``v`` of every weight normalization, by canonical name, with the dimension it is normed along.

    Weight normalization computes ``w = g * v / ||v||`` with one norm per slice of ``v`` along ``dim``. A slice of
    ``v`` pruned entirely has norm zero and turns ``w`` into ``0 / 0 = nan``, so selection keeps at least the
    best-scored weight of every slice (:func:`~lightning_snip.selection.protect_slices_`).

    Args:
        model: The model to inspect.

    Returns:
        ``{name of v: dim}``; ``dim`` is ``None`` when the whole tensor is normed at once.

    Example::

        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> weight_norm_directions(nn.Sequential(weight_norm(nn.Linear(4, 3))))
        {'0.parametrizations.weight.original1': 0}
    """
    directions = {id(v): dim for _, v, dim in _weight_norms(model)}
    return {name: directions[id(p)] for name, p in canonical_parameters(model).items() if id(p) in directions}


def other_parametrizations(model: nn.Module) -> dict[str, str]:
    """Stored tensors of parametrizations other than weight normalization, by canonical name, with the type's name.

    The module computes its weight from such a tensor; pruning the stored tensor makes the computed weight sparse
    only when the parametrization maps zeros to zeros (spectral normalization does; an orthogonal map does not).
    """
    kinds: dict[int, str] = {}
    for module in model.modules():
        for plist in (getattr(module, "parametrizations", None) or {}).values():
            if _is_weight_norm(plist):
                continue
            kind = " -> ".join(type(p).__name__ for p in plist)
            for param in plist.parameters(recurse=False):
                kinds[id(param)] = kind
    return {name: kinds[id(p)] for name, p in canonical_parameters(model).items() if id(p) in kinds}


def sparse_gradient_parameters(model: nn.Module) -> list[str]:
    """Canonical names of the parameters that get sparse gradients (``nn.Embedding(sparse=True)``, ``EmbeddingBag``).

    Example::

        >>> sparse_gradient_parameters(nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2)))
        ['0.weight']
    """
    ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}
    return [name for name, p in canonical_parameters(model).items() if id(p) in ids]


def complex_parameters(model: nn.Module) -> list[str]:
    """Canonical names of the trainable complex-valued parameters with ``ndim >= 2``, which are never candidates.

    Example::

        >>> import torch
        >>> complex_parameters(nn.ParameterDict({"z": nn.Parameter(torch.zeros(2, 2, dtype=torch.cfloat))}))
        ['z']
    """
    return [n for n, p in canonical_parameters(model).items() if p.is_complex() and p.requires_grad and p.ndim >= 2]


def canonical_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``named_parameters()`` by canonical name (wrapper prefixes removed; a tied parameter once)."""
    return {clean_name(name): param for name, param in model.named_parameters()}


def _is_weight_norm(plist: nn.ModuleList) -> bool:
    """Whether a ``ParametrizationList`` is exactly one weight normalization."""
    from torch.nn.utils.parametrizations import _WeightNorm

    return len(plist) == 1 and isinstance(plist[0], _WeightNorm)
