"""SynFlow (Tanaka et al., NeurIPS 2020): iterative synaptic flow, without data."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lightning_snip.criteria.rounds import prune_in_rounds
from lightning_snip.scoring import Criterion, ScoringContext, ScoringError, register_criterion


@contextmanager
def _linearized(module: nn.Module) -> Iterator[None]:
    """Every floating-point parameter and buffer as its absolute value in float64, eval mode; all restored on exit."""
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    saved = [t.data for t in tensors]
    modes = [m.training for m in module.modules()]
    try:
        with torch.no_grad():
            for t in tensors:
                t.data = t.data.double().abs()
        module.eval()
        yield
    finally:
        for t, data in zip(tensors, saved, strict=True):
            t.data = data
        for m, mode in zip(module.modules(), modes, strict=True):
            m.training = mode


def _flow(output: object) -> Tensor:
    """``R``: the sum of every floating-point tensor the forward returned."""
    if isinstance(output, Tensor):
        return output.sum()
    parts = output.values() if isinstance(output, Mapping) else output if isinstance(output, (list, tuple)) else []
    flows = [_flow(part) for part in parts if isinstance(part, (Tensor, Mapping, list, tuple))]
    if not flows:
        raise ScoringError(f"SynFlow sums the model's outputs, but its forward returned {type(output).__name__}.")
    return torch.stack(flows).sum()


@register_criterion("synflow")
class SynFlow(Criterion):
    """``|w * dR/dw|`` with ``R`` the summed output for an all-ones input, every parameter made positive, in rounds.

    Data-free: ``training_step`` is never called. Every floating-point parameter and buffer is replaced by its
    absolute value in float64, the model runs in eval mode on an all-ones input of the model's input shape with
    batch size 1, and the current mask is applied in every round. Everything is restored afterwards. The published
    default is 100 rounds.
    """

    needs_input = True
    default_iterations = 100
    supports_sharding = False

    def score(self, context: ScoringContext) -> dict[str, Tensor]:  # noqa: D102
        module, example = context.module, context.example_input
        if module is None or example is None:
            raise ScoringError("SynFlow needs the model and an example input in its scoring context.")
        ones = torch.ones_like(example, dtype=torch.float64)
        names = list(context.weights)

        def round_scores(round_index: int, originals: Mapping[str, Tensor]) -> dict[str, Tensor]:
            with torch.enable_grad():
                flow = _flow(module(ones))
                grads = torch.autograd.grad(flow, [context.weights[n] for n in names], allow_unused=True)
            scores = {}
            for name, grad in zip(names, grads, strict=True):
                w = context.weights[name].detach()
                scores[name] = torch.zeros_like(w) if grad is None else grad.mul(w).abs_()
                if not torch.isfinite(scores[name]).all():
                    raise ScoringError(
                        f"The SynFlow scores of `{name}` overflow even in float64 (the network is too deep or wide"
                        " for an all-ones input); use `criterion='snip'` or fewer candidates."
                    )
            return scores

        with _linearized(module):
            return prune_in_rounds(context, round_scores, bring_back=False)
