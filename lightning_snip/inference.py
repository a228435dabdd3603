"""Faster inference from the zeros: mostly-zero ``nn.Linear`` layers computed with sparse kernels.

Plain PyTorch, no Lightning. :func:`sparsify` copies a trained, pruned model and replaces each ``nn.Linear`` for which
a sparse kernel is faster by a :class:`SparseLinear`:

- on the CPU, and on CUDA without 2:4 support, its weight is a CSR tensor (MKL on x86 CPUs, cuSPARSE on CUDA);
- on a CUDA GPU of compute capability 8.0 or newer, a weight whose zeros follow a 2:4 pattern (at most 2 nonzeros in
  every 4 consecutive inputs), in float16 or bfloat16, with both dimensions multiples of 64, is converted with
  ``torch.sparse.to_sparse_semi_structured`` (the GPU path is not covered by the CPU test suite).

Everything else stays as it was. Convolutions stay dense: PyTorch has no sparse convolution kernel, and lowering a
convolution to a CSR matrix product (``unfold``) costs more memory traffic than the zeros save at these sizes.

:func:`densify` (or :meth:`SparseLinear.to_linear`) turns a sparsified model back into the ordinary dense one.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

Kernel = Literal["csr", "2:4"]

#: Without an example input, a layer goes sparse when at least this fraction of its weights is zero ...
MIN_ZERO_FRACTION = 0.95
#: ... and it has at least this many weights (smaller layers are dominated by the sparse kernel's per-call cost).
MIN_WEIGHTS = 1 << 18
#: With an example input, a layer goes sparse when its measured time is at most this fraction of the dense time.
MEASURED_MARGIN = 0.9
_CPU_CSR_DTYPES = (torch.float32, torch.float64)
_CUDA_CSR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def _csr(weight: Tensor) -> Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": the kernels used here are stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return weight.detach().to_sparse_csr()


def is_two_four(weight: Tensor) -> bool:
    """Whether every group of 4 consecutive entries along each row (``weight.view(shape[0], -1)``) has <= 2 nonzeros.

    Example::

        >>> is_two_four(torch.tensor([[1.0, 0.0, 2.0, 0.0]])), is_two_four(torch.tensor([[1.0, 3.0, 2.0, 0.0]]))
        (True, False)
    """
    rows = weight.reshape(weight.shape[0], -1)
    if rows.shape[1] % 4:
        return False
    return bool(((rows != 0).view(rows.shape[0], -1, 4).sum(-1) <= 2).all())


def _semi_structured_ok(weight: Tensor) -> bool:
    if not (weight.is_cuda and weight.dtype in _SEMI_STRUCTURED_DTYPES):
        return False
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return False
    return weight.shape[0] % 64 == 0 and weight.shape[1] % 64 == 0 and is_two_four(weight)


def _csr_ok(weight: Tensor) -> bool:
    return weight.dtype in (_CUDA_CSR_DTYPES if weight.is_cuda else _CPU_CSR_DTYPES)


class _InferenceOnly(torch.autograd.Function):
    """The sparse product, whose backward refuses: the sparse weight is not a trainable parameter.

    ``guard`` is an empty tensor that requires grad, so the output is part of the graph even when neither the input
    nor the bias requires grad (a bias-free first layer): a backward pass through the layer always raises.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, guard: Tensor, layer: SparseLinear) -> Tensor:
        return layer._product(x, bias)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        raise RuntimeError(
            "A backward pass reached a `SparseLinear` layer made by `lightning_snip.sparsify`, which is for inference"
            " only (its weight is a sparse tensor, not a trainable parameter). To train, get the dense model back with"
            " `lightning_snip.densify(model)`."
        )


