"""The checks due before scoring changes anything, and the weight-norm slices selection must keep.

Lightning glue like ``callback.py``, kept apart from it: each check either passes, warns, or raises before the model
is touched.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Size, Tensor, nn

from lightning_snip import _lightning as lightning
from lightning_snip.candidates import (
    complex_parameters,
    other_parametrizations,
    sparse_gradient_parameters,
    weight_norm_directions,
)
from lightning_snip.scoring import ScoringError, get_criterion
from lightning_snip.selection import kept_count, n_m_unfit, parse_n_m, protect_slices_

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer


def check_scoring_setup(
    trainer: Trainer,
    pl_module: LightningModule,
    candidates: Mapping[str, nn.Parameter],
    *,
    criterion: str,
    scope: str,
    sharded: bool,
    whole_masks_needed: bool,
    exclude: Sequence[str] | None = None,
) -> None:
    """Refuse what cannot work with these candidates and this strategy; warn where the result may surprise.

    Raises:
        MisconfigurationException: For sparse gradients, a criterion that runs the module's forward on a module
            without one, and on a sharded model for criteria, options and scopes that need whole weights or whole
            masks.
    """
    refuse_sparse_gradients(trainer, pl_module, candidates)
    if get_criterion(criterion).needs_input and not defines_forward(pl_module):
        raise lightning.misconfiguration(
            trainer,
            f"`criterion={criterion!r}` runs the module's own `forward` on an input shaped like"
            f" `example_input_array`, but `{type(pl_module).__name__}` defines no `forward` (its `training_step`"
            " calls its layers itself). Define `forward` (e.g. `def forward(self, x): return self.net(x)`) and set"
            " `self.example_input_array`, or use a criterion that scores through `training_step` ('snip',"
            " 'iterative_snip', 'force', 'grasp').",
        )
    excluded = exclude or []
    skipped = [
        name
        for name in complex_parameters(pl_module)
        if name not in candidates and not any(fnmatch.fnmatchcase(name, pattern) for pattern in excluded)
    ]
    if skipped:
        lightning.rank_zero_warn(
            trainer,
            f"`SNIPPruning`: {skipped} are complex-valued and are not pruned (scores and masks are defined for real"
            " weights). `exclude` them to silence this.",
        )
    if sharded and whole_masks_needed:
        raise lightning.misconfiguration(
            trainer,
            "`min_density` and `shuffle` need the whole masks on one process; a sharded model (FSDP,"
            " `ModelParallelStrategy`) selects them shard by shard. Use DDP, or leave them at 0.0 and False.",
        )
    if sharded and not get_criterion(criterion).supports_sharding:
        raise lightning.misconfiguration(
            trainer,
            f"`criterion={criterion!r}` does not score sharded models (FSDP, `ModelParallelStrategy`): its rounds or"
            " second backward need whole weights. Use DDP, or `criterion='snip'`, 'magnitude' or 'random', which"
            " score shards.",
        )
    if scope == "constant_fan_in" and sharded:
        raise lightning.misconfiguration(
            trainer,
            "`SNIPPruning(scope='constant_fan_in')` selects whole rows, which shards may split. Use DDP, or"
            " `scope='global'`/'layerwise'.",
        )
    n_m = parse_n_m(scope)
    if n_m is not None and sharded:
        raise lightning.misconfiguration(
            trainer,
            f"`SNIPPruning(scope={scope!r})` cannot select N:M masks on a sharded model: a shard may split a group of"
            " weights. Use DDP (masks are the same on every rank), or `scope='global'`/'layerwise'.",
        )
    if n_m is not None:
        unfit = n_m_unfit({name: p.shape for name, p in candidates.items()}, n_m[1])
        if unfit:
            lightning.rank_zero_warn(
                trainer,
                f"`SNIPPruning(scope={scope!r})`: the reduction dimension of {unfit} is not a multiple of {n_m[1]}, so"
                " they stay dense; the logged sparsity is what was achieved. `exclude` them to silence this.",
            )
    if sharded and any(name in candidates for name in weight_norm_directions(pl_module)):
        raise lightning.misconfiguration(
            trainer,
            "`SNIPPruning` cannot keep a weight in every slice of a weight-normalized tensor when the model is"
            " sharded. Exclude the weight-norm directions (`exclude=['*.original1', '*_v']`) or train unsharded.",
        )
    for name, kind in other_parametrizations(pl_module).items():
        if name in candidates and kind != "_SpectralNorm":
            lightning.rank_zero_warn(
                trainer,
                f"`SNIPPruning`: `{name}` is the stored tensor of a `{kind}` parametrization. It is pruned, but the"
                " weight the module computes from it is sparse only if the parametrization maps zeros to zeros."
                f" If it does not, `exclude=[{name!r}]`.",
            )


def defines_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class (or a base of its own, not Lightning's or torch's) defines ``forward``.

    Example::

        >>> defines_forward(nn.Linear(2, 2)), defines_forward(nn.Module())
        (True, False)
    """
    for cls in type(module).__mro__:
        if "forward" in cls.__dict__:
            owner = cls.__module__
            return not (cls is nn.Module or owner.startswith(("lightning.pytorch.", "pytorch_lightning.")))
    return False


