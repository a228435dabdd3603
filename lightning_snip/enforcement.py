"""Keeping pruned weights at exactly zero: the per-step zeroing and which optimizers keep zeros by themselves.

Plain PyTorch, no Lightning. Masks are bool tensors shaped like their weights; ``True`` means kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

_T = TypeVar("_T", bound="Tensor | None")


def _to_host(values: Sequence[Tensor]) -> list[Any]:
    """0-dim tensors (on any devices) as Python numbers, with one synchronization: all are computed before a copy."""
    return torch.stack([v.cpu() for v in values]).tolist() if values else []


_BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(tensor: Tensor) -> Tensor | None:
    """The tensor's storage viewed as integers of the same width (no copy), or ``None`` where there is none."""
    dtype = _BITS_OF_SIZE.get(tensor.element_size())
    return None if dtype is None else tensor.view(dtype)


#: Memory the per-step forms of a :class:`MaskSet` may take beyond its bool masks (1 byte per weight), in all.
FAST_FORM_BYTES = 16 * 2**20
# Kept fractions up to which zeroing by the kept positions (save them, zero all, put them back) beats the bit multiply
# on CPU: measured at about 0.14 ns per weight plus 9 ns per kept weight, against 1.7 ns per weight for the multiply.
_INDEX_DENSITY = 0.15


@dataclass(frozen=True)
class _FastForm:
    """A per-step form of one mask for tensors of one element width on one device.

    ``factor`` is the mask as 0/1 integers of that width (a multiply without a dtype conversion); ``index`` holds the
    kept positions.
    """

    width: int
    device: torch.device
    factor: Tensor | None = None
    index: Tensor | None = None

    def fits(self, tensor: Tensor) -> bool:
        return tensor.element_size() == self.width and tensor.device == self.device


