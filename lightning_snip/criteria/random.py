"""Random scores: a random mask with the exact requested count, the paper's other baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_snip.scoring import Criterion, ScoringContext, register_criterion


@register_criterion("random")
class Random(Criterion):
    """Uniform random scores: a random mask with the exact requested sparsity."""

    def score(self, context: ScoringContext) -> dict[str, Tensor]:  # noqa: D102
        return {
            name: context.local(name, torch.rand(context.whole_shape(name), generator=context.generator)).to(w.device)
            for name, w in context.weights.items()
        }
