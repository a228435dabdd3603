"""One scoring run of ``SNIPPruning``: candidates, checks, criterion, selection, on the trainer's own batches.

The callback calls :func:`prune` once per fit (unless it holds masks already) and only holds and reports the result;
nothing here changes the model: the pruned weights are zeroed by the caller, so a failure leaves the model as it was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_snip import _lightning as lightning
from lightning_snip import guards
from lightning_snip.candidates import find_candidates
from lightning_snip.enforcement import holds_nonzero
from lightning_snip.isolation import leave_no_trace
from lightning_snip.report import TensorSparsity
from lightning_snip.scoring import Schedule, ScoringContext, backward_mean_gradients, get_criterion
from lightning_snip.selection import parse_n_m, select_masks, shuffle_masks
from lightning_snip.sharding import (
    Shard,
    local_tensor,
    restore_flat_grads,
    select_shard_masks,
    shard_layout,
    whole_shapes,
)

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.strategies import Strategy


@dataclass(frozen=True)
class Options:
    """What shapes scoring: the callback's arguments of the same names."""

    sparsity: float
    num_batches: int
    criterion: str
    scope: str
    include: list[str] | None
    exclude: list[str] | None
    seed: int | None
    iterations: int | None
    schedule: Schedule
    min_density: float
    shuffle: bool
    structure: str = "weight"
    width_multiple: int = 1
    temperature: float | None = None
    linear_reinit: bool | None = None
    sparsity_of: str = "channels"

    def config(self) -> dict[str, Any]:
        """The options as the checkpoint state and ``state_key`` hold them.

        The newer options appear only when set, so the state keys (and so the checkpoints) of earlier versions stay
        valid.
        """
        config = asdict(self)
        for name, default in _DEFAULTS.items():
            if config[name] == default:
                del config[name]
        return config


_DEFAULTS: dict[str, Any] = {
    "iterations": None,
    "schedule": "exponential",
    "min_density": 0.0,
    "shuffle": False,
    "structure": "weight",
    "width_multiple": 1,
    "temperature": None,
    "linear_reinit": None,
    "sparsity_of": "channels",
}
OPTION_NAMES = frozenset(f.name for f in fields(Options))


