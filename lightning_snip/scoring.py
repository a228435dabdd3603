"""What every pruning criterion is given and returns, the gradients they share, and the registry of criteria.

Plain PyTorch, no Lightning. A criterion turns a :class:`ScoringContext` (the candidate weights, a way to compute the
loss on scoring batches, and a random generator) into one score tensor per candidate; higher means more important.
:func:`~lightning_snip.selection.select_masks` then keeps the top scores. The built-in criteria live in
``lightning_snip/criteria/``, one file each.

Adding a criterion means subclassing :class:`Criterion` under :func:`register_criterion`; nothing else changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from lightning_snip.selection import all_finite

#: Names of the built-in criteria, for static checking and LightningCLI validation.
CriterionName = Literal["snip", "magnitude", "random", "iterative_snip", "force", "synflow", "grasp"]
Schedule = Literal["exponential", "linear"]

LossFn = Callable[[int], Tensor]
"""Returns the scalar loss on scoring batch ``i`` (``0 <= i < num_batches``) with its autograd graph attached."""


class ScoringError(RuntimeError):
    """Scoring could not produce valid scores; the model is left as it was."""


@dataclass
class ScoringContext:
    """Everything a criterion may use to score the candidate weights.

    Args:
        weights: The candidate parameters by name.
        loss_fn: Computes the loss on scoring batch ``i``. Defaults to ``None`` (data-free criteria only).
        num_batches: How many scoring batches ``loss_fn`` serves. Defaults to ``1``.
        all_reduce_mean: Averages a tensor across processes (identity on one process). Defaults to ``None``.
        generator: Source of randomness for stochastic criteria. Defaults to ``None`` (torch's global generator).
        gradients: Computes the mean gradients in place of :func:`mean_gradients`, e.g. by backward under FSDP,
            where each process gets the gradient of its own shard. Defaults to ``None``.
        shapes: The whole shape of each weight when ``weights`` are this process's shards. Defaults to ``None``
            (the weights are whole).
        take_local: Cuts this process's shard out of a tensor shaped like the whole weight ``name``, as a new
            tensor. Defaults to ``None`` (the weights are whole).
        sparsity: The final sparsity the masks will have. Defaults to ``0.0``.
        iterations: Rounds of an iterative criterion. Defaults to ``1``.
        schedule: How the density falls over the rounds: ``"exponential"`` (``d ** (t / T)``) or ``"linear"``
            (``1 - (1 - d) * t / T``), with ``d = 1 - sparsity``. Defaults to ``"exponential"``.
        select: Selects masks (``True`` = kept) at a sparsity from scores, with the caller's scope and exact
            counts; iterative criteria prune with it between rounds. Defaults to ``None``.
        module: The model, for criteria that run its forward themselves (SynFlow) or hook it (GraSP's temperature).
            Defaults to ``None``.
        example_input: An input of the model's input shape with batch size 1 (SynFlow). Defaults to ``None``.
        temperature: What ``module``'s output (the logits) is divided by while the criterion scores (GraSP's ``T``);
            ``1.0`` leaves it alone. Defaults to ``1.0``.
        linear_reinit: Score with every ``nn.Linear`` weight of ``module`` redrawn from a Xavier-normal
            distribution (drawn from ``generator``), as GraSP's official code does; the weights are put back after
            scoring. Defaults to ``False``.
    """

    weights: Mapping[str, Tensor]
    loss_fn: LossFn | None = None
    num_batches: int = 1
    all_reduce_mean: Callable[[Tensor], Tensor] | None = None
    generator: torch.Generator | None = None
    gradients: Callable[[], dict[str, Tensor]] | None = None
    shapes: Mapping[str, torch.Size] | None = None
    take_local: Callable[[str, Tensor], Tensor] | None = None
    sparsity: float = 0.0
    iterations: int = 1
    schedule: Schedule = "exponential"
    select: Callable[[Mapping[str, Tensor], float], dict[str, Tensor]] | None = None
    module: nn.Module | None = None
    example_input: Tensor | None = None
    temperature: float = 1.0
    linear_reinit: bool = False

    def mean_gradients(self, round_index: int = 0) -> dict[str, Tensor]:
        """Gradient of the loss for each weight (or shard), averaged over the scoring batches and processes.

        Args:
            round_index: Which round's batches: round ``r`` uses batches ``r * num_batches`` onwards, so every
                round of an iterative criterion sees fresh ones. Defaults to ``0``.
        """
        if self.gradients is not None and round_index == 0:
            return self.gradients()
        if self.loss_fn is None:
            raise ScoringError("This criterion needs the loss, but the scoring context has no `loss_fn`.")
        loss_fn, first = self.loss_fn, round_index * self.num_batches
        return mean_gradients(self.weights, lambda i: loss_fn(first + i), self.num_batches, self.all_reduce_mean)

    def densities(self) -> list[float]:
        """The density (kept fraction) after each of the ``iterations`` rounds; the last is ``1 - sparsity``.

        Example::

            >>> [round(d, 4) for d in ScoringContext({}, sparsity=0.99, iterations=2).densities()]
            [0.1, 0.01]
        """
        final, rounds = 1.0 - self.sparsity, self.iterations
        if self.schedule == "linear":
            return [1.0 - (1.0 - final) * t / rounds for t in range(1, rounds)] + [final]
        return [final ** (t / rounds) for t in range(1, rounds)] + [final]

    def whole_shape(self, name: str) -> torch.Size:
        """The shape of the whole weight ``name``, also when this process holds only a shard of it."""
        return self.shapes[name] if self.shapes is not None else self.weights[name].shape

    def local(self, name: str, whole: Tensor) -> Tensor:
        """This process's part of ``whole``, a tensor shaped like the whole weight ``name``.

        ``whole`` itself when the weights are whole. Criteria that draw whole tensors (``random``) use it to agree
        with single-process runs.
        """
        return self.take_local(name, whole) if self.take_local is not None else whole


def _check_loss(loss: object, batch: int) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        kind = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ScoringError(f"The loss on scoring batch {batch} must be a scalar tensor, got {kind}.")
    if not loss.requires_grad:
        raise ScoringError(
            f"The loss on scoring batch {batch} has no autograd graph, so no weight has a gradient. Compute the loss"
            " from the model's output without `torch.no_grad()` or `.detach()`."
        )
    if not torch.isfinite(loss.detach()).all():
        raise ScoringError(
            f"The loss on scoring batch {batch} is {loss.item()}, not finite: connection sensitivity is undefined."
            " Check the data, the initialization and the loss function."
        )
    return loss


def mean_gradients(
    weights: Mapping[str, Tensor],
    loss_fn: LossFn,
    num_batches: int,
    all_reduce_mean: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Average the loss gradient of each weight over ``num_batches`` batches (and processes).

    Gradients come from :func:`torch.autograd.grad`, so no ``.grad`` attribute is touched. A weight the loss does
    not depend on gets a zero gradient.

    Args:
        weights: The tensors to differentiate with respect to, by name.
        loss_fn: The loss on scoring batch ``i``.
        num_batches: Number of batches to average over.
        all_reduce_mean: Averages each gradient across processes. Defaults to ``None`` (one process).

    Returns:
        The mean gradients by name, in float32 or wider.

    Raises:
        ScoringError: If a loss is not a finite scalar with a graph, or a gradient is not finite.

    Example::

        >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
        >>> xs = [torch.tensor([1.0, 1.0]), torch.tensor([3.0, 0.0])]
        >>> mean_gradients({"w": w}, lambda i: (w * xs[i]).sum(), num_batches=2)
        {'w': tensor([2.0000, 0.5000])}
    """
    names = list(weights)
    tensors = [weights[n] for n in names]
    # Accumulate into the gradient buffers autograd returns (no extra copy of the model), except where a buffer is
    # strided (e.g. an expanded gradient of a sum) or its storage is shared with another gradient.
    partial: list[Tensor | None] = [None] * len(tensors)
    for batch in range(num_batches):
        loss = _check_loss(loss_fn(batch), batch)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        seen: set[int] = set()
        for index, grad in enumerate(grads):
            if grad is None:
                continue
            total = partial[index]
            if total is not None:
                total.add_(grad)
                continue
            storage = grad.untyped_storage().data_ptr()
            dtype = torch.promote_types(grad.dtype, torch.float32)
            owned = grad.is_contiguous() and grad.dtype == dtype and storage not in seen
            partial[index] = grad if owned else grad.to(dtype, memory_format=torch.contiguous_format, copy=True)
            seen.add(storage)
        del loss, grads
    means: dict[str, Tensor] = {}
    for name, total, t in zip(names, partial, tensors, strict=True):
        if total is None:
            total = torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32))
        if num_batches > 1:
            total.div_(num_batches)
        if all_reduce_mean is not None:
            total = all_reduce_mean(total)
        if not all_finite(total):
            raise ScoringError(
                f"The loss gradient of `{name}` is not finite, so its connection sensitivity is undefined. Check the"
                " data and the initialization; with `precision='16-mixed'` try 'bf16-mixed' or '32-true'."
            )
        means[name] = total
    return means