class MaskSet:
    """Bool masks prepared once for the per-step zeroing of a fixed list of tensors (their weights or gradients).

    Zeroing works on each tensor's bits viewed as integers of the same width, so a pruned entry becomes exactly
    ``+0.0`` whatever it held, ``inf`` and ``nan`` included: no finiteness check, no fallback and no host
    synchronization are needed, and kept entries are untouched bit for bit. :func:`apply_masks_` does the same for one
    call; a callback that zeroes the same tensors on every step keeps a ``MaskSet``.

    Given ``like`` (the tensors it will zero on every step), it also prepares faster forms for tensors of their element
    width and device, within ``budget`` bytes in all beyond the bool masks: the mask as 0/1 integers of that width
    (a multiply without a dtype conversion, ``width`` bytes per weight) when all of them
    fit, else the kept positions of tensors that keep at most 15% (8 bytes per kept weight), then the integer form for
    as many of the rest as still fit. Other tensors get the bits multiplied by the mask viewed as ``uint8``.

    Args:
        kept: Bool masks, ``True`` where kept, each on the device of the tensor it will zero.
        like: The tensors to prepare the faster forms for, one per mask. Defaults to ``None``: none.
        budget: Bytes the faster forms may take in all. Defaults to :data:`FAST_FORM_BYTES`.

    Raises:
        TypeError: If a mask is not a bool tensor.

    Example::

        >>> masks = MaskSet([torch.tensor([True, False, False])])
        >>> w = torch.tensor([1.0, float("inf"), -2.0])
        >>> masks.zero_([w])
        >>> w
        tensor([1., 0., 0.])
    """

    def __init__(
        self, kept: Iterable[Tensor], like: Sequence[Tensor] | None = None, budget: int = FAST_FORM_BYTES
    ) -> None:
        self.kept = tuple(kept)
        bad = [tuple(m.shape) for m in self.kept if m.dtype != torch.bool]
        if bad:
            raise TypeError(f"`kept` must hold bool masks (True = kept); got non-bool masks of shapes {bad}.")
        self._factors = tuple(m.view(torch.uint8) for m in self.kept)
        self._forms: tuple[_FastForm | None, ...] = (None,) * len(self.kept)
        if like is not None:
            self._forms = _fast_forms(self.kept, self._aligned(like), budget)

    @property
    def fast_form_bytes(self) -> int:
        """Bytes the faster forms take."""
        return sum(
            t.numel() * t.element_size()
            for form in self._forms
            if form is not None
            for t in (form.factor, form.index)
            if t is not None
        )

    def __len__(self) -> int:
        return len(self.kept)

    def subset(self, indices: Sequence[int]) -> MaskSet:
        """The masks at ``indices``, sharing this set's prepared forms (no new memory)."""
        part = MaskSet(self.kept[i] for i in indices)
        part._forms = tuple(self._forms[i] for i in indices)
        return part

    def _aligned(self, tensors: Iterable[_T]) -> list[_T]:
        values = list(tensors)
        if len(values) != len(self.kept):
            raise ValueError(f"Got {len(values)} tensors for {len(self.kept)} masks; pass one tensor per mask.")
        for index, (value, mask) in enumerate(zip(values, self.kept, strict=True)):
            if value is not None and value.shape != mask.shape:  # an elementwise op would broadcast the mask silently
                raise ValueError(
                    f"Tensor {index} has shape {tuple(value.shape)} but its mask {tuple(mask.shape)}; pass the tensors"
                    " the masks were made for, in the same order."
                )
        return values

    @torch.no_grad()
    def zero_(self, tensors: Iterable[Tensor | None]) -> None:
        """Set the pruned entries of each tensor to exactly zero, in place; ``None`` (no gradient) is skipped.

        Args:
            tensors: One tensor (or ``None``) per mask, in the masks' order, shaped like its mask.

        Raises:
            ValueError: If the number of tensors differs from the number of masks, or a tensor's shape from its
                mask's (a multiply would broadcast the mask silently).
        """
        groups: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
        for index, value in enumerate(self._aligned(tensors)):
            if value is None:
                continue
            factor = self._zero_or_factor(index, value)
            if factor is None:
                continue
            group = groups.setdefault(value.device, ([], []))
            group[0].append(factor[0])
            group[1].append(factor[1])
        for device, (bits_list, factors) in groups.items():
            _multiply_(bits_list, factors, fused=device.type != "cpu")

    def batch_zeroer(self, like: Sequence[Tensor]) -> Callable[[Sequence[Tensor | None]], None]:
        """:meth:`zero_` for tensors of ``like``'s dtypes, prepared once: one multiply over all of them.

        For the per-step masking of gradients, where on a small network every Python step and every operator call
        costs more than the multiply itself. When every mask has its integer factor (:class:`MaskSet`'s faster form)
        for its tensor and all are on one device, the call checks only that each tensor is there with its prepared
        dtype and needs no gradient, then multiplies all their bits by the factors: one operator call per tensor on
        CPU (cheaper there than ``torch._foreach_mul_``, a loop of the same calls), one fused ``torch._foreach_mul_``
        on other devices. Any other call, and any other set of masks, goes through :meth:`zero_` with its checks. The
        tensors must be shaped like their masks (not checked: a tensor's gradient always is).
        """
        values = self._aligned(like)
        plan = [self._how(index, value) for index, value in enumerate(values)]
        if (
            not values
            or len({value.device for value in values}) > 1
            or any(
                how != "bits" or payload.dtype != _BITS_OF_SIZE.get(value.element_size())
                for value, (how, payload) in zip(values, plan, strict=True)
            )
        ):
            return self.zero_
        prepared = [(value.dtype, payload.dtype) for value, (_, payload) in zip(values, plan, strict=True)]
        return _BatchZeroing(self, prepared, [payload for _, payload in plan])

    def _how(self, index: int, like: Tensor) -> tuple[str, Tensor]:
        """How mask ``index`` zeroes tensors like ``like``, and with what.

        By its kept ``"positions"``, by multiplying their ``"bits"`` by a factor, or (no integer of their width:
        complex128) by ``"overwrite"`` where the mask (returned) prunes.
        """
        form = self._forms[index]
        if form is not None and form.fits(like):
            if form.index is not None:
                return "positions", form.index
            if form.factor is not None:
                return "bits", form.factor
        if like.element_size() not in _BITS_OF_SIZE:
            return "overwrite", self.kept[index]
        return "bits", self._factors[index]

    def _zero_or_factor(self, index: int, value: Tensor) -> tuple[Tensor, Tensor] | None:
        """Zero ``value`` by its mask's kept positions or by overwriting, or return its bits and the factor for them."""
        how, payload = self._how(index, value)
        if how == "positions":
            if value.is_contiguous():
                _keep_only(value, payload)
                return None
            how, payload = "bits", self._factors[index]  # a strided view: its bits, by the uint8 mask
        if how == "overwrite":
            value.masked_fill_(~payload, 0)
            return None
        return value.view(_BITS_OF_SIZE[value.element_size()]), payload

    @torch.no_grad()
    def count_pruned_nonzero(self, tensors: Iterable[Tensor]) -> list[int]:
        """Number of pruned entries of each tensor that are not zero (``nan`` counts).

        All zeros when the tensors respect the masks, found with one device synchronization; tensors that do not
        respect them are then counted exactly. Run occasionally (it allocates temporaries, one tensor at a time), not
        on every step.

        Args:
            tensors: One tensor per mask, in the masks' order, shaped like its mask.

        Raises:
            ValueError: If the number of tensors differs from the number of masks, or a tensor's shape from its
                mask's.

        Example::

            >>> MaskSet([torch.tensor([True, False, False])]).count_pruned_nonzero([torch.tensor([5.0, 0.0, 2.0])])
            [1]
        """
        values = self._aligned(tensors)
        if not values:
            return []
        # the largest pruned magnitude first (nan if any is nan): a vectorized multiply and max, where counting
        # booleans is several times slower on CPU; the exact count only for tensors that have one
        flags = _to_host([_largest_pruned(v, m) for v, m in zip(values, self.kept, strict=True)])
        return [int(((v != 0) & ~m).sum()) if f != 0 else 0 for v, m, f in zip(values, self.kept, flags, strict=True)]


