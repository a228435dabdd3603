"""FORCE (de Jorge et al., "Progressive Skeletonization", ICLR 2021): gradients of the masked network, dense weights."""

from __future__ import annotations

from torch import Tensor

from lightning_snip.criteria.rounds import snip_in_rounds
from lightning_snip.scoring import Criterion, ScoringContext, register_criterion


@register_criterion("force")
class FORCE(Criterion):
    """``|dL/dw_masked * w_dense|`` in rounds of falling density; a pruned weight can come back in a later round.

    The gradient is taken on the network with the current mask applied, and multiplied by the original dense
    weights, so a pruned weight whose connection would matter again scores again. One round is exactly ``snip``.
    The published default is 60 rounds (the official code's setting for CIFAR).
    """

    needs_data = True
    default_iterations = 60
    supports_sharding = False

    def score(self, context: ScoringContext) -> dict[str, Tensor]:  # noqa: D102
        return snip_in_rounds(context, dense_weights=True)
