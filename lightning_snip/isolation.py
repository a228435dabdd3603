"""Run code on a model and undo its side effects: the "leaves no trace" guarantee of scoring.

Plain PyTorch, no Lightning.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        states["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch's usual stacks
        pass
    if torch.cuda.is_initialized():  # implies available; `is_available()` costs tens of microseconds per call
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "numpy" in states:
        import numpy as np

        np.random.set_state(states["numpy"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def _metric_states(module: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Snapshot every torchmetrics ``Metric`` inside ``module`` (their states are not buffers)."""
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a Lightning dependency
        return []
    snapshots: list[tuple[nn.Module, dict[str, Any]]] = []
    for metric in module.modules():
        if isinstance(metric, Metric):
            state: dict[str, Any] = {
                key: value.clone() if isinstance(value, Tensor) else list(value)
                for key, value in ((k, getattr(metric, k)) for k in metric._defaults)
            }
            state["_update_count"] = metric._update_count
            state["_computed"] = metric._computed
            snapshots.append((metric, state))
    return snapshots


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside, and back in the mode it was in on exit (normal or not).

    Example::

        >>> net = nn.Sequential(nn.Dropout(), nn.Dropout().eval())
        >>> with eval_mode(net):
        ...     inside = [m.training for m in net.modules()]
        >>> inside, [m.training for m in net.modules()]
        ([False, False, False], [True, True, False])
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def leave_no_trace(module: nn.Module) -> Iterator[None]:
    """Undo, on exit (normal or not), what running ``module`` changes besides its parameters' values.

    Restored: the global RNG streams (torch CPU and CUDA, numpy, Python ``random``); every submodule's
    train/eval mode; every buffer (BatchNorm running statistics, counters; reassigned buffers too); every
    parameter's ``.grad``; the states of torchmetrics metrics. Parameter values are not restored: that is where the
    caller's intended change (the mask) goes, after this context has closed.

    Args:
        module: The model the enclosed code runs.

    Example::

        >>> bn = nn.BatchNorm1d(3)
        >>> with leave_no_trace(bn):
        ...     _ = bn(torch.randn(8, 3))
        >>> bn.running_mean, int(bn.num_batches_tracked)
        (tensor([0., 0., 0.]), 0)
    """
    rng = _rng_states()
    modes = [(m, m.training) for m in module.modules()]
    buffers = [
        (owner, name, buf, buf.detach().clone())
        for owner in module.modules()
        for name, buf in owner._buffers.items()
        if buf is not None
    ]
    grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in module.parameters()]
    metrics = _metric_states(module)
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, buf, saved in buffers:
                buf.copy_(saved)
                owner._buffers[name] = buf
            for param, grad, saved_grad in grads:
                if grad is not None and saved_grad is not None:
                    grad.copy_(saved_grad)
                param.grad = grad
        for metric, state in metrics:
            for key, value in state.items():
                setattr(metric, key, value)
        for m, training in modes:
            m.training = training
        _set_rng_states(rng)