class _BatchZeroing:
    """:meth:`MaskSet.zero_` prepared for tensors of fixed dtypes: see :meth:`MaskSet.batch_zeroer`.

    A class rather than a closure, so that an :class:`Enforcer` holding one pickles (``ddp_spawn`` does).
    """

    def __init__(self, masks: MaskSet, prepared: list[tuple[torch.dtype, torch.dtype]], factors: list[Tensor]) -> None:
        self.masks, self.prepared, self.factors = masks, prepared, factors  # (dtype, integer view) per tensor
        self.fused = bool(factors) and factors[0].device.type != "cpu"

    def __call__(self, tensors: Sequence[Tensor | None]) -> None:
        if len(tensors) == len(self.prepared):
            views = []
            for tensor, (dtype, view_as) in zip(tensors, self.prepared):  # noqa: B905  # lengths checked above
                if tensor is None or tensor.dtype is not dtype or tensor.requires_grad:
                    break
                views.append(tensor.view(view_as))
            else:
                _multiply_(views, self.factors, self.fused)
                return
        self.masks.zero_(tensors)

    def zero_grads_of(self, params: Sequence[Tensor]) -> None:
        """The call on the gradients of ``params`` (one per mask), as :class:`Enforcer` makes after every backward.

        On CPU one loop that reads each gradient and multiplies it at once: the fewest Python steps, about 3 µs less
        than building the list first on LeNet-300-100. A gradient not prepared for sends them all through
        :meth:`MaskSet.zero_` (those already multiplied are zeroed again, which changes nothing).
        """
        if self.fused:
            self([p.grad for p in params])
            return
        for param, (dtype, view_as), factor in zip(params, self.prepared, self.factors):  # noqa: B905  # one per mask
            grad = param.grad
            if grad is None or grad.dtype is not dtype or grad.requires_grad:
                self.masks.zero_([p.grad for p in params])
                return
            grad.view(view_as).mul_(factor)


def _multiply_(tensors: list[Tensor], factors: list[Tensor], fused: bool) -> None:
    """Multiply each tensor by its factor in place: one ``torch._foreach_mul_`` if ``fused``, else one call each.

    Fused on GPUs (one kernel launch); one call per tensor on CPU, where ``torch._foreach_mul_`` is a loop of the same
    calls behind more bookkeeping.
    """
    if fused:
        torch._foreach_mul_(tensors, factors)
        return
    for tensor, factor in zip(tensors, factors, strict=True):
        tensor.mul_(factor)


