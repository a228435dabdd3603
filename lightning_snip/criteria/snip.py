"""SNIP: connection sensitivity at initialization (Lee, Ajanthan & Torr, ICLR 2019)."""

from __future__ import annotations

from torch import Tensor

from lightning_snip.scoring import Criterion, ScoringContext, register_criterion


@register_criterion("snip")
class SNIP(Criterion):
    """Connection sensitivity ``|dL/dw * w|`` (Lee et al., 2019): the loss gradient for a multiplicative mask at 1.

    With several batches the raw gradients are averaged first, as for one larger batch.
    """

    needs_data = True

    def score(self, context: ScoringContext) -> dict[str, Tensor]:  # noqa: D102
        grads = context.mean_gradients()
        return {name: grad.mul_(context.weights[name].detach()).abs_() for name, grad in grads.items()}