def with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config with the options :meth:`Options.config` leaves out at their defaults written back in.

    Example::

        >>> with_defaults({"sparsity": 0.9})["schedule"]
        'exponential'
    """
    return {**_DEFAULTS, **config}


@dataclass
class Pruned:
    """The result of :func:`prune`.

    Attributes:
        params: The candidates by name.
        kept: Their masks (``True`` = kept), shaped like each local weight, on its device.
        shards: Where each rank's part of each weight lies, on a sharded model; ``None`` otherwise.
        packed: The whole masks bit-packed, on a sharded model; empty otherwise.
        rows: Kept counts per tensor over all ranks, on a sharded model; empty otherwise.
        dead: Candidates whose scores were all zero.
        seconds: Time spent scoring and selecting.
    """

    params: dict[str, nn.Parameter]
    kept: dict[str, Tensor]
    shards: dict[str, Shard] | None
    packed: dict[str, Tensor]
    rows: list[TensorSparsity]
    dead: list[str]
    seconds: float


def prune(trainer: Trainer, pl_module: LightningModule, options: Options, trained_steps: int = 0) -> Pruned:
    """Find the candidates, check them, score them and select the masks; the model is left unchanged.

    Args:
        trainer: The trainer whose train dataloader and strategy are used.
        pl_module: The module whose ``training_step`` gives the loss.
        options: The scoring options.
        trained_steps: Steps the weights were trained for (a checkpoint restored without masks): warns when not 0.

    Raises:
        ScoringError: If the scores cannot be used (all zero, not finite) or the setup cannot be scored.
        MisconfigurationException: If the model or strategy cannot be pruned with these options.
    """
    sharded = lightning.is_sharding(trainer.strategy)
    shapes = whole_shapes(pl_module) if sharded else None
    candidates = _candidates(trainer, pl_module, options, shapes, trained_steps)
    shards = shard_layout(candidates, shapes) if shapes is not None else None  # a collective
    local = {name: local_tensor(p) for name, p in candidates.items()}
    start = time.perf_counter()
    scores, seed = _scores(trainer, pl_module, options, candidates, local, shards)
    nonzero = holds_nonzero(scores.values())
    rows: list[TensorSparsity] = []
    if shards is not None:
        kept, rows, dead, packed = select_shard_masks(
            scores, shards, nonzero, options.sparsity, options.scope, lambda t: all_reduce_sum(trainer.strategy, t)
        )
    else:
        dead = [name for name, z in zip(scores, nonzero, strict=True) if not z]
        guards.protect_weight_norm_slices(pl_module, scores, options.sparsity, options.scope)
        kept, packed = select_masks(scores, options.sparsity, options.scope, options.min_density), {}
        if options.shuffle:
            kept = shuffle_masks(kept, torch.Generator().manual_seed(seed + 1))
            guards.check_weight_norm_slices(pl_module, kept)
    del scores
    if candidates and next(iter(local.values())).is_cuda:
        torch.cuda.synchronize()
    return Pruned(candidates, kept, shards, packed, rows, dead, time.perf_counter() - start)


def all_reduce_sum(strategy: Strategy, values: Tensor) -> Tensor:
    """The sum of ``values`` over all ranks, on CPU."""
    return strategy.reduce(values.to(strategy.root_device), reduce_op="sum").cpu()


def _shared_seed(strategy: Strategy, seed: int | None) -> int:
    drawn = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
    return int(strategy.broadcast(drawn, src=0))


def _candidates(
    trainer: Trainer,
    pl_module: LightningModule,
    options: Options,
    shapes: dict[str, torch.Size] | None,
    trained_steps: int,
) -> dict[str, nn.Parameter]:
    """The candidates (``shapes``: whole shapes of a sharded model), after the checks due before any change."""
    candidates = find_candidates(pl_module, options.include, options.exclude, shapes)
    guards.check_scoring_setup(
        trainer,
        pl_module,
        candidates,
        criterion=options.criterion,
        scope=options.scope,
        sharded=shapes is not None,
        whole_masks_needed=options.min_density > 0 or options.shuffle,
        exclude=options.exclude,
    )
    if trained_steps:
        lightning.rank_zero_warn(
            trainer,
            f"`SNIPPruning`: the checkpoint holds no `SNIPPruning` masks but weights trained for {trained_steps}"
            " steps. They are scored and pruned now, which prunes a trained network, not one at initialization. To"
            " continue a pruned run, resume from a checkpoint written with `SNIPPruning`; to prune at"
            " initialization, fit a freshly initialized model.",
        )
    return candidates


def _scores(
    trainer: Trainer,
    pl_module: LightningModule,
    options: Options,
    candidates: dict[str, nn.Parameter],
    local: dict[str, Tensor],
    shards: dict[str, Shard] | None,
) -> tuple[dict[str, Tensor], int]:
    """Run the criterion with no trace left but its scores; also return the seed all ranks share."""
    strategy, criterion = trainer.strategy, get_criterion(options.criterion)
    batches_needed = criterion.needs_data or (
        criterion.needs_input and getattr(pl_module, "example_input_array", None) is None
    )
    if batches_needed:
        trainer.fit_loop.setup_data()  # what fit would do next; done outside `leave_no_trace` on purpose
    with leave_no_trace(pl_module), restore_flat_grads(pl_module), ExitStack() as stack:
        seed = _shared_seed(strategy, options.seed)
        pl_module.train()
        loss_fn = None
        if batches_needed:
            losses = lightning.training_step_losses(trainer, pl_module, options.num_batches, shards is not None)
            loss_fn = stack.enter_context(losses)
        context = ScoringContext(
            weights=local,
            loss_fn=loss_fn,
            num_batches=options.num_batches,
            all_reduce_mean=lambda t: strategy.reduce(t, reduce_op="mean"),
            generator=torch.Generator().manual_seed(seed),
            sparsity=options.sparsity,
            iterations=options.iterations or criterion.default_iterations or 1,
            schedule=options.schedule,
            select=lambda scores, sparsity: _select_round(pl_module, options, scores, sparsity),
            module=pl_module,
            example_input=lightning.example_input(pl_module, loss_fn) if criterion.needs_input else None,
            temperature=options.temperature or criterion.default_temperature or 1.0,
            linear_reinit=bool(
                criterion.default_linear_reinit if options.linear_reinit is None else options.linear_reinit
            ),
        )
        if shards is not None:  # each rank scores its own shards; FSDP averages the gradients
            if loss_fn is not None:
                context.gradients = lambda: backward_mean_gradients(
                    candidates, loss_fn, options.num_batches, local_tensor
                )
            context.shapes = {name: shard.shape for name, shard in shards.items()}
            context.take_local = lambda name, whole: shards[name].take(whole, like=local[name]).clone()
        return criterion.score(context), seed


def _select_round(
    pl_module: LightningModule, options: Options, scores: Mapping[str, Tensor], sparsity: float
) -> dict[str, Tensor]:
    """The masks between the rounds of an iterative criterion: this scope (layerwise for N:M), exact counts."""
    scope = options.scope if parse_n_m(options.scope) is None else "layerwise"
    protected = {name: s.clone() for name, s in scores.items()}
    guards.protect_weight_norm_slices(pl_module, protected, sparsity, scope)
    return select_masks(protected, sparsity, scope, options.min_density)


@dataclass
class Shrunk:
    """The result of :func:`prune_channels`.

    Attributes:
        record: What :func:`~lightning_snip.structured.replay` repeats on a fresh model.
        widths: Each channel group's ``(dense, kept)`` width, by the name of its layer.
        before: ``(parameters, MACs)`` of the dense network for one example input.
        after: The same for the shrunk network.
        seconds: Time spent scoring, selecting and shrinking.
    """

    record: list[dict[str, Any]]
    widths: dict[str, tuple[int, int]]
    before: tuple[int, int]
    after: tuple[int, int]
    seconds: float


def prune_channels(trainer: Trainer, pl_module: LightningModule, options: Options) -> Shrunk:
    """Score the candidates, sum the scores per channel group, and remove the lowest channels from ``pl_module``.

    Everything that can refuse (the strategy, the model's traceability, the budget) does so before the model is
    changed; the model is shrunk in place at the very end.

    Raises:
        MisconfigurationException: For sharded and spawned strategies, and modules without ``forward``.
        UntraceableError: For models whose channel dependencies cannot be traced (the message names the module).
        ValueError: If the budget cannot keep every layer alive.
    """
    from lightning_snip import structured

    structured.torch_pruning()  # the extra, or an error naming it, before anything else
    if lightning.is_sharding(trainer.strategy) or lightning.is_spawned_worker(trainer):
        raise lightning.misconfiguration(
            trainer,
            f"`SNIPPruning(structure='channel')` shrinks the model before the strategy wraps it, which"
            f" `{type(trainer.strategy).__name__}` does not allow (sharded parameters, or workers that hand a"
            " differently shaped model back to the launching process). Use `strategy='ddp'` or one device.",
        )
    if not guards.defines_forward(pl_module):
        raise lightning.misconfiguration(
            trainer,
            f"`structure='channel'` traces the channels through the module's `forward`, but"
            f" `{type(pl_module).__name__}` defines none. Define `forward` (e.g. `def forward(self, x): return"
            " self.net(x)`), or use `structure='weight'`.",
        )
    options = replace(options, iterations=1)  # one-shot scores (SynFlow's too)
    candidates = _candidates(trainer, pl_module, options, None, 0)
    _broadcast_weights(pl_module)
    start = time.perf_counter()
    trainer.fit_loop.setup_data()
    example = _tracing_input(trainer, pl_module)
    with leave_no_trace(pl_module):
        graph, groups = structured.trace_channel_groups(pl_module, example, candidates, options.exclude or ())
    if not groups:
        raise structured.UntraceableError(
            "`structure='channel'` found no channel it may remove (the output layer and `exclude`d layers are kept)."
            " Check `exclude`, or use `structure='weight'`."
        )
    local: dict[str, Tensor] = dict(candidates)
    scores, _ = _scores(trainer, pl_module, options, candidates, local, None)
    channel_scores = structured.group_scores(groups, scores)
    del scores
    if options.sparsity_of == "channels":
        kept = structured.select_channels(
            channel_scores, options.sparsity, options.scope, options.min_density, options.width_multiple
        )
    else:  # a share of the parameters or of the weight MACs: the fewest channels that get there
        with leave_no_trace(pl_module):  # one more forward, to count where each weight is applied
            counter = structured.SizeCounter(pl_module, graph, groups, example)
        by_parameters = options.sparsity_of == "parameters"
        kept = structured.select_channels_within(
            channel_scores,
            size_budget(counter.dense_parameters if by_parameters else counter.dense_macs, options.sparsity),
            counter.parameters if by_parameters else counter.macs,
            options.scope,
            options.min_density,
            options.width_multiple,
            unit="parameters" if by_parameters else "MACs",
        )
    before = (structured.count_parameters(pl_module), structured.count_macs(pl_module, example))
    record = structured.shrink(pl_module, graph, kept)
    after = (structured.count_parameters(pl_module), structured.count_macs(pl_module, example))
    widths = {group.name: (group.size, int(kept[group.name].sum())) for group in groups}
    return Shrunk(record, widths, before, after, time.perf_counter() - start)


def size_budget(dense: int, sparsity: float) -> int:
    """The largest size ``sparsity_of='parameters'`` (or ``'macs'``) leaves: ``floor((1 - sparsity) * dense)``.

    Example::

        >>> size_budget(1000, 0.75)
        250
    """
    return math.floor((1.0 - sparsity) * dense + 1e-9)


def _broadcast_weights(module: nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers, as DDP does when it wraps the model (which comes later)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def _tracing_input(trainer: Trainer, pl_module: LightningModule) -> Tensor:
    """An input of batch size 1 to trace the model with: ``example_input_array``, else the first train batch's."""
    declared = getattr(pl_module, "example_input_array", None)
    if isinstance(declared, Tensor):
        return declared[:1].to(pl_module.device)
    with lightning.training_step_losses(trainer, pl_module, 1) as loss_fn:
        return lightning.example_input(pl_module, loss_fn).to(pl_module.device)