def _keep_only(value: Tensor, positions: Tensor) -> None:
    """Zero a contiguous tensor except at the flat ``positions``: save them, zero all, put them back (bit for bit)."""
    flat = value.view(-1)
    saved = flat.index_select(0, positions)
    flat.zero_()
    flat.index_copy_(0, positions, saved)


def _largest_pruned(value: Tensor, kept: Tensor) -> Tensor:
    """The largest magnitude among the pruned entries of ``value`` (``nan`` if one is ``nan``), as a 0-dim float."""
    bits = _as_bits(value)
    if value.is_floating_point() and bits is not None and value.numel():
        return torch.mul(bits, (~kept).view(torch.uint8)).view(value.dtype).abs_().amax().float()
    return ((value != 0) & ~kept).any().float()


class Enforcer:
    """Keeps a fixed set of parameters at their masks through training, with plain PyTorch.

    The per-step work is :meth:`mask_gradients` after every backward (then optimizer state never builds up for pruned
    weights): on unsharded parameters the prepared multiply of their gradients (:meth:`MaskSet.batch_zeroer`),
    and an optimizer post-step hook per optimizer (:meth:`attach`) that re-zeros the pruned weights, unless the step
    provably left them at zero: the optimizer keeps zeros (:func:`keeps_zeros`), optimization is automatic
    (every backward is followed by :meth:`mask_gradients`), and a masked backward ran since its previous step. Under
    manual optimization every step is followed by the re-zeroing, since a plain ``loss.backward()`` may have set any
    optimizer's gradients. :meth:`repair` is the occasional check; once it finds a write to pruned weights, every
    step is followed by the re-zeroing.

    Args:
        params: The pruned parameters by name.
        kept: Their bool masks by name (``True`` = kept), each on its parameter's device, shaped like ``local`` of it.
        local: The part of a parameter or gradient the masks are shaped like (a sharded ``DTensor``'s local shard).
            Defaults to ``None``: the tensors themselves.

    Example::

        >>> layer = torch.nn.Linear(3, 1, bias=False)
        >>> enforcer = Enforcer({"weight": layer.weight}, {"weight": torch.tensor([[True, False, True]])})
        >>> enforcer.zero_weights()
        >>> float(layer.weight[0, 1])
        0.0
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        kept: Mapping[str, Tensor],
        local: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.names = list(kept)
        self.params = [params[name] for name in self.names]
        self._local = local
        self.masks = MaskSet((kept[name] for name in self.names), like=self._locals(self.params))
        zeroer = self.masks.batch_zeroer(self.params) if local is None else None
        self._batch = zeroer if isinstance(zeroer, _BatchZeroing) else None
        self.masked_backwards = 0  # read by the post-step hooks
        self.rezero_every_step = False
        self._handles: list[RemovableHandle] = []

    def _locals(self, tensors: Iterable[_T]) -> list[_T]:
        """The parts the masks are shaped like (the tensors themselves, unsharded: a list is returned as it is)."""
        if self._local is None:
            return tensors if isinstance(tensors, list) else list(tensors)
        local = self._local
        return [t if t is None else cast(_T, local(t)) for t in tensors]

    def zero_weights(self) -> None:
        """Set every pruned weight to exactly zero."""
        self.masks.zero_(self._locals(self.params))

    def mask_gradients(self) -> None:
        """Set the gradients of pruned weights to exactly zero (parameters without a gradient are skipped).

        Call it after every backward.
        """
        if self._batch is not None:
            self._batch.zero_grads_of(self.params)
        else:
            self.masks.zero_(self._locals([p.grad for p in self.params]))
        self.masked_backwards += 1

    def attach(self, optimizers: Iterable[torch.optim.Optimizer], automatic: bool) -> None:
        """Zero the pruned entries of each optimizer's state and hook the re-zeroing after each of its steps.

        Args:
            optimizers: The optimizers; those holding none of the parameters are left alone.
            automatic: Whether every backward is followed by :meth:`mask_gradients` (Lightning's automatic
                optimization).
        """
        self.detach()
        self.rezero_every_step = False
        position = {id(p): i for i, p in enumerate(self.params)}
        for optimizer in optimizers:
            held = [position[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in position]
            if not held:
                continue
            params, masks = [self.params[i] for i in held], self.masks.subset(held)
            _zero_optimizer_state(optimizer, params, masks.kept, self._locals)
            hook = self._post_step_hook(params, masks, automatic and keeps_zeros(optimizer))
            self._handles.append(optimizer.register_step_post_hook(hook))

    def detach(self) -> None:
        """Remove the optimizer hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _post_step_hook(self, params: list[Tensor], masks: MaskSet, optimizer_keeps_zeros: bool) -> Any:
        masked_at_previous_step = self.masked_backwards

        def hook(*_: Any) -> None:
            nonlocal masked_at_previous_step
            masked = self.masked_backwards != masked_at_previous_step
            masked_at_previous_step = self.masked_backwards
            if self.rezero_every_step or not (optimizer_keeps_zeros and masked):
                masks.zero_(self._locals(params))

        return hook

    def repair(self) -> dict[str, int]:
        """Zero the pruned weights that are not zero, and from then on re-zero after every optimizer step.

        Returns:
            How many pruned weights were not zero, by parameter name, for those that had any (empty when none).
        """
        weights = self._locals(self.params)
        counts = self.masks.count_pruned_nonzero(weights)
        if not any(counts):
            return {}
        self.masks.zero_(weights)
        self.rezero_every_step = True
        return {name: count for name, count in zip(self.names, counts, strict=True) if count}

    def count_zeros(self) -> int:
        """Weights equal to zero among the parameters (their local parts), with one device synchronization."""
        return count_zeros(self._locals(self.params))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": []}  # hooks belong to this process's objects


