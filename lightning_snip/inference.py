"""Faster inference from the zeros: mostly-zero ``nn.Linear`` layers computed with sparse kernels.

Plain PyTorch, no Lightning. :func:`sparsify` copies a trained, pruned model and replaces each ``nn.Linear`` (and
each 1x1 ``nn.Conv2d``) for which a sparse kernel is faster by a :class:`SparseLinear` (a :class:`SparseConv1x1`):

- on the CPU, and on CUDA without 2:4 support, its weight is a CSR tensor (MKL on x86 CPUs, cuSPARSE on CUDA), or,
  on the CPU with numba installed, the rows the compiled kernel of :mod:`lightning_snip.kernels` reads;
- on the CPU, a weight whose zeros come in whole square tiles (:func:`block_size`) can also be a block-sparse (BSR)
  tensor, which multiplies large batches faster than CSR;
- on a CUDA GPU of compute capability 8.0 or newer, a weight whose zeros follow a 2:4 pattern (at most 2 nonzeros in
  every 4 consecutive inputs), in float16 or bfloat16, with both dimensions multiples of 64, is converted with
  ``torch.sparse.to_sparse_semi_structured`` (the GPU path is not covered by the CPU test suite).

Everything else stays as it was. Convolutions other than 1x1 stay dense: PyTorch has no sparse convolution kernel,
and lowering a convolution to a CSR matrix product (``unfold``) costs more memory traffic than the zeros save at
these sizes; a 1x1 convolution is a matrix product over its channels already, with no ``unfold`` copy.

:func:`densify` (or :meth:`SparseLinear.to_linear`) turns a sparsified model back into the ordinary dense one.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_snip.kernels import RowKernel, numba_available

log = logging.getLogger(__name__)

Kernel = Literal["csr", "numba", "bsr", "2:4"]
Swap = tuple["nn.Module", str, "nn.Module", "_SparseMatrix"]
_Dense = TypeVar("_Dense", nn.Linear, nn.Conv2d)
"""A layer to replace: its parent, its name there, the dense layer and the sparse one."""

#: Without an example input, a layer goes sparse when at least this fraction of its weights is zero ...
MIN_ZERO_FRACTION = 0.95
#: ... and it has at least this many weights (smaller layers are dominated by the sparse kernel's per-call cost).
MIN_WEIGHTS = 1 << 18
#: With an example input, a layer goes sparse when its measured time is at most this fraction of the dense time.
MEASURED_MARGIN = 0.9
#: Each measured block runs one configuration back to back for about this long (at most 100 calls), as a serving
#: loop calls a model: a faster configuration makes more calls, so the first call after the other one's weights went
#: through the caches does not decide its time.
BLOCK_SECONDS = 0.005
#: Square tile sizes a block-sparse (BSR) weight may use, largest first (see :func:`block_size`).
BLOCK_SIZES = (32, 16, 8, 4)
_CPU_CSR_DTYPES = (torch.float32, torch.float64)
_CUDA_CSR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def _csr(weight: Tensor, blocks: int | None = None) -> Tensor:
    """``weight`` as a CSR tensor, or as a BSR tensor of ``blocks x blocks`` tiles."""
    with warnings.catch_warnings():  # "Sparse CSR/BSR tensor support is in beta state": the kernels used are stable
        warnings.filterwarnings("ignore", message=r"Sparse \w+ tensor support is in beta state")
        return weight.detach().to_sparse_csr() if blocks is None else weight.detach().to_sparse_bsr((blocks, blocks))


def block_size(weight: Tensor) -> int | None:
    """The largest of :data:`BLOCK_SIZES` in whose square tiles a 2-D ``weight``'s zeros lie, or ``None``.

    A size ``b`` qualifies when it divides both dimensions, at least half of the ``b x b`` tiles are all zero, and the
    other tiles are on average at least half full: then a block-sparse (BSR) tensor stores little more than the
    nonzeros. An unstructured mask fails the second test (at 95% zeros, 4x4 tiles average 9% full).

    Example::

        >>> tiles = (torch.rand(8, 8) > 0.8).repeat_interleave(8, 0).repeat_interleave(8, 1)
        >>> block_size(torch.randn(64, 64) * tiles), block_size(torch.randn(64, 64) * (torch.rand(64, 64) > 0.95))
        (8, None)
    """
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be 2-D, got shape {tuple(weight.shape)}.")
    rows, cols = weight.shape
    nonzero = weight != 0
    count = int(nonzero.sum())
    if count == 0:
        return None
    for b in BLOCK_SIZES:
        if rows % b or cols % b:
            continue
        tiles = nonzero.reshape(rows // b, b, cols // b, b).any(dim=3).any(dim=1)
        filled = int(tiles.sum())
        if 2 * filled <= tiles.numel() and 2 * count >= filled * b * b:
            return b
    return None


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
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, guard: Tensor, layer: _SparseMatrix) -> Tensor:
        return layer._product(x, bias)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        raise RuntimeError(
            "A backward pass reached a sparse layer made by `lightning_snip.sparsify`, which is for inference"
            " only (its weight is a sparse tensor, not a trainable parameter). To train, get the dense model back with"
            " `lightning_snip.densify(model)`."
        )


class _SparseMatrix(nn.Module):
    """What the sparse layers share: a ``(out, in)`` weight held for a sparse kernel, a dense bias, and the rules.

    ``state_dict`` writes the weight dense in the replaced layer's shape; casts and moves rebuild it; any backward
    pass raises; under ``torch.autocast`` the product runs in the weight's dtype and is cast to the autocast dtype.
    """

    weight: Tensor
    bias: nn.Parameter | None

    def __init__(self, source: nn.Module, weight: Tensor, kernel: Kernel) -> None:
        super().__init__()
        self.kernel: Kernel = kernel
        self._dense_shape = tuple(cast(Tensor, source.weight).shape)
        weight = weight.detach()
        self.zero_fraction = float((weight == 0).sum()) / max(weight.numel(), 1)
        self._rows: RowKernel | None = None
        self.block_size: int | None = None
        if kernel == "bsr":
            self.block_size = block_size(weight.reshape(weight.shape[0], -1))
            if self.block_size is None:
                raise ValueError(
                    f"kernel='bsr' needs a weight whose zeros come in square tiles ({', '.join(map(str, BLOCK_SIZES))}:"
                    f" at least half the tiles zero, the rest at least half full); this {tuple(weight.shape)} weight"
                    " has none. Use kernel='csr' or 'numba', or `sparsify(model, example_input=x)` to choose by"
                    " measurement."
                )
        self.register_buffer("weight", self._convert(weight), persistent=False)  # `state_dict` writes it dense
        self.bias = source.bias  # type: ignore[assignment]
        self.train(source.training)
        _copy_forward_hooks(source, self)
        # A module that reads `.weight` itself rather than calling this layer (the fused fast path of
        # `nn.TransformerEncoderLayer`) skips it when a submodule has hooks, and takes the standard path instead.
        self.register_forward_pre_hook(_standard_path)

    def _convert(self, weight: Tensor) -> Tensor:
        """The stored form of a 2-D dense weight for ``self.kernel`` (and the compiled kernel's rows)."""
        self._rows = None
        if self.kernel == "2:4":
            if not _semi_structured_ok(weight):
                raise ValueError(
                    f"A 2:4 `{type(self).__name__}` needs a CUDA weight (compute capability >= 8.0) in float16 or"
                    f" bfloat16, dimensions multiples of 64 and a 2:4 pattern of zeros; got a {weight.dtype} weight of"
                    f" shape {tuple(weight.shape)} on {weight.device}."
                )
            return torch.sparse.to_sparse_semi_structured(weight)
        if self.kernel not in ("csr", "numba", "bsr"):
            raise ValueError(f"`kernel` must be 'csr', 'numba', 'bsr' or '2:4', got {self.kernel!r}.")
        if not _csr_ok(weight) or (self.kernel in ("numba", "bsr") and weight.is_cuda):
            raise ValueError(
                f"A {self.kernel} `{type(self).__name__}` needs a {'/'.join(str(d) for d in _CPU_CSR_DTYPES)} weight on"
                f" the CPU (CSR on CUDA also half precision); got {weight.dtype} on {weight.device}."
            )
        if self.kernel == "numba":
            self._rows = RowKernel(weight)
        # a BSR weight keeps the tiling set in __init__ through later weights (a load, a cast)
        return _csr(weight, self.block_size if self.kernel == "bsr" else None)

    def dense_weight(self) -> Tensor:
        """The weight as an ordinary dense tensor, in the replaced layer's shape."""
        return self.weight.to_dense().reshape(self._dense_shape)

    def _as_dense(self, layer: _Dense) -> _Dense:
        """``layer`` (a new dense layer of the replaced kind) given this one's weight, bias, hooks and mode."""
        weight = self.dense_weight()
        layer.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
        if self.bias is not None:
            layer.bias = self.bias
        _copy_forward_hooks(self, layer)
        layer.train(self.training)
        return layer

    def _matmul(self, x_t: Tensor) -> Tensor:
        """``weight @ x_t`` for ``x_t`` of shape ``(in, n)``: the ``(out, n)`` product, by this layer's kernel."""
        if self._rows is not None:
            return self._rows(x_t)
        if self.kernel == "2:4":
            return F.linear(x_t.t(), self.weight).t()
        return torch.sparse.mm(self.weight, x_t)

    def _tiles(self) -> str:
        return f", blocks={self.block_size}x{self.block_size}" if self.kernel == "bsr" else ""

    def _product(self, x: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError  # pragma: no cover - each layer kind computes its own

    def forward(self, input: Tensor) -> Tensor:
        """The replaced layer's output, computed with the sparse weight."""
        x = input
        if self.kernel in ("csr", "numba", "bsr") and not _csr_ok(self.weight):
            raise RuntimeError(
                f"This {self.kernel} `{type(self).__name__}` holds a {self.weight.dtype} weight on"
                f" {self.weight.device}, which no sparse kernel multiplies (the CPU needs float32 or float64). Cast it"
                " back, or get the dense model with `lightning_snip.densify` before casting it."
            )
        cast_to = _autocast_dtype(x.device.type)
        if cast_to is not None:  # the product in the weight's dtype, its result in the autocast dtype
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x.to(self.weight.dtype)).to(cast_to)
        if x.dtype != self.weight.dtype:
            raise TypeError(
                f"`{type(self).__name__}` got a {x.dtype} input for its {self.weight.dtype} weight; cast the input."
            )
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return _InferenceOnly.apply(x, self.bias, torch.empty(0, requires_grad=True), self)
        return self._product(x, self.bias)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> _SparseMatrix:
        if self.kernel == "csr":
            return super()._apply(fn, recurse)
        # a 2:4, compiled-kernel or BSR weight is rebuilt from its dense values: the same kernel where it still
        # suits, else CSR (a move to CUDA, say)
        moved = fn(self.weight.to_dense())
        if self.kernel == "2:4":
            self.kernel = "2:4" if _semi_structured_ok(moved) else "csr"
        else:  # numba or bsr: CPU kernels
            self.kernel = self.kernel if moved.device.type == "cpu" and _csr_ok(moved) else "csr"
        rebuilt = self._convert(moved) if self.kernel != "csr" else _csr(moved)
        if self.kernel == "csr":
            self._rows = None
        del self._buffers["weight"]  # `fn` is applied to the bias alone
        super()._apply(fn, recurse)
        self.register_buffer("weight", rebuilt, persistent=False)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _SparseMatrix:
        # sparse tensors have no storage for `copy.deepcopy` to copy: everything else is copied, the weight cloned
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        weight = cast(Tensor, self._buffers["weight"])
        self._buffers["weight"] = None
        try:
            state = copy.deepcopy(self.__dict__, memo)
        finally:
            self._buffers["weight"] = weight
        state["_buffers"]["weight"] = weight.clone() if self.kernel != "2:4" else self._convert(weight.to_dense())
        clone.__dict__.update(state)
        return clone

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:  # the replaced layer's order
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
            if tuple(dense.shape) != self._dense_shape:
                error_msgs.append(f"size mismatch for {key}: {tuple(dense.shape)} in the state dict for a sparse layer")
            else:
                matrix = dense.to(self.weight.device, self.weight.dtype).reshape(self._dense_shape[0], -1)
                self.weight = self._convert(matrix)
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class SparseLinear(_SparseMatrix):
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
    dtype allow, and becomes CSR elsewhere (on the CPU, say); a ``"numba"`` or ``"bsr"`` weight becomes CSR on CUDA.
    A ``"bsr"`` weight keeps its tile size through casts and loads (any values are multiplied exactly; the speed
    needs the tiles).

    Args:
        linear: The dense layer.
        kernel: ``"csr"`` (MKL on the CPU, cuSPARSE on CUDA), ``"numba"`` (the compiled CPU kernel of
            :mod:`lightning_snip.kernels`, the extra ``lightning-snip[fast]``), ``"bsr"`` (block-sparse, CPU only,
            for a weight whose zeros come in square tiles: :func:`block_size` picks the tile) or ``"2:4"``
            (semi-structured, CUDA only).

    Raises:
        ValueError: If the weight's dtype or device does not suit the kernel, or ``"bsr"`` finds no tiles.
        ImportError: For ``"numba"`` without numba (the message names the extra).
    """

    def __init__(self, linear: nn.Linear, kernel: Kernel = "csr") -> None:
        self.in_features, self.out_features = linear.in_features, linear.out_features
        super().__init__(linear, linear.weight, kernel)

    def to_linear(self) -> nn.Linear:
        """The ordinary ``nn.Linear`` this layer computes: dense weight (trainable), the same bias parameter."""
        return self._as_dense(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None))

    def _product(self, x: Tensor, bias: Tensor | None) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.kernel == "2:4":
            out = F.linear(rows, self.weight, bias)
        elif self.kernel == "numba":
            out = self._matmul(rows.t()).t()
            if bias is not None:
                out = out + bias
        elif bias is None:
            out = torch.sparse.mm(self.weight, rows.t()).t()
        else:  # sparse (out, in) @ dense (in, batch): MKL's fast orientation; the result is a transposed view
            out = torch.addmm(bias.unsqueeze(1), self.weight, rows.t()).t()
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """The layer's sizes, kernel and fraction of zeros, for ``print(model)``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None},"
            f" kernel={self.kernel!r}{self._tiles()}, zeros={self.zero_fraction:.2%}"
        )