class SparseLinear(nn.Module):
    """An ``nn.Linear`` for inference whose weight is stored and multiplied as a sparse tensor.

    Made by :func:`sparsify`; computes ``x @ weight.T + bias`` like the layer it replaces, for inputs of any
    leading shape, positional or as ``input=`` (``nn.Linear``'s name), also under ``torch.inference_mode()``. It
    takes over the replaced layer's forward hooks and forward pre-hooks and its train/eval mode, and
    :meth:`to_linear` hands them back. Under ``torch.autocast`` the sparse product runs in the weight's dtype (no
    sparse kernel takes bfloat16 on the CPU) and its result is cast to the autocast dtype, as the dense layer's
    would be. ``state_dict`` writes the weight dense, under the same keys as ``nn.Linear``, so the state dict of a
    sparsified model loads into the dense model and back. Any backward pass through it raises (whether or not its
    input requires grad): use :meth:`to_linear` or :func:`densify` to train.

    ``.to(device)`` and casts move the weight. A CSR weight must stay float32 or float64 on the CPU (a half-precision
    one is refused when called). A 2:4 weight is rebuilt from its dense values: it stays 2:4 where the new device and
    dtype allow, and becomes CSR elsewhere (on the CPU, say).

    Args:
        linear: The dense layer.
        kernel: ``"csr"`` or ``"2:4"`` (semi-structured, CUDA only).

    Raises:
        ValueError: If the weight's dtype or device does not suit the kernel.
    """

    weight: Tensor
    bias: nn.Parameter | None

    def __init__(self, linear: nn.Linear, kernel: Kernel = "csr") -> None:
        super().__init__()
        self.in_features, self.out_features, self.kernel = linear.in_features, linear.out_features, kernel
        weight = linear.weight.detach()
        self.zero_fraction = float((weight == 0).sum()) / max(weight.numel(), 1)
        self.register_buffer("weight", self._convert(weight), persistent=False)  # `state_dict` writes it dense
        self.bias = linear.bias
        self.train(linear.training)
        _copy_forward_hooks(linear, self)
        # A module that reads `.weight` itself rather than calling this layer (the fused fast path of
        # `nn.TransformerEncoderLayer`) skips it when a submodule has hooks, and takes the standard path instead.
        self.register_forward_pre_hook(_standard_path)

    def _convert(self, weight: Tensor) -> Tensor:
        if self.kernel == "2:4":
            if not _semi_structured_ok(weight):
                raise ValueError(
                    "A 2:4 `SparseLinear` needs a CUDA weight (compute capability >= 8.0) in float16 or bfloat16,"
                    f" dimensions multiples of 64 and a 2:4 pattern of zeros; got a {weight.dtype} weight of shape"
                    f" {tuple(weight.shape)} on {weight.device}."
                )
            return torch.sparse.to_sparse_semi_structured(weight)
        if self.kernel != "csr":
            raise ValueError(f"`kernel` must be 'csr' or '2:4', got {self.kernel!r}.")
        if not _csr_ok(weight):
            raise ValueError(
                f"A CSR `SparseLinear` needs a {'/'.join(str(d) for d in _CPU_CSR_DTYPES)} weight on the CPU (on CUDA"
                f" also half precision); got {weight.dtype} on {weight.device}."
            )
        return _csr(weight)

    def dense_weight(self) -> Tensor:
        """The weight as an ordinary dense tensor."""
        return self.weight.to_dense()

    def to_linear(self) -> nn.Linear:
        """The ordinary ``nn.Linear`` this layer computes: dense weight (trainable), the same bias parameter."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias = self.bias
        _copy_forward_hooks(self, linear)
        linear.train(self.training)
        return linear

    def _product(self, x: Tensor, bias: Tensor | None) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.kernel == "2:4":
            out = F.linear(rows, self.weight, bias)
        elif bias is None:
            out = torch.sparse.mm(self.weight, rows.t()).t()
        else:  # sparse (out, in) @ dense (in, batch): MKL's fast orientation; the result is a transposed view
            out = torch.addmm(bias.unsqueeze(1), self.weight, rows.t()).t()
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, input: Tensor) -> Tensor:
        """``input @ weight.T + bias`` for ``input`` of shape ``(*, in_features)``."""
        x = input
        if self.kernel == "csr" and not _csr_ok(self.weight):
            raise RuntimeError(
                f"This CSR `SparseLinear` holds a {self.weight.dtype} weight on {self.weight.device}, which no sparse"
                " kernel multiplies (the CPU needs float32 or float64). Cast it back, or get the dense model with"
                " `lightning_snip.densify` before casting it."
            )
        cast_to = _autocast_dtype(x.device.type)
        if cast_to is not None:  # the product in the weight's dtype, its result in the autocast dtype
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x.to(self.weight.dtype)).to(cast_to)
        if x.dtype != self.weight.dtype:
            raise TypeError(f"`SparseLinear` got a {x.dtype} input for its {self.weight.dtype} weight; cast the input.")
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return _InferenceOnly.apply(x, self.bias, torch.empty(0, requires_grad=True), self)
        return self._product(x, self.bias)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> SparseLinear:
        if self.kernel != "2:4":
            return super()._apply(fn, recurse)
        # a 2:4 weight is rebuilt from its dense values: 2:4 where it still suits, else CSR
        moved = fn(self.dense_weight())
        self.kernel = "2:4" if _semi_structured_ok(moved) else "csr"
        rebuilt = self._convert(moved) if self.kernel == "2:4" else _csr(moved)
        del self._buffers["weight"]  # `fn` is applied to the bias alone
        super()._apply(fn, recurse)
        self.register_buffer("weight", rebuilt, persistent=False)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> SparseLinear:
        # sparse tensors have no storage for `copy.deepcopy` to copy: everything else is copied, the weight cloned
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        weight = cast(Tensor, self._buffers["weight"])
        self._buffers["weight"] = None
        try:
            state = copy.deepcopy(self.__dict__, memo)
        finally:
            self._buffers["weight"] = weight
        state["_buffers"]["weight"] = weight.clone() if self.kernel == "csr" else self._convert(self.dense_weight())
        clone.__dict__.update(state)
        return clone

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:  # the order of `nn.Linear`'s state dict
            destination[prefix + "bias"] = destination.pop(prefix + "bias")

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        if key in state_dict:
            dense = state_dict[key]
            if tuple(dense.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: {tuple(dense.shape)} in the state dict for a sparse layer")
            else:
                self.weight = self._convert(dense.to(self.weight.device, self.weight.dtype))
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        """The layer's sizes, kernel and fraction of zeros, for ``print(model)``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None},"
            f" kernel={self.kernel!r}, zeros={self.zero_fraction:.2%}"
        )


