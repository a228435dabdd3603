"""``SNIPPruning``: the Lightning glue around the pure scoring and masking functions.

Which hook does what:

- ``on_fit_start``: check the strategy; reuse masks already held (restored from a checkpoint, or from an earlier
  ``fit``) or score the model on batches of the trainer's own train dataloader; zero the pruned weights. Under FSDP
  and ``ModelParallelStrategy`` each rank scores and masks its own shards; the masks are selected together.
- ``on_train_start``: bind or score here instead for strategies that restore checkpoints after ``on_fit_start``;
  zero the optimizer state of pruned weights (restored from a checkpoint, say); install a post-step hook on every
  optimizer that re-zeros pruned weights after each step, unless the step provably left them at zero.
- ``on_after_backward``: zero the gradients of pruned weights, so optimizer state never builds up for them.
- ``on_train_batch_end``: log the sparsity measured from the weights, and check that every pruned weight is still
  zero, every ``log_every_n_steps``; the check runs again before validation and when training ends.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
    XLAStrategy,
)
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_snip.candidates import find_candidates
from lightning_snip.isolation import leave_no_trace
from lightning_snip.masks import (
    MaskSet,
    Scope,
    TensorSparsity,
    count_zeros,
    format_report,
    holds_nonzero,
    keeps_zeros,
    pack_mask,
    select_masks,
    select_masks_distributed,
    sparsity_report,
    unpack_mask,
)
from lightning_snip.scoring import (
    CriterionName,
    ScoringContext,
    ScoringError,
    available_criteria,
    backward_mean_gradients,
    get_criterion,
)
from lightning_snip.sharding import (
    Shard,
    clean_name,
    gather_packed_mask,
    local_tensor,
    restore_flat_grads,
    shard_layout,
    whole_shapes,
)

_T = TypeVar("_T", bound="Tensor | None")
_STATE_VERSION = 2  # 1: bool masks; 2: bit-packed masks and their shapes
_PLOT_FILE = "snip_sparsity.png"
_CHECK_EVERY_N_STEPS = 50  # how often pruned weights are checked when `log_every_n_steps` is 0
_matplotlib_hint_given = False


def _check_patterns(argument: str, value: object) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise TypeError(
            f"`{argument}` must be a list of non-empty glob patterns over parameter names (e.g. ['*.weight']) or"
            f" None, got {value!r}."
        )
    return list(value)


_SHARDING_STRATEGIES = (FSDPStrategy, ModelParallelStrategy)


def _check_strategy(strategy: Strategy) -> None:
    supported = (SingleDeviceStrategy, DDPStrategy, *_SHARDING_STRATEGIES)
    if isinstance(strategy, (DeepSpeedStrategy, XLAStrategy)) or not isinstance(strategy, supported):
        raise MisconfigurationException(
            f"`SNIPPruning` does not support `{type(strategy).__name__}`: its parameters live in buffers the masks"
            " cannot follow (DeepSpeed ZeRO's flat partitions, XLA), and pruning nothing silently is not an option."
            " To shard the model use `strategy='fsdp'` or `ModelParallelStrategy` with `fully_shard`; to replicate"
            " it use `strategy='ddp'` (also 'ddp_spawn', 'ddp_fork'); or train on a single device."
        )


def _is_sharding(strategy: Strategy) -> bool:
    return isinstance(strategy, _SHARDING_STRATEGIES)


def _all_reduce_sum(strategy: Strategy, values: Tensor) -> Tensor:
    return strategy.reduce(values.to(strategy.root_device), reduce_op="sum").cpu()


def _loss_from_output(output: object, batch_idx: int) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if "loss" in output:
            return output["loss"]
        raise ScoringError(
            f"`training_step` returned a dict without a 'loss' key (keys: {sorted(map(str, output))}) on scoring"
            f" batch {batch_idx}. Return the loss tensor or a dict with 'loss', or use `criterion='magnitude'`."
        )
    raise ScoringError(
        f"`training_step` returned {type(output).__name__} on scoring batch {batch_idx}, so SNIP has no loss to"
        " differentiate. Return the loss tensor (or a dict with a 'loss' key), call `self.manual_backward(loss)`"
        " with manual optimization, or use `criterion='magnitude'`."
    )


@contextmanager
def _override(obj: object, **attributes: Any) -> Iterator[None]:
    """Temporarily set instance attributes (e.g. methods), restoring the previous state on exit."""
    missing = object()
    saved = {name: obj.__dict__.get(name, missing) for name in attributes}
    for name, value in attributes.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def _training_step_losses(
    trainer: Trainer, pl_module: LightningModule, num_batches: int, through_strategy: bool = False
) -> Iterator[Callable[[int], Tensor]]:
    """Yield ``loss_fn(i)``: the module's own ``training_step`` loss on the ``i``-th train batch.

    Batches are drawn from a fresh iterator over the trainer's train dataloader and moved to the device through the
    trainer's batch-transfer hooks. Inside the context ``self.log`` is a no-op, ``manual_backward`` records the loss
    instead of stepping, and optimizer and scheduler steps do nothing, so manual optimization scores too. With
    ``through_strategy`` the step runs through ``strategy.training_step``, so a sharded model's forward hooks (which
    gather the parameters) run around it, as in training.
    """
    combined = trainer.fit_loop._combined_loader
    if combined is None or not combined.flattened:
        raise ScoringError(
            "`SNIPPruning` scores with batches of the train dataloader, but the trainer has none (check"
            " `limit_train_batches` and the `train_dataloader`). Provide training data or use `criterion='magnitude'`."
        )
    if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
        raise MisconfigurationException(
            "`SNIPPruning` cannot score a `training_step(self, dataloader_iter)`: it needs one batch per call. Use"
            " `criterion='magnitude'` or `'random'`, or a batch-wise `training_step`."
        )
    pass_batch_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)
    iterator: Iterator[Any] | None = None
    recorded: list[Tensor] = []

    def record_backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
        recorded.append(loss)

    def loss_fn(i: int) -> Tensor:
        nonlocal iterator
        if iterator is None:
            iterator = iter(CombinedLoader(combined.iterables, mode=combined._mode))
        try:
            batch, batch_idx, _ = next(iterator)
        except StopIteration:
            raise ScoringError(
                f"`num_batches={num_batches}` but the train dataloader yielded only {i} batch(es). Lower"
                " `num_batches` or provide more training data."
            ) from None
        # the same transfer path as Lightning's training loop
        batch = trainer.precision_plugin.convert_input(batch)
        batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        recorded.clear()
        args = (batch, batch_idx) if pass_batch_idx else (batch,)
        if through_strategy:
            output = trainer.strategy.training_step(*args)
        else:
            with trainer.precision_plugin.train_step_context():
                output = pl_module.training_step(*args)
        if not recorded:
            return _loss_from_output(output, i)
        total = recorded[0]
        for loss in recorded[1:]:
            total = total + loss
        return total

    with ExitStack() as stack:
        stack.enter_context(_override(pl_module, log=_ignore, log_dict=_ignore, manual_backward=record_backward))
        for optimizer in trainer.optimizers:
            stack.enter_context(_override(optimizer, step=_ignore, zero_grad=_ignore))
        for config in trainer.lr_scheduler_configs:
            stack.enter_context(_override(config.scheduler, step=_ignore))
        yield loss_fn


class SNIPPruning(Callback):
    r"""Prune a network once before training with SNIP, and keep it exactly that sparse.

    At the start of ``fit``, every candidate weight is scored by its connection sensitivity ``|dL/dw * w|`` on
    ``num_batches`` batches of the trainer's own train dataloader (the loss comes from the module's
    ``training_step``); the top ``1 - sparsity`` fraction is kept and the rest set to zero. Pruned weights get zero
    gradients after every backward and are re-zeroed after every optimizer step. PyTorch's elementwise optimizers
    (SGD, Adam, AdamW and the others in :data:`~lightning_snip.masks.ZERO_PRESERVING_OPTIMIZERS`) provably leave a
    weight with zero gradient and zero state at exactly zero, so after their steps the re-zeroing is skipped; every
    ``log_every_n_steps`` steps, before validation and at the end of training, pruned weights are checked, and if
    anything else wrote to them they are zeroed, with a warning, and from then on after every step. Masks travel in
    checkpoints, so a resumed run trains with the same mask. The model itself is never changed structurally: its
    ``state_dict`` loads into a never-pruned copy.

    Scoring leaves no trace but the zeros: RNG streams, train/eval modes, buffers (BatchNorm statistics), ``.grad``
    and torchmetrics states are restored, and no optimizer or scheduler steps.

    Args:
        sparsity: Fraction of candidate weights set to zero, ``0 <= sparsity < 1``. Defaults to ``0.9``.
        num_batches: Batches drawn from the train dataloader for scoring; their gradients are averaged (and, under
            DDP, averaged across ranks too). Defaults to ``1``.
        criterion: ``"snip"`` (``|dL/dw * w|``), or the paper's baselines ``"magnitude"`` (``|w|``) and
            ``"random"``; the last two draw no data. Defaults to ``"snip"``.
        scope: ``"global"`` ranks all candidates together; ``"layerwise"`` prunes each tensor to ``sparsity`` on its
            own. Defaults to ``"global"``.
        include: Glob patterns over ``named_parameters()`` names choosing the candidates; any trainable parameter,
            biases too. Defaults to ``None``: every trainable parameter with ``ndim >= 2`` outside normalization
            layers, biases excluded.
        exclude: Glob patterns of parameters never pruned. Defaults to ``None``.
        log_per_layer: Also log ``snip/sparsity/<name>`` per tensor after scoring. Defaults to ``True``.
        plot: After scoring, save a per-tensor sparsity bar chart as ``snip_sparsity.png`` in the trainer's log
            directory and, with a TensorBoard logger, log it as a figure. Needs matplotlib. Defaults to ``True``.
        seed: Seed for the ``"random"`` criterion. Defaults to ``None``: drawn from torch's global generator (so
            ``seed_everything`` makes it reproducible) and shared by all ranks.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range or unknown.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> pruning = SNIPPruning(sparsity=0.95, exclude=["classifier.*"])
        >>> trainer = Trainer(callbacks=[pruning], logger=False, enable_progress_bar=False)
        >>> trainer.callbacks[0].sparsity, trainer.callbacks[0].criterion
        (0.95, 'snip')

    The same from a LightningCLI YAML file::

        trainer:
          callbacks:
            - class_path: lightning_snip.SNIPPruning
              init_args:
                sparsity: 0.95
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        num_batches: int = 1,
        criterion: CriterionName = "snip",
        scope: Scope = "global",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        log_per_layer: bool = True,
        plot: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
            raise TypeError(f"`sparsity` must be a real number in [0, 1), got {sparsity!r}. Use e.g. 0.9.")
        if not (math.isfinite(sparsity) and 0.0 <= sparsity < 1.0):
            raise ValueError(
                f"`sparsity` must be in [0, 1) (the fraction of weights set to zero), got {sparsity!r}. Use e.g. 0.9"
                " for 90% zeros."
            )
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"`num_batches` must be an integer >= 1, got {num_batches!r}. Use e.g. 1.")
        if criterion not in available_criteria():
            raise ValueError(f"`criterion` must be one of {available_criteria()}, got {criterion!r}.")
        if scope not in ("global", "layerwise"):
            raise ValueError(f"`scope` must be 'global' or 'layerwise', got {scope!r}.")
        if not isinstance(log_per_layer, bool):
            raise TypeError(f"`log_per_layer` must be True or False, got {log_per_layer!r}.")
        if not isinstance(plot, bool):
            raise TypeError(f"`plot` must be True or False, got {plot!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"`seed` must be an integer or None, got {seed!r}.")
        self.sparsity = float(sparsity)
        self.num_batches = num_batches
        self.criterion = criterion
        self.scope: Scope = scope
        self.include = _check_patterns("include", include)
        self.exclude = _check_patterns("exclude", exclude)
        self.log_per_layer = log_per_layer
        self.plot = plot
        self.seed = seed

        self._loaded: dict[str, Tensor] | None = None  # kept masks from a checkpoint, on CPU, not yet bound
        self._params: dict[str, nn.Parameter] = {}  # candidates the masks are bound to
        self._kept: dict[str, Tensor] = {}  # True = kept, like each local weight, on its device (1 byte per weight)
        self._shards: dict[str, Shard] | None = None  # where each rank's part lies, when the model is sharded
        self._mask_set = MaskSet(())  # `_kept` prepared once for the per-step zeroing
        self._packed: dict[str, Tensor] = {}  # whole masks, bit-packed on CPU, when the model is sharded
        self._step_hooks: list[RemovableHandle] = []
        self._masked_backwards = 0  # backward passes whose gradients were masked: read by the post-step hooks
        self._rezero_every_step = False  # set once something besides the optimizers wrote to pruned weights
        self._last_logged_step = -1
        self._last_checked_step = -1

    # ------------------------------------------------------------------ public state

    @property
    def masks(self) -> dict[str, Tensor]:
        """The whole masks by parameter name (``True`` = kept), as new tensors; empty before scoring.

        On a sharded model every rank returns the whole masks, on CPU.
        """
        if self._loaded is not None:
            return {name: mask.clone() for name, mask in self._loaded.items()}
        if self._shards is not None:
            return {name: unpack_mask(packed, self._shards[name].shape) for name, packed in self._packed.items()}
        return {name: mask.clone() for name, mask in self._kept.items()}

    def _packed_masks(self) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
        """The whole masks bit-packed, and their shapes."""
        if self._loaded is None and self._shards is not None:
            return dict(self._packed), {name: list(self._shards[name].shape) for name in self._packed}
        masks = self._loaded if self._loaded is not None else self._kept
        return {name: pack_mask(m) for name, m in masks.items()}, {name: list(m.shape) for name, m in masks.items()}

    def _config(self) -> dict[str, Any]:
        return {
            "sparsity": self.sparsity,
            "num_batches": self.num_batches,
            "criterion": self.criterion,
            "scope": self.scope,
            "include": self.include,
            "exclude": self.exclude,
            "seed": self.seed,
        }

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads this on every hook call (profiler names): build it once per configuration
        config = self._config()
        if getattr(self, "_state_key_for", None) != config:
            self._state_key_for, self._state_key = config, self._generate_state_key(**config)
        return self._state_key

    @override
    def state_dict(self) -> dict[str, Any]:
        packed, shapes = self._packed_masks()  # 1 bit per weight
        return {"version": _STATE_VERSION, "config": self._config(), "masks": packed, "shapes": shapes}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version", 1)
        masks = state_dict.get("masks")
        shapes = state_dict.get("shapes", {})
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
        config = state_dict.get("config")
        if config is not None and config != self._config():
            rank_zero_warn(f"`SNIPPruning` loads masks made with {config}, not this instance's {self._config()}.")
        self._loaded = unpacked or None
        self._hold({}, {}, None, {})

    # ------------------------------------------------------------------ hooks

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _check_strategy(trainer.strategy)
        if self._loaded is not None or self._kept:
            self._bind(trainer, pl_module)
        elif not trainer.strategy.restore_checkpoint_after_setup:
            self._score(trainer, pl_module)
        # otherwise a checkpoint (maybe with masks) is restored after this hook: decide in `on_train_start`

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._loaded is not None:  # restored after `on_fit_start`
            self._bind(trainer, pl_module)
        elif not self._kept:
            self._score(trainer, pl_module)
        self._remove_step_hooks()
        self._rezero_every_step, self._last_checked_step = False, -1
        by_id = {id(self._params[name]): (self._params[name], mask) for name, mask in self._kept.items()}
        for optimizer in trainer.optimizers:
            pairs = [by_id[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in by_id]
            if pairs:
                params, masks = [p for p, _ in pairs], MaskSet(m for _, m in pairs)
                self._zero_optimizer_state(optimizer, params, masks)
                self._step_hooks.append(
                    optimizer.register_step_post_hook(self._post_step_hook(params, masks, keeps_zeros(optimizer)))
                )
        self._mask_set.zero_(self._local(self._params.values()))  # weights may have been restored since binding

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mask_set.zero_(self._local(p.grad for p in self._params.values()))
        self._masked_backwards += 1

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, every = trainer.global_step, int(getattr(trainer, "log_every_n_steps", 50))
        self._log_sparsity(trainer, step, every)
        check_every = every if every > 0 else _CHECK_EVERY_N_STEPS
        if step % check_every == 0 and step != self._last_checked_step:
            self._last_checked_step = step
            self._check_pruned_weights(trainer, f"after step {step}")

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._check_pruned_weights(trainer, f"before validation at step {trainer.global_step}")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_pruned_weights(trainer, "at the end of training")

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_step_hooks()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_step_hooks()

    # ------------------------------------------------------------------ internals

    def _log_sparsity(self, trainer: Trainer, step: int, every: int) -> None:
        sharded = self._shards is not None  # then every rank counts its shards
        if not trainer.loggers or not (sharded or trainer.is_global_zero) or every <= 0 or not self._params:
            return
        if step % every != 0 or step == self._last_logged_step:
            return
        self._last_logged_step = step
        zeros = count_zeros(self._local(self._params.values()))
        if self._shards is not None:
            zeros = int(_all_reduce_sum(trainer.strategy, torch.tensor([zeros]))[0])
            total = sum(shard.numel for shard in self._shards.values())
        else:
            total = sum(p.numel() for p in self._params.values())
        self._log({"snip/sparsity": zeros / total}, trainer)

    def _post_step_hook(self, params: list[nn.Parameter], masks: MaskSet, optimizer_keeps_zeros: bool) -> Any:
        """The optimizer post-step hook: re-zero the pruned weights, unless the step provably left them at zero.

        It did when the optimizer keeps zeros (:func:`~lightning_snip.masks.keeps_zeros`) and a backward whose
        gradients were masked ran since its previous step; a step on gradients that were not masked (a plain
        ``loss.backward()`` under manual optimization, say) is always followed by the re-zeroing.
        """
        masked_at_previous_step = self._masked_backwards

        def hook(*_: Any) -> None:
            nonlocal masked_at_previous_step
            masked = self._masked_backwards != masked_at_previous_step
            if self._rezero_every_step or not (optimizer_keeps_zeros and masked):
                masks.zero_(self._local(params))
            masked_at_previous_step = self._masked_backwards

        return hook

    def _zero_optimizer_state(
        self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], masks: MaskSet
    ) -> None:
        """Zero the pruned entries of the optimizer state (momentum, moments) built before these masks were held."""
        states, kept = [], []
        for param, mask in zip(params, masks.kept, strict=True):
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:  # not scalars such as Adam's `step`
                    local = local_tensor(value)
                    states.append(local)
                    kept.append(mask.to(local.device))  # state may live elsewhere (offloaded)
        if states:
            MaskSet(kept).zero_(states)

    def _check_pruned_weights(self, trainer: Trainer, when: str) -> None:
        """Zero pruned weights that something besides the optimizer step set, warn, and re-zero after every step."""
        weights = list(self._local(self._params.values()))
        counts = self._mask_set.count_pruned_nonzero(weights)
        if not any(counts):
            return
        self._mask_set.zero_(weights)
        if self._rezero_every_step:
            return
        self._rezero_every_step = True
        found = ", ".join(f"{count:,} in `{name}`" for name, count in zip(self._params, counts, strict=True) if count)
        message = (
            f"`SNIPPruning`: pruned weights were non-zero {when} ({found}): something besides the optimizer step wrote"
            " to them (a callback, `training_step`, or a backward outside `manual_backward`). They are zero again, and"
            " from now on they are re-zeroed after every optimizer step."
        )
        if self._shards is None:
            rank_zero_warn(message)
        else:  # each rank checks its own shards
            warnings.warn(f"[rank {trainer.global_rank}] {message}", stacklevel=2)

    def _remove_step_hooks(self) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    def _local(self, tensors: Iterable[_T]) -> Iterable[_T]:
        """The local parts of the tensors (sharded models hold ``DTensor``s); the tensors themselves otherwise."""
        if self._shards is None:
            return tensors
        return [t if t is None else cast(_T, local_tensor(t)) for t in tensors]

    def _hold(
        self,
        params: dict[str, nn.Parameter],
        kept: dict[str, Tensor],
        shards: dict[str, Shard] | None,
        packed: dict[str, Tensor],
    ) -> None:
        """Hold masks bound to ``params``, prepare them for the per-step zeroing and zero the pruned weights."""
        self._params, self._kept, self._shards, self._packed = params, kept, shards, packed
        self._mask_set = MaskSet(kept.values())
        self._mask_set.zero_(self._local(params.values()))

    def _bind(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attach held masks to the module's parameters (by name), move them to their devices, zero the weights."""
        sharded = _is_sharding(trainer.strategy)
        whole = self.masks if self._loaded is None and self._shards is not None else (self._loaded or self._kept)
        packed = self._packed_masks()[0] if sharded else {}  # the packed masks already held, when there are some
        params = {clean_name(name): p for name, p in pl_module.named_parameters()}
        shapes = whole_shapes(pl_module) if sharded else {name: p.shape for name, p in params.items()}
        missing = [n for n in whole if n not in params]
        mismatched = [
            f"{n}: mask {tuple(m.shape)} vs parameter {tuple(shapes[n])}"
            for n, m in whole.items()
            if n in params and m.shape != shapes[n]
        ]
        if missing or mismatched:
            raise MisconfigurationException(
                "`SNIPPruning` holds masks (from a checkpoint or an earlier fit) that do not fit this model:"
                f" missing parameters {missing}, shape mismatches {mismatched}. Resume with the model the masks were"
                " made for, or use a new `SNIPPruning` instance to score this model."
            )
        bound = {n: params[n] for n in whole}
        shards = shard_layout(bound, shapes) if sharded else None
        if shards is not None:
            kept = {
                n: shards[n].take(m, like=local_tensor(bound[n])).to(params[n].device, copy=True)
                for n, m in whole.items()
            }
        else:
            kept = {n: m.to(params[n].device) for n, m in whole.items()}
        self._loaded = None
        self._hold(bound, kept, shards, packed)

    def _shared_seed(self, strategy: Strategy) -> int:
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        return int(strategy.broadcast(seed, src=0))

    def _score(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score the candidates, select the masks and zero the pruned weights; on failure the model is unchanged."""
        strategy = trainer.strategy
        sharded = _is_sharding(strategy)
        shapes = whole_shapes(pl_module) if sharded else None
        candidates = find_candidates(pl_module, self.include, self.exclude, shapes)
        shards = shard_layout(candidates, shapes) if shapes is not None else None  # a collective
        local = {name: local_tensor(p) for name, p in candidates.items()}
        criterion = get_criterion(self.criterion)
        if criterion.needs_data:
            trainer.fit_loop.setup_data()  # what fit would do next; done outside `leave_no_trace` on purpose
        start = time.perf_counter()
        with leave_no_trace(pl_module), restore_flat_grads(pl_module):
            generator = torch.Generator().manual_seed(self._shared_seed(strategy))
            pl_module.train()
            with ExitStack() as stack:
                loss_fn = (
                    stack.enter_context(_training_step_losses(trainer, pl_module, self.num_batches, sharded))
                    if criterion.needs_data
                    else None
                )
                context = ScoringContext(
                    weights=local,
                    loss_fn=loss_fn,
                    num_batches=self.num_batches,
                    all_reduce_mean=lambda t: strategy.reduce(t, reduce_op="mean"),
                    generator=generator,
                )
                if shards is not None:  # each rank scores its own shards; FSDP averages the gradients
                    if loss_fn is not None:
                        context.gradients = lambda: backward_mean_gradients(
                            candidates, loss_fn, self.num_batches, local_tensor
                        )
                    context.shapes = {name: shard.shape for name, shard in shards.items()}
                    context.take_local = lambda name, whole: shards[name].take(whole, like=local[name]).clone()
                scores = criterion.score(context)
        nonzero = holds_nonzero(scores.values())
        if shards is not None:
            try:
                kept = select_masks_distributed(
                    scores, {name: shard.numel for name, shard in shards.items()}, self.sparsity, self.scope
                )
            except ValueError as error:
                raise ScoringError(
                    f"{error} Check the data and the initialization; with `precision='16-mixed'` try 'bf16-mixed'."
                ) from None
            counts = torch.tensor(
                [[int(kept[n].sum()), int(z)] for n, z in zip(scores, nonzero, strict=True)], dtype=torch.int64
            )
            counts = _all_reduce_sum(strategy, counts)
            rows = [
                TensorSparsity(name, tuple(shard.shape), int(counts[i, 0]), shard.numel)
                for i, (name, shard) in enumerate(shards.items())
            ]
            dead = [name for i, name in enumerate(scores) if not counts[i, 1]]
            packed = {name: gather_packed_mask(kept[name], shards[name]) for name in kept}  # collectives
        else:
            dead = [name for name, z in zip(scores, nonzero, strict=True) if not z]
            kept = select_masks(scores, self.sparsity, self.scope)
        del scores
        if candidates and next(iter(local.values())).is_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start

        self._hold(candidates, kept, shards, packed if shards is not None else {})
        self._report(trainer, dead, elapsed, rows if shards is not None else sparsity_report(self._params))

    def _report(self, trainer: Trainer, dead: list[str], elapsed: float, rows: list[TensorSparsity]) -> None:
        for name in dead:
            rank_zero_warn(
                f"`SNIPPruning`: every {self.criterion} score of `{name}` is zero (the loss does not depend on it at"
                " initialization); its mask is decided by tie-breaking alone. Exclude it or check the model."
            )
        for row in rows:
            if row.kept == 0:
                rank_zero_warn(
                    f"`SNIPPruning`: `{row.name}` {row.shape} is pruned entirely (layer collapse), so no signal passes"
                    " through it. Lower `sparsity`, use `scope='layerwise'`, or `exclude` it."
                )
        kept, total = sum(r.kept for r in rows), sum(r.total for r in rows)
        metrics = {
            "snip/sparsity": 1.0 - kept / total,
            "snip/kept_params": float(kept),
            "snip/total_params": float(total),
            "snip/scoring_time_s": elapsed,
        }
        if self.log_per_layer:
            metrics.update({f"snip/sparsity/{r.name}": r.sparsity for r in rows})
        self._log(metrics, trainer)
        if self.plot:
            directory = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
            if trainer.is_global_zero:
                self._plot(trainer, rows, directory)
        rank_zero_info(
            f"SNIPPruning ({self.criterion}, {self.scope}) kept {kept:,} of {total:,} weights"
            f" ({1 - kept / total:.2%} sparsity), scored in {elapsed:.2f}s\n{format_report(rows)}"
        )

    def _plot(self, trainer: Trainer, rows: list[TensorSparsity], directory: Path) -> None:
        global _matplotlib_hint_given
        try:
            from lightning_snip.plots import sparsity_bar_chart

            figure = sparsity_bar_chart(rows, title=f"SNIP ({self.criterion}, {self.scope}): sparsity per tensor")
        except ImportError:
            if not _matplotlib_hint_given:
                _matplotlib_hint_given = True
                rank_zero_info("`SNIPPruning`: `pip install matplotlib` to get a per-tensor sparsity plot.")
            return
        directory.mkdir(parents=True, exist_ok=True)
        figure.savefig(directory / _PLOT_FILE, dpi=110)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("snip/sparsity_per_tensor", figure, global_step=trainer.global_step)

    def _log(self, metrics: dict[str, float], trainer: Trainer) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