def _zero_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    kept: Sequence[Tensor],
    locals_of: Callable[[list[Tensor]], list[Tensor]],
) -> None:
    """Zero the pruned entries of the optimizer state (momentum, moments) built before the masks were held."""
    states, masks = [], []
    for param, mask in zip(params, kept, strict=True):
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, Tensor) and value.shape == param.shape:  # not scalars such as Adam's `step`
                state = locals_of([value])[0]
                states.append(state)
                masks.append(mask.to(state.device))  # state may live elsewhere (offloaded)
    if states:
        MaskSet(masks).zero_(states)


def _fast_forms(kept: Sequence[Tensor], like: Sequence[Tensor], budget: int) -> tuple[_FastForm | None, ...]:
    """The faster per-step form of each mask for the tensors ``like`` it, within ``budget`` bytes (see MaskSet)."""
    widths = [t.element_size() if t.element_size() in _BITS_OF_SIZE else 0 for t in like]
    sizes = [m.numel() * w for m, w in zip(kept, widths, strict=True)]
    chosen: list[str | None] = [None] * len(kept)
    left = budget
    if sum(sizes) <= budget:
        chosen = ["factor" if w else None for w in widths]
    else:  # the largest tensors first: there the time goes
        order = sorted(range(len(kept)), key=lambda i: -kept[i].numel())
        counts = _to_host([m.sum() for m in kept])
        for i in order:
            cost = 8 * int(counts[i])
            if widths[i] and counts[i] <= _INDEX_DENSITY * kept[i].numel() and cost <= left:
                chosen[i], left = "index", left - cost
        for i in order:
            if chosen[i] is None and widths[i] and sizes[i] <= left:
                chosen[i], left = "factor", left - sizes[i]
    return tuple(
        None
        if kind is None
        else _FastForm(w, m.device, factor=m.to(_BITS_OF_SIZE[w]))
        if kind == "factor"
        else _FastForm(w, m.device, index=m.reshape(-1).nonzero().squeeze(1))
        for kind, m, w in zip(chosen, kept, widths, strict=True)
    )


#: PyTorch optimizers whose update of an entry depends only on that entry's weight, gradient and optimizer state,
#: and is exactly zero when all of them are zero: weight decay (``wd * 0``), momentum and first moments (``0``) and
#: adaptive denominators (``eps`` at least) included. With masked gradients and zeroed state they keep a pruned weight
#: at exactly zero by themselves. Exact classes only: a subclass may change ``step``.
ZERO_PRESERVING_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
    torch.optim.Rprop,
    torch.optim.ASGD,
)


