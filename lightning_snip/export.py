"""ONNX files that stay small: pruned 2-D weights stored as sparse initializers.

Plain PyTorch, no Lightning; ``onnx`` and ``onnxruntime`` are the optional extra ``lightning-snip[onnx]``.
:func:`export_onnx` exports with ``torch.onnx.export`` and then moves every mostly-zero 2-D initializer into the
graph's ``sparse_initializer`` list (its nonzero values and their flat positions, ``int64``), which the ONNX standard
defines and ONNX Runtime reads. ONNX Runtime turns sparse initializers back into dense tensors when it loads the
model: the file is smaller, the model is not faster.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_snip.isolation import eval_mode

EXTRA = 'pip install "lightning-snip[onnx]"'


def _onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"`export_onnx` needs onnx and onnxruntime. Install the extra: {EXTRA}") from error
    return onnx, onnxruntime


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: The ONNX file.
        bytes: Its size.
        dense_bytes: The size of the same export with every initializer dense (``torch.onnx.export`` alone).
        sparse: The initializers stored sparse, with their fraction of zeros.
        max_difference: The largest absolute difference between ONNX Runtime's output and PyTorch's on the example.
    """

    path: Path
    bytes: int
    dense_bytes: int
    sparse: dict[str, float] = field(default_factory=dict)
    max_difference: float = 0.0

    @property
    def ratio(self) -> float:
        """How many times smaller than the plain export."""
        return self.dense_bytes / max(self.bytes, 1)


def _as_tuple(example_input: Any) -> tuple[Any, ...]:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def export_onnx(
    model: nn.Module, example_input: Any, path: str | Path, min_zero_fraction: float = 0.5, tolerance: float = 1e-4
) -> OnnxExport:
    """Export ``model`` to ONNX with its pruned 2-D weights as sparse initializers, and check it with ONNX Runtime.

    A 2-D float initializer goes sparse when at least ``min_zero_fraction`` of it is zero and the sparse form (4 or 8
    bytes per value plus 8 per position) is smaller; everything else stays dense. The file is then loaded by ONNX
    Runtime and run on ``example_input``; its output must be within ``tolerance`` (absolute, scaled by the largest
    output magnitude when that is above 1) of the model's.

    Args:
        model: The model, in eval mode for export (it is not changed).
        example_input: A tensor or a tuple of positional tensors.
        path: Where to write the ``.onnx`` file.
        min_zero_fraction: The fraction of zeros from which a 2-D initializer is stored sparse. Defaults to ``0.5``.
        tolerance: The largest output difference accepted. Defaults to ``1e-4``.

    Returns:
        The sizes of this file and of the plain export, which initializers went sparse, and the difference measured.

    Raises:
        ImportError: Without onnx/onnxruntime (the message names the extra).
        ValueError: For a ``min_zero_fraction`` outside ``[0, 1]``.
        RuntimeError: If ONNX Runtime's output differs from the model's by more than ``tolerance``.

    Example::

        >>> model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
        >>> with torch.no_grad():
        ...     _ = model[0].weight.mul_(torch.rand(512, 512) > 0.95)
        >>> report = export_onnx(model, torch.randn(2, 512), tempfile.mkdtemp() + "/model.onnx")  # doctest: +SKIP
        >>> report.ratio > 3  # doctest: +SKIP
        True
    """
    if not 0.0 <= min_zero_fraction <= 1.0:
        raise ValueError(f"`min_zero_fraction` must be in [0, 1], got {min_zero_fraction!r}.")
    onnx, onnxruntime = _onnx()
    from onnx import helper, numpy_helper

    path = Path(path)
    args = _as_tuple(example_input)
    with eval_mode(model):
        with tempfile.TemporaryDirectory() as scratch:
            dense_path = Path(scratch) / "dense.onnx"
            torch.onnx.export(model, args, str(dense_path), dynamo=True, external_data=False, verbose=False)
            dense_bytes = dense_path.stat().st_size
            graph_model = onnx.load(str(dense_path))
        with torch.no_grad():
            expected = model(*args)
    graph = graph_model.graph
    sparse: dict[str, float] = {}
    keep = []
    for initializer in graph.initializer:
        array = numpy_helper.to_array(initializer)
        if array.ndim != 2 or array.dtype not in (np.float32, np.float64, np.float16) or array.size == 0:
            keep.append(initializer)
            continue
        flat = array.reshape(-1)
        positions = np.flatnonzero(flat)
        zeros = 1.0 - positions.size / flat.size
        if zeros < min_zero_fraction or positions.size * (array.itemsize + 8) >= flat.size * array.itemsize:
            keep.append(initializer)
            continue
        values = numpy_helper.from_array(flat[positions], name=initializer.name)
        indices = numpy_helper.from_array(positions.astype(np.int64), name=f"{initializer.name}_indices")
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
        sparse[initializer.name] = zeros
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.checker.check_model(graph_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph_model, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args, strict=False)}
    got = session.run(None, feeds)[0]
    reference = (expected[0] if isinstance(expected, (tuple, list)) else expected).detach().cpu().numpy()
    difference = float(np.abs(got - reference).max()) if reference.size else 0.0
    if difference > tolerance * max(1.0, float(np.abs(reference).max()) if reference.size else 1.0):
        raise RuntimeError(
            f"ONNX Runtime's output on the example differs from the model's by {difference:.3g} (tolerance"
            f" {tolerance:g}); {path} was written but does not compute what the model computes."
        )
    return OnnxExport(path, path.stat().st_size, dense_bytes, sparse, difference)