def _standard_path(module: nn.Module, args: Any) -> None:
    return None


_FORWARD_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _copy_forward_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the forward hooks and forward pre-hooks of ``source`` (same order, same flags).

    :func:`sparsify`'s own pre-hook (:func:`_standard_path`) is not carried to a dense layer.
    """
    for attribute in _FORWARD_HOOK_DICTS:
        hooks = getattr(source, attribute, None)
        if hooks is None:  # an older torch without this kind of hook
            continue
        own = getattr(target, attribute)
        for key, hook in hooks.items():
            if hook is not _standard_path:
                own[key] = hook


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``device_type``, or ``None`` when it is off there."""
    if device_type not in ("cpu", "cuda"):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _refuse_old_weight_norm(model: nn.Module) -> None:
    """The deprecated ``torch.nn.utils.weight_norm`` makes a module that ``copy.deepcopy`` cannot copy: say so."""
    from torch.nn.utils.weight_norm import WeightNorm

    for name, module in model.named_modules():
        if any(isinstance(hook, WeightNorm) for hook in module._forward_pre_hooks.values()):
            raise TypeError(
                f"`sparsify` copies the model, but module {name or '<model>'!r} ({type(module).__name__}) uses the"
                " deprecated `torch.nn.utils.weight_norm`, whose computed weight cannot be copied. Fold it in first"
                " with `torch.nn.utils.remove_weight_norm(module)` (the weight then holds g * v / ||v||, the same"
                " outputs), or build the model with `torch.nn.utils.parametrizations.weight_norm` instead."
            )


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def _timer(fn: Callable[[], Any], device: torch.device) -> Callable[[], float]:
    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return run


def _measured_faster(layer: nn.Linear, sparse: SparseLinear, x: Tensor, rounds: int = 15) -> tuple[bool, float]:
    """Time the dense and the sparse layer on ``x``, interleaved; sparse wins by :data:`MEASURED_MARGIN` or more."""
    dense_run = _timer(lambda: layer(x), x.device)
    sparse_run = _timer(lambda: sparse(x), x.device)
    dense_run(), sparse_run()  # warm-up
    dense_times, sparse_times = [], []
    budget = time.perf_counter() + 2.0  # a few seconds at most per layer, however slow
    for _ in range(rounds):
        dense_times.append(dense_run())
        sparse_times.append(sparse_run())
        if time.perf_counter() > budget and len(dense_times) >= 3:
            break
    ratio = statistics.median(sparse_times) / statistics.median(dense_times)
    return ratio <= MEASURED_MARGIN, ratio


def _kernel_for(weight: Tensor) -> Kernel | None:
    if _semi_structured_ok(weight):
        return "2:4"
    return "csr" if _csr_ok(weight) else None