def is_pointwise_conv(module: nn.Module) -> bool:
    """Whether ``module`` is exactly an ``nn.Conv2d`` that is a matrix product over its channels.

    That is: 1x1, stride 1, no padding or dilation, groups 1, and zeros padding mode.

    Example::

        >>> is_pointwise_conv(nn.Conv2d(64, 256, 1)), is_pointwise_conv(nn.Conv2d(64, 256, 1, stride=2))
        (True, False)
    """
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


class SparseConv1x1(_SparseMatrix):
    """A 1x1 ``nn.Conv2d`` (see :func:`is_pointwise_conv`) for inference, computed as a sparse matrix product.

    A 1x1 convolution multiplies every pixel's channel vector by the ``(out, in)`` weight: for one image its input
    already lies in memory as the ``(in, height * width)`` matrix the product needs, so there is no ``unfold`` copy
    (larger batches are gathered into one ``(in, batch * height * width)`` matrix first). Otherwise it behaves like
    :class:`SparseLinear`: the same kernels, hooks, modes, autocast, ``state_dict`` in ``nn.Conv2d``'s keys and
    shape, and a refused backward; :meth:`to_conv` gives the dense layer back.

    Args:
        conv: The dense 1x1 convolution.
        kernel: ``"csr"``, ``"numba"`` or ``"bsr"``.

    Raises:
        ValueError: If ``conv`` is not a plain 1x1 convolution, or the weight does not suit the kernel.
    """

    def __init__(self, conv: nn.Conv2d, kernel: Kernel = "csr") -> None:
        if not is_pointwise_conv(conv):
            raise ValueError(f"`SparseConv1x1` takes a 1x1, stride-1, unpadded, ungrouped `nn.Conv2d`; got {conv}.")
        if kernel == "2:4":
            raise ValueError("`SparseConv1x1` takes kernel 'csr', 'numba' or 'bsr', got '2:4'.")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        super().__init__(conv, conv.weight.reshape(conv.out_channels, conv.in_channels), kernel)

    def to_conv(self) -> nn.Conv2d:
        """The ordinary ``nn.Conv2d`` this layer computes: dense weight (trainable), the same bias parameter."""
        return self._as_dense(nn.Conv2d(self.in_channels, self.out_channels, 1, bias=self.bias is not None))

    def _product(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if x.dim() == 3:  # an unbatched (C, H, W) input, as nn.Conv2d takes
            return self._product(x.unsqueeze(0), bias).squeeze(0)
        n, c, h, w = x.shape
        x_t = x.reshape(c, h * w) if n == 1 else x.transpose(0, 1).reshape(c, n * h * w)
        out = self._matmul(x_t)
        if bias is not None:
            out = out + bias.unsqueeze(1)
        out = out.reshape(self.out_channels, n, h, w)
        return out.transpose(0, 1) if n > 1 else out.reshape(1, self.out_channels, h, w)

    def extra_repr(self) -> str:
        """The layer's channels, kernel and fraction of zeros, for ``print(model)``."""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1), bias={self.bias is not None},"
            f" kernel={self.kernel!r}{self._tiles()}, zeros={self.zero_fraction:.2%}"
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


