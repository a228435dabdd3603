"""GraSP (Wang, Zhang & Grosse, ICLR 2020): gradient signal preservation, by a Hessian-gradient product."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_snip.scoring import Criterion, ScoringContext, ScoringError, register_criterion
from lightning_snip.selection import all_finite


@register_criterion("grasp")
class GraSP(Criterion):
    """Importance ``w * (H g)``: the negative of GraSP's score, so the highest is kept. Signed, not absolute.

    ``g`` is the mean loss gradient over the scoring batches; ``H g`` comes from a second pass over the same
    batches by double backward (``z = sum(dL/dw * g)``, ``H g = dz/dw``), averaged like ``g`` (and across DDP
    ranks). The loss is the module's ``training_step`` loss as it is: the official code divides the logits by a
    temperature of 200 first, which a criterion that sees only the loss cannot do.

    Every operation between the weights and the loss needs a double backward. Where one has none (``F.ctc_loss``, a
    custom ``autograd.Function`` marked ``once_differentiable``) scoring stops with a ``ScoringError`` and the model
    is left as it was. A custom ``autograd.Function`` whose backward is not itself differentiable but is not marked
    so contributes no Hessian terms, silently: torch cannot tell, so GraSP's scores then miss its curvature.
    """

    needs_data = True
    supports_sharding = False

    def score(self, context: ScoringContext) -> dict[str, Tensor]:  # noqa: D102
        if context.loss_fn is None:
            raise ScoringError("GraSP needs the loss, but the scoring context has no `loss_fn`.")
        g = context.mean_gradients()
        names = list(context.weights)
        weights = [context.weights[n] for n in names]
        hg = {n: torch.zeros_like(g[n]) for n in names}
        for batch in range(context.num_batches):  # the same batches again
            loss = context.loss_fn(batch)
            try:
                grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
                z = sum(
                    ((gr * g[n]).sum() for n, gr in zip(names, grads, strict=True) if gr is not None), torch.zeros(())
                )
                if not z.requires_grad:  # nothing depends on the weights twice (a linear model): H g is zero
                    continue
                second = torch.autograd.grad(z, weights, allow_unused=True)
            except RuntimeError as error:  # an op without a double backward (e.g. `F.ctc_loss`, `once_differentiable`)
                raise ScoringError(
                    "GraSP needs second derivatives (a Hessian-gradient product, by double backward), but an"
                    f" operation of this model or loss has none: {error}. Use `criterion='snip'` or"
                    " `criterion='synflow'`, which need first derivatives only."
                ) from error
            for n, h in zip(names, second, strict=True):
                if h is not None:
                    hg[n].add_(h)
        scores = {}
        for n in names:
            mean = hg[n].div_(context.num_batches)
            if context.all_reduce_mean is not None:
                mean = context.all_reduce_mean(mean)
            if not all_finite(mean):
                raise ScoringError(f"The Hessian-gradient product of `{n}` is not finite; GraSP is undefined here.")
            scores[n] = mean.mul_(context.weights[n].detach())
        return scores
