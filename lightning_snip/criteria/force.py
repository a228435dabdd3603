"""FORCE (de Jorge et al., "Progressive Skeletonization", ICLR 2021): gradients of the masked network, dense weights."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from lightning_snip.criteria.rounds import prune_in_rounds
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
        def round_scores(round_index: int, originals: Mapping[str, Tensor]) -> dict[str, Tensor]:
            grads = context.mean_gradients(round_index)
            return {name: grad.mul_(originals[name]).abs_() for name, grad in grads.items()}

        return prune_in_rounds(context, round_scores, bring_back=True)
