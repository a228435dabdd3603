"""A compiled sparse x dense product for the CPU, from numba (the optional extra ``lightning-snip[fast]``).

Plain PyTorch and NumPy, no Lightning. :class:`RowKernel` holds a pruned weight ``(out, in)`` in compressed sparse
rows: 16-bit column indices where the weight has at most 65,536 columns (a quarter less memory read per weight),
else 32-bit. ``RowKernel(x_t)`` computes ``weight @ x_t`` for ``x_t`` of shape ``(in, n)``: the
transposed input of a linear layer (``n`` = batch), or a 1x1 convolution's input as it lies in memory,
``(channels, height * width)`` for one image. For one input vector each row's sum stays in a register and its
gathers vectorize; for several, each row of the output is accumulated in place. Rows are spread over
``torch.get_num_threads()`` threads; masks with the same count in every row (``scope="constant_fan_in"``) give every
thread the same work. Each row's sum is computed in the weight's dtype, in an order the compiler may change (it is
allowed to reassociate the sum to vectorize it), so results match the dense product to float rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

EXTRA = 'pip install "lightning-snip[fast]"'
_UINT16_COLUMNS = 1 << 16
_compiled: dict[str, Any] = {}


def numba_available() -> bool:
    """Whether numba is installed (the compiled kernel can be used)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels() -> dict[str, Any]:
    """The compiled kernels, compiled on first use (a second or two per dtype)."""
    if _compiled:
        return _compiled
    try:
        import numba
    except ImportError as error:
        raise ImportError(
            f"The compiled sparse kernel needs numba, which is not installed. Install the extra: {EXTRA}"
        ) from error
    # numba's own thread pool: its OpenMP layer would share PyTorch's OpenMP runtime, change its thread count and
    # leave spinning threads that slow PyTorch's own kernels down
    config: Any = numba.config
    if config.THREADING_LAYER == "default":
        config.THREADING_LAYER = "workqueue"

    def compile_pair(parallel: bool) -> tuple[Any, Any]:
        # fastmath lets the compiler reorder each row's sum (and vectorize its gathers); the slices give the loops a
        # trip count from zero, which is what makes them vectorize
        rows = numba.prange if parallel else range

        @numba.njit(parallel=parallel, cache=False, nogil=True, fastmath=True)
        def vector(indptr: Any, indices: Any, values: Any, x: Any, out: Any) -> None:  # pragma: no cover - compiled
            for i in rows(out.shape[0]):
                start = indptr[i]
                count = indptr[i + 1] - start
                row_values = values[start : start + count]
                row_columns = indices[start : start + count]
                acc = values.dtype.type(0)
                for p in range(count):
                    acc += row_values[p] * x[row_columns[p]]
                out[i] = acc

        @numba.njit(parallel=parallel, cache=False, nogil=True, fastmath=True)
        def matrix(indptr: Any, indices: Any, values: Any, x_t: Any, out: Any) -> None:  # pragma: no cover - compiled
            n = out.shape[1]
            for i in rows(out.shape[0]):
                row = out[i]
                for j in range(n):
                    row[j] = 0
                for p in range(indptr[i], indptr[i + 1]):
                    v = values[p]
                    column = x_t[indices[p]]
                    for j in range(n):
                        row[j] += v * column[j]

        return vector, matrix

    serial, parallel = compile_pair(False), compile_pair(True)  # compiled lazily, on first call per dtype
    _compiled.update(serial=serial, parallel=parallel, numba=numba)
    return _compiled


class RowKernel:
    """A pruned ``(out, in)`` weight held by rows for the compiled kernel; see the module docs.

    Args:
        weight: The dense weight, float32 or float64, on the CPU.

    Raises:
        ImportError: If numba is not installed (the message names the extra).
        ValueError: For another dtype or device.
    """

    def __init__(self, weight: Tensor) -> None:
        kernels = _kernels()
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.float64) or weight.dim() != 2:
            raise ValueError(
                f"The compiled kernel takes a 2-D float32/float64 CPU weight; got {weight.dtype} of shape"
                f" {tuple(weight.shape)} on {weight.device}."
            )
        self.numba = kernels["numba"]
        dense = weight.detach().contiguous().numpy()
        self.shape = dense.shape
        self.dtype = weight.dtype
        nonzero = dense != 0
        counts = nonzero.sum(axis=1)
        self.constant = bool(counts.size) and bool((counts == counts[0]).all())
        rows, cols = np.nonzero(nonzero)  # row-major: each row's columns in increasing order
        self.indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.indices = cols.astype(np.uint16 if self.shape[1] <= _UINT16_COLUMNS else np.int32)
        self.values = np.ascontiguousarray(dense[rows, cols])

    @property
    def layout(self) -> str:
        """``"constant fan-in"`` when every row keeps the same number of weights, else ``"csr"``."""
        return "constant fan-in" if self.constant else "csr"

    def __call__(self, x_t: Tensor) -> Tensor:
        """``weight @ x_t`` for ``x_t`` of shape ``(in, n)``, as a new ``(out, n)`` tensor."""
        x = x_t.detach()
        if not x.is_contiguous():
            x = x.contiguous()
        x_np = x.numpy()
        out = np.empty((self.shape[0], x_np.shape[1]), dtype=x_np.dtype)
        threads = max(1, min(torch.get_num_threads(), self.numba.config.NUMBA_NUM_THREADS))
        if threads == 1:  # no thread pool at all: its hand-off costs more than one thread's rows
            vector, matrix = _compiled["serial"]
        else:
            self.numba.set_num_threads(threads)
            vector, matrix = _compiled["parallel"]
        if x_np.shape[1] == 1:  # one input vector (batch 1): a sum per row, kept in a register
            vector(self.indptr, self.indices, self.values, x_np[:, 0], out[:, 0])
        else:
            matrix(self.indptr, self.indices, self.values, x_np, out)
        return torch.from_numpy(out)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("numba")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.numba = _kernels()["numba"]