def backward_mean_gradients(
    params: Mapping[str, Tensor],
    loss_fn: LossFn,
    num_batches: int,
    local: Callable[[Tensor], Tensor] = lambda t: t,
) -> dict[str, Tensor]:
    """Average gradients computed by ``loss.backward()`` and read from ``.grad``.

    For sharded models, whose gradients only exist through backward hooks: FSDP reduce-scatters each gradient into
    the ``.grad`` of each process's shard, already averaged across processes. The ``.grad`` of ``params`` are
    overwritten; callers restore them (see :func:`~lightning_snip.isolation.leave_no_trace`). Finiteness is left to
    the caller, which can check it on all processes together. The means are computed in the gradient buffers
    (float32 or wider), which the caller must then discard.

    Args:
        params: The parameters, by name.
        loss_fn: The loss on scoring batch ``i``.
        num_batches: Number of batches to average over.
        local: This process's part of a parameter or gradient (e.g. the local tensor of a ``DTensor``). Defaults to
            the tensor itself.

    Returns:
        The mean gradients by name, shaped like ``local(param)``, in float32 or wider.

    Raises:
        ScoringError: If a loss is not a finite scalar with a graph.
    """
    for param in params.values():
        param.grad = None
    for batch in range(num_batches):
        loss = _check_loss(loss_fn(batch), batch)
        loss.backward()
        del loss
    means: dict[str, Tensor] = {}
    for name, param in params.items():
        shard = local(param)
        dtype = torch.promote_types(shard.dtype, torch.float32)
        grad = param.grad
        if grad is None:  # no gradient reached this shard (or the shard is empty)
            means[name] = torch.zeros(shard.shape, dtype=dtype, device=shard.device)
        else:  # in the gradient buffer itself where it is wide enough: no extra copy of the shards
            means[name] = local(grad).to(dtype).div_(num_batches)
    return means