def keeps_zeros(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` leaves a weight at exactly zero when its gradient and optimizer state are zero.

    True for the exact classes in :data:`ZERO_PRESERVING_OPTIMIZERS`; False for anything else (L-BFGS, Muon,
    subclasses, third-party optimizers), whose pruned weights must be re-zeroed after every step.

    Example::

        >>> keeps_zeros(torch.optim.AdamW([torch.zeros(2, requires_grad=True)]))
        True
    """
    return type(optimizer) in ZERO_PRESERVING_OPTIMIZERS


def holds_nonzero(tensors: Iterable[Tensor]) -> list[bool]:
    """Whether each real tensor has an entry that is not zero (``nan`` counts), with one device synchronization.

    Example::

        >>> holds_nonzero([torch.zeros(3), torch.tensor([0.0, -1.0]), torch.zeros(0)])
        [False, True, False]
    """
    return _to_host(
        [
            torch.stack(torch.aminmax(t.detach().reshape(-1))).ne(0).any()
            if t.numel()
            else torch.zeros((), dtype=torch.bool, device=t.device)
            for t in tensors
        ]
    )


def apply_masks_(tensors: Iterable[Tensor | None], kept: Iterable[Tensor]) -> None:
    """Set the pruned entries (``kept`` is False) of each tensor to exactly zero, in place; ``None`` is skipped.

    One call of :meth:`MaskSet.zero_`: exact whatever the pruned entries held, ``inf`` and ``nan`` included.

    Args:
        tensors: Weights or gradients.
        kept: Bool masks, ``True`` where kept.

    Example::

        >>> w = torch.tensor([1.0, float("nan"), 3.0])
        >>> apply_masks_([w], [torch.tensor([True, False, False])])
        >>> w
        tensor([1., 0., 0.])
    """
    MaskSet(kept).zero_(tensors)


def _zero_counts(tensors: Iterable[Tensor]) -> list[int]:
    """Each tensor's number of entries equal to zero, with a single device synchronization."""
    return _to_host([t.numel() - torch.count_nonzero(t) for t in tensors])  # faster than summing `t == 0` on CPU


def count_zeros(tensors: Iterable[Tensor]) -> int:
    """Number of entries equal to zero over all tensors, with a single device synchronization."""
    return sum(_zero_counts(tensors))


@torch.no_grad()
def zero_pruned_entries(
    state: Mapping[str, Any],
    params: Mapping[str, Tensor],
    kept: Mapping[str, Tensor],
    aliases: Mapping[str, list[str]],
    whole: Callable[[str, torch.Size], Tensor | None] | None = None,
    local: Callable[[Tensor], Tensor] = lambda t: t,
) -> None:
    """Zero the pruned entries of the tensors of a ``state_dict`` (a checkpoint's), in place.

    Args:
        state: The state dict; its entries that are the parameters themselves are left alone.
        params: The pruned parameters by name.
        kept: Their masks, shaped like each parameter's local part.
        aliases: Every name of each parameter in ``state`` (tied weights have several).
        whole: On a sharded model, the whole mask of a parameter for a tensor of the given shape when that is the
            parameter's whole shape (a gathered state dict), else ``None``; called only for such tensors.
        local: The part of a tensor the masks are shaped like (a sharded ``DTensor``'s local shard).
    """
    for name, mask in kept.items():
        for alias in aliases.get(name, [name]):
            entry = state.get(alias)
            if not isinstance(entry, Tensor):
                continue
            part = local(entry)
            if part.data_ptr() == local(params[name]).data_ptr():
                continue  # the parameter itself
            if part.shape == mask.shape:
                apply_masks_([part], [mask.to(part.device)])
            elif whole is not None and (whole_mask := whole(name, part.shape)) is not None:
                apply_masks_([part], [whole_mask.to(part.device)])


def respects_masks(params: Mapping[str, Tensor], whole: Mapping[str, Tensor]) -> bool:
    """Whether ``params`` has every masked tensor, shaped like its mask and zero wherever the mask prunes.

    Example::

        >>> respects_masks({"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([True, False])})
        True
    """
    if not whole or not all(name in params and params[name].shape == m.shape for name, m in whole.items()):
        return False
    weights = [params[name] for name in whole]
    held = MaskSet(m.to(w.device) for m, w in zip(whole.values(), weights, strict=True))
    return not any(held.count_pruned_nonzero(weights))
