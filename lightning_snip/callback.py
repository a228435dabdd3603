"""``SNIPPruning``: the Lightning glue around the pure scoring and masking functions.

Which hook does what:

- ``setup`` (``structure="channel"`` only): score, select and remove channels, or restore the structure of the
  checkpoint being resumed, before Lightning builds the optimizer and wraps the model.
- ``on_fit_start``: check the strategy and the model; restore masks from a checkpoint, reuse the masks of an earlier
  ``fit`` of the same model, or score the model on batches of the trainer's own train dataloader; zero the pruned
  weights. Under FSDP and ``ModelParallelStrategy`` each rank scores and masks its own shards; the masks are selected
  together.
- ``on_load_checkpoint``: restore the masks of a checkpoint written with other options (another ``state_key``).
- ``on_train_start``: bind or score here instead for strategies that restore checkpoints after ``on_fit_start``;
  zero the optimizer state of pruned weights (restored from a checkpoint, say); install a post-step hook on every
  optimizer that re-zeros pruned weights after each step, unless the step provably left them at zero.
  (The per-step work is ``enforcement.Enforcer``'s; one scoring run is ``pipeline.prune``.)
- ``on_after_backward``: zero the gradients of pruned weights, so optimizer state never builds up for them (under DDP
  and the sharded strategies after the gradients are reduced), with a multiply of each of them prepared when
  training starts.
- ``on_train_batch_end``: on the steps Lightning logs at, log the sparsity measured from the weights and check that
  every pruned weight is still zero; the check runs again before validation, before every checkpoint and when
  training ends.
- ``teardown``: under ``ddp_spawn``/``ddp_fork``, rank zero hands the masks back to the launching process.

What the callback needs from Lightning's internals, for both ``lightning.pytorch`` and ``pytorch_lightning``, is in
``_lightning.py``.
"""

from __future__ import annotations

import os
import uuid
import weakref
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_snip import _lightning as lightning
from lightning_snip import guards, reporting
from lightning_snip._options import check_patterns, validate_options
from lightning_snip._types import PositiveInt, ScopeName, Sparsity, SparsityOf, Structure
from lightning_snip.candidates import (
    canonical_parameters,
    parameter_aliases,
)
from lightning_snip.enforcement import Enforcer, respects_masks, zero_pruned_entries
from lightning_snip.packing import differing, pack_mask, pack_state, unpack_mask, unpack_state
from lightning_snip.pipeline import OPTION_NAMES, Options, all_reduce_sum, prune, prune_channels, with_defaults
from lightning_snip.report import sparsity_report
from lightning_snip.scoring import (
    CriterionName,
    Schedule,
)
from lightning_snip.selection import (
    Scope,
)
from lightning_snip.sharding import (
    Shard,
    local_tensor,
    shard_layout,
    whole_shapes,
)
from lightning_snip.structured import replay, structure_record

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback as _Callback
else:
    _Callback = lightning.callback_base()  # Lightning's Callback, and pytorch_lightning's when it is installed

_CHECK_EVERY_N_STEPS = 50  # how often pruned weights are checked when `log_every_n_steps` is 0