class Criterion(ABC):
    """A pruning criterion: scores every candidate weight, higher is more important.

    Attributes:
        name: The registry name, set by :func:`register_criterion`.
        needs_data: Whether :meth:`score` computes the loss on training batches.
        needs_input: Whether :meth:`score` runs the model's forward on ``context.example_input`` itself.
        default_iterations: The published number of rounds of an iterative criterion; ``None`` for a one-shot one.
        supports_sharding: Whether it scores the shards of a sharded model (FSDP, ``fully_shard``).
        default_temperature: What the logits are divided by while scoring, by default (GraSP: the official 200);
            ``None`` for a criterion that takes no temperature.
        default_linear_reinit: Whether it scores with the ``nn.Linear`` weights redrawn (Xavier normal), by default
            (GraSP: ``True``, as the official code); ``None`` for a criterion that does not take the option.
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    needs_input: ClassVar[bool] = False
    default_iterations: ClassVar[int | None] = None
    supports_sharding: ClassVar[bool] = True
    default_temperature: ClassVar[float | None] = None
    default_linear_reinit: ClassVar[bool | None] = None

    @abstractmethod
    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        """Return one non-negative score tensor per weight, shaped like the weight, keyed like ``context.weights``."""


_REGISTRY: dict[str, type[Criterion]] = {}
_C = TypeVar("_C", bound=type[Criterion])


def register_criterion(name: str) -> Callable[[_C], _C]:
    """Class decorator that makes a :class:`Criterion` available under ``name``.

    Args:
        name: The name users pass as ``criterion``.

    Raises:
        ValueError: If ``name`` is already registered.
    """

    def decorator(cls: _C) -> _C:
        if name in _REGISTRY:
            raise ValueError(f"A criterion named {name!r} is already registered ({_REGISTRY[name].__name__}).")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load_builtins() -> None:
    import lightning_snip.criteria  # noqa: F401  (registers the built-in criteria on first import)


def available_criteria() -> list[str]:
    """Names of all registered criteria, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_criterion(name: str) -> Criterion:
    """Instantiate the criterion registered as ``name``.

    Raises:
        ValueError: If no criterion has that name.
    """
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"`criterion` must be one of {available_criteria()}, got {name!r}.")
    return _REGISTRY[name]()