def _block_calls(once: float) -> int:
    """How many back-to-back calls of ``once`` seconds fill a block of :data:`BLOCK_SECONDS`."""
    return max(1, min(100, int(BLOCK_SECONDS / max(once, 1e-7))))


def _measured_faster(layer: nn.Module, sparse: _SparseMatrix, x: Tensor, rounds: int = 15) -> tuple[bool, float]:
    """Time the dense and the sparse layer on ``x``; sparse wins at :data:`MEASURED_MARGIN` of dense or less.

    Interleaved blocks of back-to-back calls, each block sized to its own layer's speed; the medians per call compared.
    """
    calls = {"dense": 1, "sparse": 1}

    def repeat(name: str, fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls[name]):
                fn()

        return run

    dense_run = _timer(repeat("dense", lambda: layer(x)), x.device)
    sparse_run = _timer(repeat("sparse", lambda: sparse(x)), x.device)
    dense_run(), sparse_run()  # warm-up (a compiled kernel compiles on its first call)
    calls["dense"], calls["sparse"] = _block_calls(dense_run()), _block_calls(sparse_run())
    dense_times, sparse_times = [], []
    budget = time.perf_counter() + 2.0  # a few seconds at most per layer, however slow
    for _ in range(rounds):
        dense_times.append(dense_run() / calls["dense"])
        sparse_times.append(sparse_run() / calls["sparse"])
        if time.perf_counter() > budget and len(dense_times) >= 3:
            break
    ratio = statistics.median(sparse_times) / statistics.median(dense_times)
    return ratio <= MEASURED_MARGIN, ratio


