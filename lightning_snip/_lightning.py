"""What the callback needs from Lightning's internals, in one place to audit on each Lightning release.

Both namespaces work: ``lightning.pytorch`` and the standalone ``pytorch_lightning`` package hold the same classes
under different module paths, so everything that compares classes or calls Lightning's helpers resolves the
namespace from the trainer it is given (:func:`namespace`), never from an import at the top of a file.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_snip.scoring import ScoringError

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.strategies import Strategy

_NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


@cache
def _import(name: str) -> ModuleType:
    module = importlib.import_module(name)
    for sub in ("callbacks", "loggers", "strategies", "utilities", "utilities.exceptions"):
        importlib.import_module(f"{name}.{sub}")
    return module


def namespace(obj: object) -> ModuleType:
    """The Lightning package ``obj`` (a trainer, a strategy) belongs to: ``lightning.pytorch`` or ``pytorch_lightning``.

    Subclasses defined elsewhere are resolved through their bases.
    """
    for cls in type(obj).__mro__:
        module = cls.__module__
        for name in _NAMESPACES:
            if module == name or module.startswith(name + "."):
                return _import(name)
    return _import("lightning.pytorch")


def callback_base() -> type:
    """``Callback`` of ``lightning.pytorch``, combined with ``pytorch_lightning``'s when that package is installed.

    The callback then passes the ``isinstance`` checks of both trainers and of both LightningCLIs.
    """
    from lightning.pytorch.callbacks import Callback

    try:
        from pytorch_lightning.callbacks import Callback as StandaloneCallback
    except ImportError:
        return Callback
    return type("Callback", (Callback, StandaloneCallback), {"__module__": __name__})


def misconfiguration(trainer: object, message: str) -> Exception:
    """Lightning's ``MisconfigurationException`` of the trainer's own namespace."""
    return namespace(trainer).utilities.exceptions.MisconfigurationException(message)


def rank_zero_info(trainer: object, message: str) -> None:
    """Print ``message`` on rank zero only, through the trainer's own namespace (which knows the rank)."""
    namespace(trainer).utilities.rank_zero_info(message)


def rank_zero_warn(trainer: object, message: str) -> None:
    """Warn on rank zero only, through the trainer's own namespace."""
    namespace(trainer).utilities.rank_zero_warn(message, stacklevel=2)


def is_sharding(strategy: Strategy) -> bool:
    """Whether the strategy shards parameters across ranks (FSDP, ``ModelParallelStrategy``)."""
    strategies = namespace(strategy).strategies
    return isinstance(strategy, (strategies.FSDPStrategy, strategies.ModelParallelStrategy))


def check_strategy(strategy: Strategy) -> None:
    """Refuse strategies whose parameters the masks cannot follow, naming the one used and the alternatives.

    Raises:
        MisconfigurationException: For DeepSpeed, XLA, or any strategy the callback does not know.
    """
    strategies = namespace(strategy).strategies
    if isinstance(strategy, strategies.DeepSpeedStrategy):  # a DDPStrategy subclass
        why = "DeepSpeed ZeRO keeps parameters in flat partitions that the masks cannot follow"
    elif isinstance(strategy, strategies.XLAStrategy):
        why = "XLA's lazy tensors are not supported by the mask enforcement"
    elif is_sharding(strategy) or isinstance(strategy, (strategies.SingleDeviceStrategy, strategies.DDPStrategy)):
        return
    else:
        why = "it is not one of the strategies the callback is known to keep sparse"
    name = type(strategy).__name__
    raise misconfiguration(
        strategy,
        f"`SNIPPruning` does not support `{name}`: {why}, and pruning nothing silently is not an option. To shard the"
        " model use `strategy='fsdp'` or `ModelParallelStrategy` with `fully_shard`; to replicate it use"
        " `strategy='ddp'` (also 'ddp_spawn', 'ddp_fork'); or train on a single device.",
    )