class SNIPPruning(_Callback):
    r"""Prune a network once before training with SNIP, and keep it exactly that sparse.

    At the start of ``fit``, every candidate weight is scored by its connection sensitivity ``|dL/dw * w|`` on
    ``num_batches`` batches of the trainer's own train dataloader (the loss comes from the module's
    ``training_step``); the top ``1 - sparsity`` fraction is kept and the rest set to zero. Scoring leaves no trace but
    the zeros: RNG streams, train/eval modes, buffers, ``.grad`` and torchmetrics states are restored.

    Pruned weights then stay exactly zero (:class:`~lightning_snip.enforcement.Enforcer`): their gradients are zeroed
    after every backward, and after every optimizer step that could move them (any optimizer outside
    :data:`~lightning_snip.enforcement.ZERO_PRESERVING_OPTIMIZERS`, or manual optimization) the weights too. On the
    steps Lightning logs at, before validation, before every checkpoint and at the end of training they are checked;
    a write by anything else is undone, with a warning, and from then on after every step. Masks travel in
    checkpoints, so a resumed run trains with the same mask whatever the new instance's options say (it warns about
    those that differ) and never scores a trained network again. The model is never changed structurally: its
    ``state_dict`` loads into a never-pruned copy.

    Args:
        sparsity: Fraction of candidate weights set to zero, ``0 <= sparsity < 1``. Defaults to ``0.9``.
        num_batches: Batches drawn from the train dataloader for scoring; their gradients are averaged (and, under
            DDP, averaged across ranks too). Defaults to ``1``.
        criterion: ``"snip"`` (``|dL/dw * w|``); the paper's baselines ``"magnitude"`` (``|w|``) and ``"random"``
            (no data); SNIP's successors ``"iterative_snip"`` and ``"force"`` (SNIP in rounds of falling density on
            the masked network, fresh batches each round; FORCE can bring a pruned weight back), ``"synflow"``
            (data-free, iterative, never calls ``training_step``) and ``"grasp"`` (``w * Hg``). See the README for
            what each computes. Defaults to ``"snip"``.
        scope: ``"global"`` ranks all candidates together; ``"layerwise"`` prunes each tensor to ``sparsity`` on its
            own; ``"N:M"`` (e.g. ``"2:4"``) keeps the ``N`` highest scores in every group of ``M`` consecutive weights
            along each candidate's reduction dimension (the weight viewed as ``(shape[0], -1)``: ``in_features`` of a
            linear layer, ``in_channels * kernel elements`` of a convolution), ties to the earlier position; then
            ``sparsity`` must be ``1 - N/M``, and a candidate whose reduction dimension is not a multiple of ``M``
            stays dense (one warning names them). N:M is refused on sharded models (FSDP, ``ModelParallelStrategy``).
            ``"constant_fan_in"`` gives each tensor the count global selection gives it, spread evenly over its rows
            (every output unit keeps the same number of its best inputs: the layout the fastest batch-1 sparse
            kernel of :func:`~lightning_snip.inference.sparsify` reads). Defaults to ``"global"``.
        include: Glob patterns over ``named_parameters()`` names choosing the candidates; any trainable parameter,
            biases too. Defaults to ``None``: every trainable parameter with ``ndim >= 2`` outside normalization
            layers, biases excluded.
        exclude: Glob patterns of parameters never pruned. Defaults to ``None``.
        log_per_layer: Also log ``snip/sparsity/<name>`` per tensor after scoring. Defaults to ``True``.
        plot: After scoring, save a per-tensor sparsity bar chart as ``snip_sparsity.png`` in the trainer's log
            directory (without a logger: a fresh ``snip_logs/version_<n>`` under ``default_root_dir``, so runs never
            overwrite each other; the path is printed) and, with a TensorBoard logger, log it as a figure. Needs
            matplotlib. Defaults to ``True``.
        seed: Seed for the ``"random"`` criterion. Defaults to ``None``: drawn from torch's global generator (so
            ``seed_everything`` makes it reproducible) and shared by all ranks.
        iterations: Rounds of an iterative criterion (``iterative_snip``, ``force``, ``synflow``); ``None`` takes
            the published default (60, 60 and 100). One-shot criteria take only ``None`` or ``1``. Defaults to
            ``None``.
        schedule: How the density falls over the rounds: ``"exponential"`` (``d ** (t / T)``) or ``"linear"``.
            Defaults to ``"exponential"``.
        min_density: Every candidate tensor keeps at least ``ceil(min_density * numel)`` weights (its best-scored),
            taken from the global budget so the total stays exact: a guard against layer collapse. An impossible
            combination is a ``ValueError``. Not on sharded models. Defaults to ``0.0``.
        shuffle: After selection, permute each tensor's mask at random, keeping its count (``seed`` makes it
            reproducible): the per-layer shuffle sanity check of Frankle et al. (ICLR 2021). Not with N:M scopes or
            sharded models. Defaults to ``False``.
        save_compressed: At the end of training, write the trained model's weights compressed
            (:func:`~lightning_snip.compress.compress_state_dict`) to ``snip_compressed.pt`` in the trainer's log
            directory (or the chart's ``snip_logs/version_<n>`` without a logger), and log its size
            (``snip/compressed_bytes``) and how many times smaller it is than the dense tensors
            (``snip/compression_ratio``). Read it back with :func:`~lightning_snip.compress.load_compressed`.
            Defaults to ``False``.
        structure: ``"weight"`` prunes single weights (masks kept through training); ``"channel"`` removes whole
            channels in ``setup``, before the optimizer is built, so a physically smaller network trains: every
            one-shot criterion's per-weight scores are summed per channel group (see
            :mod:`lightning_snip.structured`; needs the extra ``lightning-snip[structured]``), ``sparsity`` is the
            fraction of prunable channels removed, and nothing is masked during training. Defaults to ``"weight"``.
        width_multiple: With ``structure="channel"``, each layer's kept width is rounded up to a multiple of this.
            Defaults to ``1``.
        sparsity_of: With ``structure="channel"``, what ``sparsity`` counts: ``"channels"`` (the fraction of
            prunable channels removed), ``"parameters"`` or ``"macs"``. With the last two, channels are removed in
            the order ``scope`` ranks them (``"global"``: by score per unit of the size one channel frees) until at
            most ``floor((1 - sparsity) * S)`` of the model's size ``S`` is left, the fewest channels that get there:
            its parameters (biases and normalization parameters count), or its weight MACs (every convolution's and
            linear layer's weight entries times the output positions it is applied at, for the one example the
            channels are traced with: the multiply-accumulates that set a step's cost). They make global and
            layerwise widths, or channel and unstructured pruning, comparable at equal size or equal compute. With
            ``structure="weight"`` only ``"channels"`` (``sparsity`` is then the fraction of candidate weights).
            Defaults to ``"channels"``.
        temperature: What the LightningModule's output (the logits) is divided by while a criterion that takes a
            temperature scores: GraSP, through a forward hook removed after scoring, so ``training_step`` must get its
            logits from ``self(x)``. ``None`` takes the criterion's default (GraSP: the official 200); ``1.0``
            scores the loss as it is. Other criteria take none. Defaults to ``None``.
        linear_reinit: Whether a criterion that takes it scores with every ``nn.Linear`` weight redrawn from a
            Xavier-normal distribution (from ``seed``), the weights being put back after scoring, so only the masks
            differ: GraSP, whose official code scores this way. ``None`` takes the criterion's default (GraSP:
            ``True``); ``False`` scores the model's own weights. Other criteria take none. Defaults to ``None``.

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
        sparsity: Sparsity = 0.9,
        num_batches: PositiveInt = 1,
        criterion: CriterionName = "snip",
        scope: ScopeName = "global",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        log_per_layer: bool = True,
        plot: bool = True,
        seed: int | None = None,
        iterations: PositiveInt | None = None,
        schedule: Schedule = "exponential",
        min_density: float = 0.0,
        shuffle: bool = False,
        save_compressed: bool = False,
        structure: Structure = "weight",
        width_multiple: PositiveInt = 1,
        temperature: float | None = None,
        linear_reinit: bool | None = None,
        sparsity_of: SparsityOf = "channels",
    ) -> None:
        super().__init__()
        validate_options(
            sparsity=sparsity,
            num_batches=num_batches,
            criterion=criterion,
            scope=scope,
            flags={
                "log_per_layer": log_per_layer,
                "plot": plot,
                "shuffle": shuffle,
                "save_compressed": save_compressed,
            },
            seed=seed,
            iterations=iterations,
            schedule=schedule,
            min_density=min_density,
            structure=structure,
            width_multiple=width_multiple,
            temperature=temperature,
            linear_reinit=linear_reinit,
            sparsity_of=sparsity_of,
        )
        self.sparsity = float(sparsity)
        self.num_batches = num_batches
        self.criterion = criterion
        self.scope: Scope = str(scope)
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.log_per_layer = log_per_layer
        self.plot = plot
        self.seed = seed
        self.iterations = iterations
        self.schedule: Schedule = schedule
        self.min_density = float(min_density)
        self.shuffle = shuffle
        self.save_compressed = save_compressed
        self.structure: Structure = structure
        self.width_multiple = width_multiple
        self.temperature = None if temperature is None else float(temperature)
        self.linear_reinit = linear_reinit
        self.sparsity_of: SparsityOf = sparsity_of
        self._init_state()

    def _init_state(self) -> None:
        """The state held between hooks: masks, where they came from, and the step bookkeeping."""
        self._loaded: dict[str, Tensor] | None = None  # whole kept masks on CPU, not yet bound, from ...
        self._loaded_from = "checkpoint"  # ... a checkpoint, or an "earlier fit" in spawned workers
        self._masks_config: dict[str, Any] | None = None  # the options the held masks were made with, if not these
        self._module: weakref.ref[nn.Module] | None = None  # the module the held masks were made for
        self._trained_steps = 0  # steps of a checkpoint restored without masks (its weights are trained)
        self._token, self._home_pid = uuid.uuid4().hex, os.getpid()  # where spawned workers return the masks
        self._params: dict[str, nn.Parameter] = {}  # candidates the masks are bound to
        self._kept: dict[str, Tensor] = {}  # True = kept, like each local weight, on its device (1 byte per weight)
        self._shards: dict[str, Shard] | None = None  # where each rank's part lies, when the model is sharded
        self._packed: dict[str, Tensor] = {}  # whole masks, bit-packed on CPU, when the model is sharded
        self._enforcer = Enforcer({}, {})  # the per-step zeroing of `_params` by `_kept`
        self._last_logged_step = -1
        self._last_checked_step = -1
        self._structure: list[dict[str, Any]] | None = None  # the channels removed (`structure='channel'`)

    # ------------------------------------------------------------------ public state

    @property
    def masks(self) -> dict[str, Tensor]:
        """The whole masks by parameter name (``True`` = kept), as new tensors; empty before scoring.

        On a sharded model every rank returns the whole masks, on CPU. After a ``ddp_spawn`` fit the launching
        process holds the masks its workers made.
        """
        self._collect_from_workers()
        if self._loaded is not None:
            return {name: mask.clone() for name, mask in self._loaded.items()}
        if self._shards is not None:
            return {name: unpack_mask(packed, self._shards[name].shape) for name, packed in self._packed.items()}
        return {name: mask.clone() for name, mask in self._kept.items()}

    def _whole_mask(self, name: str, shape: torch.Size) -> Tensor | None:
        """On a sharded model, the whole mask of ``name`` when ``shape`` is its whole shape, else ``None``."""
        assert self._shards is not None
        whole_shape = self._shards[name].shape
        return unpack_mask(self._packed[name], whole_shape) if tuple(shape) == tuple(whole_shape) else None

    def _packed_masks(self) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
        """The whole masks bit-packed, and their shapes."""
        if self._loaded is None and self._shards is not None:
            return dict(self._packed), {name: list(self._shards[name].shape) for name in self._packed}
        masks = self._loaded if self._loaded is not None else self._kept
        return {name: pack_mask(m) for name, m in masks.items()}, {name: list(m.shape) for name, m in masks.items()}

    def _options(self) -> Options:
        return Options(**{name: getattr(self, name) for name in OPTION_NAMES})

    def _config(self) -> dict[str, Any]:
        return self._options().config()

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in OPTION_NAMES:
            self.__dict__.pop("state_key", None)

    @cached_property
    @override
    def state_key(self) -> str:
        # Lightning reads this on every hook call, due or not (profiler names): built once per configuration, then
        # read from the instance's dict like a plain attribute, until an option changes
        return self._generate_state_key(**self._config())

    @override
    def state_dict(self) -> dict[str, Any]:
        self._collect_from_workers()
        state = pack_state(*self._packed_masks(), self._masks_config or self._config())  # 1 bit per weight
        if self._structure is not None:
            state["structure"] = [dict(entry) for entry in self._structure]
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        masks, config = unpack_state(state_dict)
        structure = state_dict.get("structure")
        if self.structure == "channel" or structure is not None:
            self._structure = list(structure) if structure is not None else None
            self._masks_config = config
            return
        self._forget()
        self._loaded, self._loaded_from, self._masks_config = masks or None, "checkpoint", config

    def differing_options(self) -> list[str]:
        """The options of this instance that differ from those the held masks were restored with, as text.

        Example::

            >>> pruning = SNIPPruning(sparsity=0.9, num_batches=2)
            >>> pruning.load_state_dict({"config": {**pruning._config(), "num_batches": 1}, "masks": {}})
            >>> pruning.differing_options()
            ['num_batches=1 (this instance: 2)']
        """
        held = None if self._masks_config is None else with_defaults(self._masks_config)
        return differing(held, with_defaults(self._config()))

    # ------------------------------------------------------------------ hooks

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # Lightning passes it to `load_state_dict` next
        claimed = {cb.state_key for cb in trainer.callbacks if isinstance(cb, SNIPPruning)}  # type: ignore[attr-defined]
        state = lightning.unclaimed_state(trainer, states, "SNIPPruning", claimed)
        if state is not None:
            self.load_state_dict(state)
        else:
            self._trained_steps = int(checkpoint.get("global_step", 0))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.structure != "channel" or stage != "fit":
            return
        lightning.check_strategy(trainer.strategy)
        same = self._module is not None and self._module() is pl_module
        if self._structure is not None and same:
            return  # the model of an earlier fit, already shrunk
        ckpt_path = lightning.pending_checkpoint(trainer)
        if ckpt_path:
            record = self._structure_from(trainer, ckpt_path)
            if record is not None:
                replay(pl_module, record)  # before Lightning loads the checkpoint's (smaller) weights
                self._structure, self._module = record, weakref.ref(pl_module)
                lightning.rank_zero_info(
                    trainer,
                    f"SNIPPruning: the checkpoint's channel structure restored ({len(record)} layer changes), not"
                    " scored again.",
                )
                return
        trainer.precision_plugin.convert_module(pl_module)  # what the strategy's setup would do next
        pl_module.to(trainer.strategy.root_device)
        shrunk = prune_channels(trainer, pl_module, self._options())
        self._structure, self._module, self._masks_config = shrunk.record, weakref.ref(pl_module), None
        reporting.report_channels(trainer, f"{self.criterion}, {self.scope}", shrunk, chart=self.plot)

    def _structure_from(self, trainer: Trainer, ckpt_path: Any) -> list[dict[str, Any]] | None:
        """The channel structure record this callback stored in the checkpoint at ``ckpt_path``, if any."""
        checkpoint = trainer.strategy.checkpoint_io.load_checkpoint(ckpt_path)
        own = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if isinstance(own, dict) and own.get("structure") is not None:
            return [dict(entry) for entry in own["structure"]]
        return structure_record(checkpoint)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.structure == "channel":
            return  # shrunk in `setup`; nothing is masked
        lightning.check_strategy(trainer.strategy)
        self._collect_from_workers()
        self._prepare(trainer, pl_module, score=not trainer.strategy.restore_checkpoint_after_setup)
        # otherwise a checkpoint (maybe with masks) is restored after this hook: decide in `on_train_start`

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.structure == "channel":
            return
        if self._loaded is not None or not self._kept:  # restored after `on_fit_start`, or not scored yet
            self._prepare(trainer, pl_module, score=True)
        self._last_checked_step = -1
        self._enforcer.attach(trainer.optimizers, automatic=pl_module.automatic_optimization)
        self._enforcer.zero_weights()  # weights may have been restored since binding

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._enforcer.mask_gradients()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.log_every_n_steps > 0:  # type: ignore[attr-defined]  # on the steps Lightning logs at, with its step number
            step = lightning.logging_step(trainer)
            if step is None or step == self._last_logged_step:
                return
            self._last_logged_step = step
            self._log_sparsity(trainer, step)
        elif trainer.global_step % _CHECK_EVERY_N_STEPS or trainer.global_step == self._last_checked_step:
            return
        self._last_checked_step = trainer.global_step
        self._check_pruned_weights(trainer, f"after step {trainer.global_step}")

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._check_pruned_weights(trainer, f"before validation at step {trainer.global_step}")

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self._params:
            return
        self._check_pruned_weights(trainer, f"before saving a checkpoint at step {trainer.global_step}")
        state = checkpoint.get("state_dict")
        if isinstance(state, dict) and state:  # it may hold copies taken before this hook (gathered shards)
            aliases = parameter_aliases(pl_module)
            whole = None if self._shards is None else self._whole_mask  # a gathered state dict holds whole tensors
            zero_pruned_entries(state, self._params, self._kept, aliases, whole, local_tensor)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_pruned_weights(trainer, "at the end of training")
        if self.save_compressed:
            reporting.write_compressed(trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._enforcer.detach()
        if stage == "fit" and self._kept:  # the launching process reads it in `_collect_from_workers`
            lightning.hand_back(trainer, self.state_dict, self._home_pid, self._token)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._enforcer.detach()

    def __getstate__(self) -> dict[str, Any]:
        self._collect_from_workers()  # a second `ddp_spawn` fit gets the masks of the first
        state = self.__dict__.copy()
        state.update(_module=None)
        return state

    # ------------------------------------------------------------------ internals

    def _prepare(self, trainer: Trainer, pl_module: LightningModule, score: bool) -> None:
        """Bind restored masks, reuse those of an earlier fit of the same model, or (if ``score``) score."""
        restored = self._loaded is not None and self._loaded_from == "checkpoint"
        held = bool(self._kept) or self._loaded is not None
        if restored or (held and self._same_model(trainer, pl_module)):
            self._bind(trainer, pl_module)
        elif score:
            self._score(trainer, pl_module)

    def _same_model(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Whether the held masks (of an earlier fit) belong to ``pl_module``; forget them, and say so, if not.

        The same module object, or (under ``ddp_spawn``, where workers get copies) a model whose weights are zero
        wherever the masks prune.
        """
        same = self._module is not None and self._module() is pl_module
        if not same and not lightning.is_sharding(trainer.strategy):
            same = respects_masks(canonical_parameters(pl_module), self.masks)
        if same:
            kept, total = self._kept_total()
            lightning.rank_zero_info(
                trainer,
                f"SNIPPruning: the model of the earlier fit, already pruned: training on with its masks ({kept:,} of"
                f" {total:,} weights kept), not scoring again.",
            )
            return True
        lightning.rank_zero_info(
            trainer, "SNIPPruning: a different model from the earlier fit: its masks are dropped, this one is scored."
        )
        self._forget()
        return False

    def _kept_total(self) -> tuple[int, int]:
        masks = self.masks.values()
        return sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)

    def _forget(self) -> None:
        self._loaded, self._masks_config, self._module = None, None, None
        self._hold({}, {}, None, {})

    def _collect_from_workers(self) -> None:
        """In the launching process, take the masks that ``ddp_spawn``/``ddp_fork`` workers handed back."""
        state = lightning.take_handed_back(self._home_pid, self._token)
        if state is not None:
            self.load_state_dict(state)
            self._loaded_from = "earlier fit"

    def _log_sparsity(self, trainer: Trainer, step: int) -> None:
        sharded = self._shards is not None  # then every rank counts its shards
        if not trainer.loggers or not (sharded or trainer.is_global_zero) or not self._params:
            return
        zeros = self._enforcer.count_zeros()
        if self._shards is not None:
            zeros = int(all_reduce_sum(trainer.strategy, torch.tensor([zeros]))[0])
            total = sum(shard.numel for shard in self._shards.values())
        else:
            total = sum(p.numel() for p in self._params.values())
        reporting.log_metrics({"snip/sparsity": zeros / total}, trainer, step)

    def _check_pruned_weights(self, trainer: Trainer, when: str) -> None:
        """Zero pruned weights that something besides the optimizer step set, warn, and re-zero after every step."""
        first = not self._enforcer.rezero_every_step
        counts = self._enforcer.repair()
        if not counts or not first:
            return
        reporting.warn_pruned_writes(trainer, when, counts, per_rank=self._shards is not None)

    def _hold(
        self,
        params: dict[str, nn.Parameter],
        kept: dict[str, Tensor],
        shards: dict[str, Shard] | None,
        packed: dict[str, Tensor],
    ) -> None:
        """Hold masks bound to ``params``, prepare them for the per-step zeroing and zero the pruned weights."""
        self._enforcer.detach()
        self._params, self._kept, self._shards, self._packed = params, kept, shards, packed
        self._enforcer = Enforcer(params, kept, local_tensor if shards is not None else None)
        self._enforcer.zero_weights()

    def _bind(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attach held masks to the module's parameters (by name), move them to their devices, zero the weights."""
        sharded = lightning.is_sharding(trainer.strategy)
        restored = self._loaded is not None and self._loaded_from == "checkpoint"
        whole = self.masks if self._loaded is None and self._shards is not None else (self._loaded or self._kept)
        packed = self._packed_masks()[0] if sharded else {}  # the packed masks already held, when there are some
        params = canonical_parameters(pl_module)
        shapes = whole_shapes(pl_module) if sharded else {name: p.shape for name, p in params.items()}
        guards.check_masks_fit(trainer, whole, {name: shapes[name] for name in params})
        guards.refuse_sparse_gradients(trainer, pl_module, whole)
        bound = {n: params[n] for n in whole}
        shards = shard_layout(bound, shapes) if sharded else None
        if shards is not None:
            kept = {
                n: shards[n].take(m, like=local_tensor(bound[n])).to(params[n].device, copy=True)
                for n, m in whole.items()
            }
        else:
            kept = {n: m.to(params[n].device) for n, m in whole.items()}
        differing = self.differing_options() if restored else []
        self._loaded = None
        self._hold(bound, kept, shards, packed)
        self._module = weakref.ref(pl_module)
        if not restored:
            return
        reporting.report_restored(trainer, differing, *self._kept_total())

    def _score(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score the candidates, select the masks and zero the pruned weights; on failure the model is unchanged."""
        pruned = prune(trainer, pl_module, self._options(), self._trained_steps)
        self._trained_steps = 0
        self._hold(pruned.params, pruned.kept, pruned.shards, pruned.packed)
        self._module, self._masks_config = weakref.ref(pl_module), None
        reporting.report_scoring(
            trainer,
            f"{self.criterion}, {self.scope}",
            pruned.dead,
            pruned.seconds,
            pruned.rows if pruned.shards is not None else sparsity_report(self._params),
            per_layer=self.log_per_layer,
            chart=self.plot,
        )
