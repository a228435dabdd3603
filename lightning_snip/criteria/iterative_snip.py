"""Iterative SNIP (de Jorge et al., "Progressive Skeletonization", ICLR 2021): SNIP in rounds, never bringing back."""

from __future__ import annotations

from torch import Tensor

from lightning_snip.criteria.rounds import snip_in_rounds
from lightning_snip.scoring import Criterion, ScoringContext, register_criterion


@register_criterion("iterative_snip")
class IterativeSNIP(Criterion):
    """``|dL/dw * w|`` of the masked weights, in rounds of falling density; a pruned weight stays pruned.

    Each round draws fresh batches (``num_batches`` of them) and computes the loss gradient on the network with the
    current mask applied. One round is exactly ``snip``. The published default is 60 rounds (the official code's
    setting for CIFAR).
    """

    needs_data = True
    default_iterations = 60
    supports_sharding = False

    def score(self, context: ScoringContext) -> dict[str, Tensor]:  # noqa: D102
        return snip_in_rounds(context, dense_weights=False)