def pending_checkpoint(trainer: Trainer) -> str | None:
    """The ``ckpt_path`` the running ``fit`` will restore, already while callbacks' ``setup`` runs.

    Lightning restores a checkpoint after the ``setup`` hooks and holds its path only as an argument of
    ``Trainer._run`` until then, so it is read from that call's frame. ``None`` when nothing is restored.
    """
    run = getattr(type(trainer), "_run", None)
    code = getattr(run, "__code__", None)
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code and frame.f_locals.get("self") is trainer:
            path = frame.f_locals.get("ckpt_path")
            return None if path is None else str(path)
        frame = frame.f_back  # type: ignore[assignment]
    return None


def is_spawned_worker(trainer: Trainer) -> bool:
    """Whether this process is a worker that ``ddp_spawn``/``ddp_fork`` launched (its results go back by pickle)."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if launcher is None:
        return False
    launchers = importlib.import_module(f"{namespace(trainer).__name__}.strategies.launchers.multiprocessing")
    return isinstance(launcher, launchers._MultiProcessingLauncher)


def logging_step(trainer: Trainer) -> int | None:
    """The step Lightning logs the current training batch's metrics at, or ``None`` when it logs none for it.

    The same rule as Lightning's own ``self.log`` in ``training_step``: every ``log_every_n_steps`` optimizer steps
    (never during gradient accumulation), at ``step = batches that stepped``.
    """
    loop = trainer.fit_loop
    every = trainer.log_every_n_steps  # type: ignore[attr-defined]
    if (loop.epoch_loop._batches_that_stepped + 1) % every and not trainer.should_stop:
        return None  # `should_update_logs`'s rule for the fit loop, first: the cheap answer on most steps
    if loop._should_accumulate() and trainer.lightning_module.automatic_optimization:
        return None
    if not trainer._logger_connector.should_update_logs:
        return None
    return int(loop.epoch_loop._batches_that_stepped)


def example_input(pl_module: LightningModule, loss_fn: Callable[[int], Tensor] | None) -> Tensor:
    """An input of the model's input shape with batch size 1, float, for a data-free criterion that runs the model.

    From the module's ``example_input_array`` (Lightning's convention; its first tensor when it is a tuple, list or
    dict), else from the first tensor of the first train batch (``loss_fn.batch_at(0)``, no step is run).

    Raises:
        ScoringError: If no input is found or it is not a floating-point tensor.
    """
    declared = getattr(pl_module, "example_input_array", None)
    source = "`example_input_array`"
    if declared is None and loss_fn is not None:
        declared, source = loss_fn.batch_at(0)[0], "the first train batch"  # type: ignore[attr-defined]
    tensors = [declared] if isinstance(declared, Tensor) else list(_tensors_in(declared))
    if not tensors or not tensors[0].is_floating_point() or tensors[0].dim() == 0:
        found = tensors[0].dtype if tensors else type(declared).__name__
        raise ScoringError(
            f"This criterion runs the model on an all-ones float input shaped like its input, but {source} gives"
            f" {found}. Set the module's `example_input_array` to a float tensor of the model's input shape (e.g."
            " `self.example_input_array = torch.zeros(1, 1, 28, 28)`), or use another criterion."
        )
    return tensors[0][:1]


def _tensors_in(value: object) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


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


def _closure_only(closure: Callable[[], Any] | None = None, *args: Any, **kwargs: Any) -> Any:
    """An optimizer step that runs its closure (whose ``manual_backward`` records the loss) and steps nothing."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _generators(loader: DataLoader) -> list[torch.Generator]:
    """The random generators a loader draws from besides the global one: its own, its samplers'."""
    found: list[torch.Generator] = []
    for owner in (loader, loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _private_loader(loader: DataLoader, stack: ExitStack) -> DataLoader:
    """A loader for scoring that leaves ``loader``'s iterator and generators as training will find them.

    A loader with persistent workers keeps one iterator for its whole life: scoring through it would consume and
    reorder the batches of the first epoch, so scoring uses a shallow copy with workers of its own. Generators that
    the loader or its samplers own are restored on exit.
    """
    for generator in _generators(loader):
        stack.callback(generator.set_state, generator.get_state())
    if not (loader.persistent_workers and loader.num_workers > 0):
        return loader  # `iter` builds a fresh iterator every time
    private = copy.copy(loader)
    private.__dict__["_iterator"] = None
    private.__dict__["persistent_workers"] = False  # its workers end with its iterator
    return private


@contextmanager
def training_step_losses(
    trainer: Trainer, pl_module: LightningModule, num_batches: int, through_strategy: bool = False
) -> Iterator[Callable[[int], Tensor]]:
    """Yield ``loss_fn(i)``: the module's own ``training_step`` loss on the ``i``-th train batch.

    Batch ``i`` is drawn once; the last ``num_batches`` drawn can be asked for again (GraSP's second pass).

    Batches are drawn from a fresh iterator over the trainer's train dataloader (never the one training uses; see
    :func:`_private_loader`) and moved to the device through the trainer's batch-transfer hooks. Inside the context
    ``self.log`` is a no-op, ``manual_backward`` records the loss instead of stepping, and optimizer and scheduler
    steps do nothing, so manual optimization scores too. With ``through_strategy`` the step runs through
    ``strategy.training_step``, so a sharded model's forward hooks (which gather the parameters) run around it, as in
    training. An optimizer step given a closure (``opt.step(closure=closure)``, Lightning's documented pattern, and
    the one L-BFGS needs) runs the closure and steps nothing, so its ``manual_backward`` gives the loss.

    When scoring needs more batches than one pass over the loader holds (an iterative criterion's rounds), a fresh
    pass begins, as a new epoch would; only a loader that yields nothing is an error.
    """
    combined = _batchwise_train_data(trainer, pl_module)
    pass_batch_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)
    recorded: list[Tensor] = []

    def record_backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
        recorded.append(loss)

    with ExitStack() as stack:
        batches = _ScoringBatches(trainer, pl_module, combined, num_batches, stack)

        def loss_fn(i: int) -> Tensor:
            batch, batch_idx = batches.batch_at(i)
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

        loss_fn.batch_at = batches.batch_at  # type: ignore[attr-defined]  # the batch itself, for a model's input shape
        stack.enter_context(_override(pl_module, log=_ignore, log_dict=_ignore, manual_backward=record_backward))
        for optimizer in [*trainer.optimizers, *getattr(trainer.strategy, "_lightning_optimizers", [])]:
            stack.enter_context(_override(optimizer, step=_closure_only, zero_grad=_ignore))
        for config in trainer.lr_scheduler_configs:
            stack.enter_context(_override(config.scheduler, step=_ignore))
        try:
            yield loss_fn
        finally:
            batches.close()