def refuse_sparse_gradients(trainer: Trainer, pl_module: LightningModule, names: Iterable[str]) -> None:
    """Refuse, before any change, candidates whose gradients are sparse: masks cannot zero them in place."""
    sparse = set(sparse_gradient_parameters(pl_module))
    bad = [name for name in names if name in sparse]
    if bad:
        raise lightning.misconfiguration(
            trainer,
            f"`SNIPPruning` cannot prune {bad}: their module (`nn.Embedding`/`nn.EmbeddingBag` with `sparse=True`)"
            " produces sparse gradients, which neither scoring nor the per-step masking supports. Exclude them"
            f" (`exclude={bad!r}`) or build the module with `sparse=False`.",
        )


def protect_weight_norm_slices(
    pl_module: LightningModule,
    scores: dict[str, Tensor],
    sparsity: float,
    scope: str,
) -> None:
    """Make selection keep a weight in every normed slice of each weight-norm direction (no ``0 / 0``)."""
    directions = {name: dim for name, dim in weight_norm_directions(pl_module).items() if name in scores}
    if parse_n_m(scope) is not None:  # every row keeps N of each M; slices along other dims may not
        across = [name for name, dim in directions.items() if dim not in (0, None)]
        if across:
            raise ScoringError(
                f"`scope={scope!r}` keeps weights in every row but may prune a whole slice of the"
                f" weight-normalized tensors {across} (normed along another dimension), which divides by a zero"
                " norm. Exclude them, or use `scope='global'`."
            )
        return
    if scope == "constant_fan_in" and directions:
        raise ScoringError(
            f"`scope='constant_fan_in'` re-selects within rows and may prune a whole normed slice of the"
            f" weight-normalized tensors {list(directions)}. Exclude them, or use `scope='global'`."
        )
    needed = {name: protect_slices_(scores[name], dim) for name, dim in directions.items()}
    if scope == "global":
        budget = kept_count(sum(s.numel() for s in scores.values()), sparsity)
        short = [] if sum(needed.values()) <= budget else list(needed)
    else:
        short = [name for name, n in needed.items() if n > kept_count(scores[name].numel(), sparsity)]
    if short:
        raise ScoringError(
            f"`sparsity={sparsity}` keeps fewer weights than the weight-normalized tensors {short} have"
            " normed slices, and a slice pruned entirely divides by a zero norm (nan). Lower `sparsity` or"
            " exclude them."
        )


def check_weight_norm_slices(pl_module: LightningModule, kept: Mapping[str, Tensor]) -> None:
    """After a shuffle: every normed slice of a weight-norm direction must still keep a weight."""
    for name, dim in weight_norm_directions(pl_module).items():
        if name in kept:
            slices = kept[name].reshape(1, -1) if dim is None else kept[name].movedim(dim, 0).flatten(1)
            if not bool(slices.any(dim=1).all()):
                raise ScoringError(
                    f"`shuffle=True` left a normed slice of the weight-normalized `{name}` with no weight (a zero"
                    f" norm). Exclude it (`exclude=[{name!r}]`) or lower `sparsity`."
                )


def check_masks_fit(trainer: Trainer, whole: Mapping[str, Tensor], shapes: Mapping[str, Size]) -> None:
    """Refuse held masks (from a checkpoint or an earlier fit) that do not fit the model's parameters (whole shapes).

    Raises:
        MisconfigurationException: Naming the missing parameters and the shape mismatches.
    """
    missing = [n for n in whole if n not in shapes]
    mismatched = [
        f"{n}: mask {tuple(m.shape)} vs parameter {tuple(shapes[n])}"
        for n, m in whole.items()
        if n in shapes and m.shape != shapes[n]
    ]
    if missing or mismatched:
        raise lightning.misconfiguration(
            trainer,
            "`SNIPPruning` holds masks (from a checkpoint or an earlier fit) that do not fit this model:"
            f" missing parameters {missing}, shape mismatches {mismatched}. Resume with the model the masks were"
            " made for, or use a new `SNIPPruning` instance to score this model.",
        )
