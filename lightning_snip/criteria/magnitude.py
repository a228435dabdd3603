"""Weight magnitude at initialization: the SNIP paper's data-free baseline."""

from __future__ import annotations

from torch import Tensor

from lightning_snip.scoring import Criterion, ScoringContext, register_criterion


@register_criterion("magnitude")
class Magnitude(Criterion):
    """Weight magnitude ``|w|`` at initialization, the paper's data-free baseline."""

    def score(self, context: ScoringContext) -> dict[str, Tensor]:  # noqa: D102
        return {name: w.detach().abs().float() for name, w in context.weights.items()}