def _batchwise_train_data(trainer: Trainer, pl_module: LightningModule) -> Any:
    """The trainer's combined train loader, checked to have data and to be stepped one batch per ``training_step``."""
    combined = trainer.fit_loop._combined_loader
    if combined is None or not combined.flattened:
        raise ScoringError(
            "`SNIPPruning` scores with batches of the train dataloader, but the trainer has none (check"
            " `limit_train_batches` and the `train_dataloader`). Provide training data or use `criterion='magnitude'`."
        )
    if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
        raise misconfiguration(
            trainer,
            "`SNIPPruning` cannot score a `training_step(self, dataloader_iter)`: it needs one batch per call. Use"
            " `criterion='magnitude'` or `'random'`, or a batch-wise `training_step`.",
        )
    return combined


class _ScoringBatches:
    """Train batches for scoring, drawn once each from a private iterator.

    They are moved to the device as Lightning's loop does, and the last ``num_batches`` are kept for reuse.
    """

    def __init__(
        self, trainer: Trainer, pl_module: LightningModule, combined: Any, num_batches: int, stack: ExitStack
    ) -> None:
        self.trainer, self.pl_module, self.combined, self.num_batches = trainer, pl_module, combined, num_batches
        self.iterables = apply_to_collection(combined.iterables, DataLoader, _private_loader, stack)
        self.iterator: Iterator[Any] | None = None
        self.batches: dict[int, tuple[Any, int]] = {}
        self.fetched = 0  # batches drawn so far, over all passes
        self.pass_start = 0  # how many had been drawn when the current pass began
        self.passes = 0  # passes that ran out

    def batch_at(self, i: int) -> tuple[Any, int]:
        """Batch ``i`` on the device, and its index; drawn now if it has not been yet.

        When a pass over the loader ends before batch ``i``, a fresh pass begins (as the next epoch would).

        Raises:
            ScoringError: If a pass over the loader yields no batch at all.
        """
        while self.fetched <= i:
            batch, batch_idx = self._next()
            # the same transfer path as Lightning's training loop
            batch = self.trainer.precision_plugin.convert_input(batch)
            batch = self.pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
            self.batches[self.fetched] = (self.trainer.strategy.batch_to_device(batch, dataloader_idx=0), batch_idx)
            self.batches.pop(self.fetched - self.num_batches, None)
            self.fetched += 1
        if i not in self.batches:
            raise ScoringError(f"Scoring batch {i} was released; a criterion may reuse the last {self.num_batches}.")
        return self.batches[i]

    def _next(self) -> tuple[Any, int]:
        """The next batch of the current pass over the loader, beginning a fresh pass when one ends."""
        for _ in range(2):
            if self.iterator is None:
                self.iterator = iter(type(self.combined)(self.iterables, mode=self.combined._mode))
                self.pass_start = self.fetched
            try:
                batch, batch_idx, _ = next(self.iterator)
                return batch, batch_idx
            except StopIteration:
                self.iterator = None
                if self.fetched == self.pass_start:
                    break
                if self.passes == 0:
                    rank_zero_info(
                        self.trainer,
                        f"SNIPPruning: scoring needs more batches than the train dataloader's {self.fetched} per pass"
                        " (the rounds of an iterative criterion, or `num_batches`): a fresh pass over it begins.",
                    )
                self.passes += 1
        raise ScoringError(
            "`SNIPPruning` scores with batches of the train dataloader, but a pass over it yielded no batch. Provide"
            " training data (check `limit_train_batches` and the dataset) or use `criterion='magnitude'`."
        )

    def close(self) -> None:
        """Drop the iterator, which ends the workers of a private loader's iterator."""
        self.iterator = None