def sparsify(model: nn.Module, example_input: Any = None) -> nn.Module:
    """A copy of a trained, pruned ``model`` for inference, whose mostly-zero ``nn.Linear`` layers run sparse.

    Each ``nn.Linear`` (exactly that class: subclasses may compute differently) gets a sparse kernel where it is
    faster, and stays dense otherwise:

    - with ``example_input``, the decision is measured: one forward of the model records the input each layer
      sees, and the dense and sparse layer are timed on it, interleaved; the layer goes sparse when its median time
      is at most :data:`MEASURED_MARGIN` (0.9) of the dense one. Layers the example does not reach stay dense.
    - without it, a rule decides: a layer goes sparse when at least :data:`MIN_ZERO_FRACTION` (95%) of its weights
      are zero and it has at least :data:`MIN_WEIGHTS` (262,144) of them; a 2:4 layer that a GPU accelerates (see
      the module docs) always goes sparse.

    The kernel is 2:4 semi-structured where the GPU, dtype, shape and pattern allow, else CSR (float32/float64 on
    the CPU). Other layers, convolutions included, are left as they are. The copy is in eval mode; ``model`` is not
    changed at all (every submodule keeps its own train/eval mode). Forward hooks and forward pre-hooks of a replaced
    layer run on its sparse replacement, so outputs match the dense model's; the copy runs under ``torch.autocast``
    too (see :class:`SparseLinear`). Each decision is logged at INFO level on the ``lightning_snip.inference``
    logger, and ``print`` of the result shows the sparse layers.

    Args:
        model: A trained, pruned model (its pruned weights are zeros), on the device it will run on.
        example_input: An input batch of the shape used in inference: a tensor, a tuple of positional arguments or a
            dict of keyword arguments. Defaults to ``None`` (the rule decides).

    Returns:
        The model for inference.

    Raises:
        TypeError: If ``model`` is not a module, or uses the deprecated ``torch.nn.utils.weight_norm`` (which cannot
            be copied; the message says how to fold it in).

    Example::

        >>> dense = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        >>> with torch.no_grad():
        ...     _ = dense[0].weight.mul_(torch.rand(1024, 1024) > 0.98)
        >>> fast = sparsify(dense)
        >>> type(fast[0]).__name__, type(fast[2]).__name__
        ('SparseLinear', 'Linear')
        >>> x = torch.randn(4, 1024)
        >>> torch.allclose(fast(x), dense(x), atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an `nn.Module`, got {type(model).__name__}.")
    _refuse_old_weight_norm(model)
    result = copy.deepcopy(model).eval()
    linears = {name: m for name, m in result.named_modules() if type(m) is nn.Linear}
    seen: dict[str, Tensor] = {}
    if example_input is not None:

        def record(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                seen.setdefault(name, args[0] if args else kwargs["input"])

            return hook

        handles = [m.register_forward_pre_hook(record(name), with_kwargs=True) for name, m in linears.items()]
        try:
            with torch.inference_mode():
                _call(result, example_input)
        finally:
            for handle in handles:
                handle.remove()
    replaced: dict[int, SparseLinear | None] = {}
    for name, layer in linears.items():
        if id(layer) in replaced:
            continue
        weight = layer.weight.detach()
        kernel = _kernel_for(weight)
        zeros = float((weight == 0).sum()) / max(weight.numel(), 1)
        choice: SparseLinear | None = None
        why = f"{zeros:.1%} zeros"
        if kernel is None:
            why += f", no sparse kernel for {weight.dtype} on {weight.device}"
        elif zeros == 0:
            why += ", nothing to skip"
        elif example_input is not None:
            if name not in seen:
                why += ", not reached by the example input"
            else:
                candidate = SparseLinear(layer, kernel)
                with torch.inference_mode():
                    faster, ratio = _measured_faster(layer, candidate, seen[name])
                why += f", sparse {kernel} measured at {ratio:.2f}x the dense time"
                choice = candidate if faster else None
        elif kernel == "2:4" or (zeros >= MIN_ZERO_FRACTION and weight.numel() >= MIN_WEIGHTS):
            choice = SparseLinear(layer, kernel)
        else:
            why += f", below the rule ({MIN_ZERO_FRACTION:.0%} zeros and {MIN_WEIGHTS:,} weights)"
        replaced[id(layer)] = choice
        log.info("sparsify: %s -> %s (%s)", name, "dense" if choice is None else f"sparse {choice.kernel}", why)
    for parent in list(result.modules()):
        for child_name, child in list(parent._modules.items()):  # every occurrence of a shared layer
            sparse = replaced.get(id(child))
            if sparse is not None:
                setattr(parent, child_name, sparse)
    return result


def densify(model: nn.Module) -> nn.Module:
    """A copy of a sparsified model with every :class:`SparseLinear` turned back into an ``nn.Linear``.

    The result is the ordinary dense model: trainable, with the same outputs and the same ``state_dict``; each
    rebuilt ``nn.Linear`` has the mode and forward hooks of the layer it replaces, and a bias of its own. ``model``
    is not changed.

    Example::

        >>> dense = nn.Sequential(nn.Linear(600, 600))
        >>> with torch.no_grad():
        ...     _ = dense[0].weight.mul_(torch.rand(600, 600) > 0.99)
        >>> back = densify(sparsify(dense))
        >>> type(back[0]).__name__, torch.equal(back[0].weight, dense[0].weight)
        ('Linear', True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an `nn.Module`, got {type(model).__name__}.")
    memo: dict[int, Any] = {}
    for module in model.modules():
        if isinstance(module, SparseLinear) and id(module) not in memo:
            linear = module.to_linear()
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=True)
            memo[id(module)] = linear
    return copy.deepcopy(model, memo)