def _kernels_for(matrix: Tensor, conv: bool) -> list[Kernel]:
    """The sparse kernels that can multiply a 2-D weight, in the order the rule prefers them."""
    if not conv and _semi_structured_ok(matrix):
        return ["2:4"]
    if not _csr_ok(matrix):
        return []
    if matrix.device.type != "cpu":
        return ["csr"]
    kernels: list[Kernel] = ["csr"]
    if numba_available():
        kernels.append("numba")
    if block_size(matrix) is not None:
        kernels.append("bsr")
    return kernels


def _sparse_layer(layer: nn.Module, kernel: Kernel) -> _SparseMatrix:
    return (
        SparseConv1x1(cast(nn.Conv2d, layer), kernel)
        if isinstance(layer, nn.Conv2d)
        else SparseLinear(cast(nn.Linear, layer), kernel)
    )


def sparsify(model: nn.Module, example_input: Any = None) -> nn.Module:
    """A copy of a trained, pruned ``model`` for inference, whose mostly-zero layers run sparse where that is faster.

    Each ``nn.Linear`` and each 1x1 ``nn.Conv2d`` (:func:`is_pointwise_conv`; exactly those classes: subclasses may
    compute differently) gets a sparse kernel where it is faster, and stays dense otherwise:

    - with ``example_input``, the decision is measured, layer by layer in the order they run: a forward of the model
      records the input a layer gets from the layers before it as already chosen (a CSR layer's result is laid out
      transposed, which a next sparse layer reads faster), and the dense layer and each sparse kernel that can run
      it (MKL CSR; the compiled ``"numba"`` kernel when numba is installed, the extra ``lightning-snip[fast]``;
      block-sparse ``"bsr"`` when the layer's zeros come in square tiles, :func:`block_size`) are timed on it,
      interleaved in blocks of back-to-back calls (about 5 ms each, as a serving loop calls the model); the fastest
      kernel is used when its median time is at most :data:`MEASURED_MARGIN` (0.9) of the dense median. Layers the
      example does not reach stay dense. Then the whole model is timed on the example with and without the chosen
      layers, interleaved: if it is not faster with them, the compiled-kernel layers, and then all of them, go back
      to dense, so the result is never slower than the dense model on the example, as measured.
    - without it, a rule decides for ``nn.Linear`` layers: sparse (MKL CSR) when at least :data:`MIN_ZERO_FRACTION`
      (95%) of its weights are zero and it has at least :data:`MIN_WEIGHTS` (262,144) of them; a 2:4 layer that a
      GPU accelerates (see the module docs) always goes sparse. 1x1 convolutions go sparse only when measured.

    The kernel is 2:4 semi-structured where the GPU, dtype, shape and pattern allow, else CSR, the compiled kernel or
    BSR (float32/float64 on the CPU). Other layers, other convolutions included, are left as they are. The copy is in
    eval mode; ``model`` is not changed at all (every submodule keeps its own train/eval mode). Forward hooks and
    forward pre-hooks of a replaced layer run on its sparse replacement, so outputs match the dense model's; the
    copy runs under ``torch.autocast`` too (see :class:`SparseLinear`). Each decision is logged at INFO level on the
    ``lightning_snip.inference`` logger, and ``print`` of the result shows the sparse layers.

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
    holder = _Holder(result)  # a parent for the model itself, which may be a single layer to replace
    layers = {name: m for name, m in result.named_modules() if type(m) is nn.Linear or is_pointwise_conv(m)}
    reached = _layer_inputs(holder, layers, example_input) if example_input is not None else {}
    replaced: dict[int, _SparseMatrix | None] = {}
    swaps: list[Swap] = []
    changed = False  # whether a layer has gone sparse since `reached` was recorded
    # the layers the example reaches first, in the order they run: each is measured on the input it gets from the
    # layers before it as already chosen (a CSR layer hands on a transposed result, which a next CSR layer reads
    # faster than a contiguous one)
    for name in [*reached, *(n for n in layers if n not in reached)]:
        layer = layers[name]
        if id(layer) in replaced:
            continue
        weight = layer.weight.detach()
        conv = isinstance(layer, nn.Conv2d)
        kernels = _kernels_for(weight.reshape(weight.shape[0], -1), conv)
        zeros = float((weight == 0).sum()) / max(weight.numel(), 1)
        choice: _SparseMatrix | None = None
        why = f"{zeros:.1%} zeros"
        if not kernels:
            why += f", no sparse kernel for {weight.dtype} on {weight.device}"
        elif zeros == 0:
            why += ", nothing to skip"
        elif example_input is not None:
            if name not in reached:
                why += ", not reached by the example input"
            else:
                x = (
                    _layer_inputs(holder, {name: layer}, example_input).get(name, reached[name])
                    if changed
                    else reached[name]
                )
                measured: dict[Kernel, tuple[float, _SparseMatrix]] = {}
                for kernel in kernels:
                    candidate = _sparse_layer(layer, kernel)
                    with torch.inference_mode():
                        measured[kernel] = (_measured_faster(layer, candidate, x)[1], candidate)
                best = min(measured, key=lambda k: measured[k][0])
                why += ", measured " + ", ".join(f"{k} {r:.2f}x" for k, (r, _) in measured.items()) + " the dense time"
                choice = measured[best][1] if measured[best][0] <= MEASURED_MARGIN else None
        elif conv:
            why += ", a convolution: sparse only when an example input measures it faster"
        elif kernels[0] == "2:4" or (zeros >= MIN_ZERO_FRACTION and weight.numel() >= MIN_WEIGHTS):
            choice = SparseLinear(cast(nn.Linear, layer), kernels[0])
        else:
            why += f", below the rule ({MIN_ZERO_FRACTION:.0%} zeros and {MIN_WEIGHTS:,} weights)"
        replaced[id(layer)] = choice
        log.info("sparsify: %s -> %s (%s)", name, "dense" if choice is None else f"sparse {choice.kernel}", why)
        if choice is not None:  # every occurrence of a shared layer, in place now for the layers measured after it
            found: list[Swap] = [
                (parent, child_name, child, choice)
                for parent in list(holder.modules())
                for child_name, child in list(parent._modules.items())
                if child is layer
            ]
            for parent, child_name, _, sparse in found:
                setattr(parent, child_name, sparse)
            swaps += found
            changed = True
    if example_input is not None and swaps:
        for parent, child_name, dense, _ in swaps:  # dense again; the whole-model check decides what goes sparse
            setattr(parent, child_name, dense)
        swaps = _keep_if_whole_model_faster(holder, swaps, example_input)
        for parent, child_name, _, sparse in swaps:
            setattr(parent, child_name, sparse)
    return holder.model


class _Holder(nn.Module):
    """The model as the one child of a parent, so that a model that is a single layer can be swapped too."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def _layer_inputs(holder: _Holder, layers: Mapping[str, nn.Module], example_input: Any) -> dict[str, Tensor]:
    """The input each of ``layers`` gets in one forward of the held model on ``example_input``.

    In the order the layers first run (each layer's first call); layers the example does not reach are left out.
    """
    seen: dict[str, Tensor] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.setdefault(name, args[0] if args else kwargs["input"])

        return hook

    handles = [m.register_forward_pre_hook(record(name), with_kwargs=True) for name, m in layers.items()]
    try:
        with torch.inference_mode():
            _call(holder, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _whole_model_ratio(model: nn.Module, swaps: list[Swap], example_input: Any, rounds: int = 15) -> float:
    """The whole model's median time per call with ``swaps`` made over its median time without.

    Interleaved blocks of back-to-back calls, each sized to its configuration's speed.
    """

    def use(sparse: bool) -> None:
        for parent, name, dense, layer in swaps:
            setattr(parent, name, layer if sparse else dense)

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    calls = {False: 1, True: 1}
    current = [False]

    def block() -> None:
        for _ in range(calls[current[0]]):
            _call(model, example_input)

    run = _timer(block, device)
    times: dict[bool, list[float]] = {False: [], True: []}
    budget = time.perf_counter() + 3.0
    with torch.inference_mode():
        for sparse in (False, True):  # a warm-up call, then one call to size the blocks
            use(sparse)
            current[0] = sparse
            run()
            calls[sparse] = _block_calls(run())
        for _ in range(rounds):
            for sparse in (False, True):
                use(sparse)
                current[0] = sparse
                times[sparse].append(run() / calls[sparse])
            if time.perf_counter() > budget and len(times[True]) >= 3:
                break
    use(False)
    return statistics.median(times[True]) / statistics.median(times[False])


def _keep_if_whole_model_faster(model: nn.Module, swaps: list[Swap], example_input: Any) -> list[Swap]:
    """The layers chosen one by one, kept only if the whole model on the example is faster with them.

    Layers measured alone can still slow the whole model down (two thread pools taking turns on few cores, say):
    if the whole model is not faster, the compiled-kernel layers go back to dense, and then, if it is still not
    faster, all of them.
    """
    ratio = _whole_model_ratio(model, swaps, example_input)
    if ratio <= 1.0:
        log.info("sparsify: the whole model measured at %.2fx the dense time", ratio)
        return swaps
    without_numba = [swap for swap in swaps if swap[3].kernel != "numba"]
    if without_numba and len(without_numba) < len(swaps):
        retry = _whole_model_ratio(model, without_numba, example_input)
        if retry <= 1.0:
            log.info(
                "sparsify: the whole model measured at %.2fx the dense time, %.2fx with the compiled-kernel layers"
                " dense: those stay dense",
                ratio,
                retry,
            )
            return without_numba
    log.info("sparsify: the whole model measured at %.2fx the dense time with its sparse layers: all stay dense", ratio)
    return []


def densify(model: nn.Module) -> nn.Module:
    """A copy of a sparsified model with every sparse layer turned back into its ``nn.Linear`` or ``nn.Conv2d``.

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
        if isinstance(module, _SparseMatrix) and id(module) not in memo:
            dense = module.to_linear() if isinstance(module, SparseLinear) else cast(SparseConv1x1, module).to_conv()
            if module.bias is not None:
                dense.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=True)
            memo[id(module)] = dense
    return copy.deepcopy(model, memo)