def _handback_path(home_pid: int, token: str) -> Path:
    return Path(tempfile.gettempdir()) / f"lightning-snip-{home_pid}-{token}.pt"


def hand_back(trainer: Trainer, state: Callable[[], dict[str, Any]], home_pid: int, token: str) -> None:
    """In rank zero of ``ddp_spawn``/``ddp_fork`` workers, write ``state()`` where the launching process looks."""
    if trainer.is_global_zero and os.getpid() != home_pid and is_spawned_worker(trainer):
        torch.save(state(), _handback_path(home_pid, token))


def take_handed_back(home_pid: int, token: str) -> dict[str, Any] | None:
    """In the launching process, the state its spawned workers handed back (once), or ``None``."""
    path = _handback_path(home_pid, token)
    if os.getpid() != home_pid or not path.exists():
        return None
    state = torch.load(path, weights_only=True)
    path.unlink()
    return state


def unclaimed_state(
    trainer: Trainer, states: Mapping[Any, Any], class_name: str, claimed: set[str]
) -> dict[str, Any] | None:
    """The one state of a ``class_name`` callback in a checkpoint's ``callbacks`` that no callback claims, or ``None``.

    Raises:
        MisconfigurationException: If there are several, so which to restore is ambiguous.
    """
    free = [
        key
        for key, state in states.items()
        if isinstance(key, str)
        and key.startswith(class_name + "{")
        and isinstance(state, Mapping)
        and key not in claimed
    ]
    if len(free) > 1:
        raise misconfiguration(
            trainer,
            f"The checkpoint holds the masks of {len(free)} `{class_name}` callbacks ({free}) and none matches this"
            " instance's options, so which to restore is ambiguous. Resume with callbacks configured as when"
            " the checkpoint was written.",
        )
    return copy.deepcopy(dict(states[free[0]])) if free else None
