"""GraSP (Wang, Zhang & Grosse, ICLR 2020): gradient signal preservation, by a Hessian-gradient product."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_snip.scoring import Criterion, ScoringContext, ScoringError, register_criterion
from lightning_snip.selection import all_finite


@register_criterion("grasp")
class GraSP(Criterion):
    """Importance ``w * (H g)``: the negative of GraSP's score, so the highest is kept. Signed, not absolute.

    ``g`` is the mean loss gradient over the scoring batches; ``H g`` comes from a second pass over the same
    batches by double backward (``z = sum(dL/dw * g)``, ``H g = dz/dw``), averaged like ``g`` (and across DDP
    ranks). As in the official code, the logits are divided by a temperature ``T`` (``context.temperature``; the
    callback's default is the official 200) in both passes: a forward hook on ``context.module`` divides its output
    while GraSP scores, and is removed after. Also as in the official code, every ``nn.Linear`` weight of the module
    is redrawn from a Xavier-normal distribution for scoring (``context.linear_reinit``, on by default in the
    callback; see :func:`xavier_linear_weights`), so the scores of those layers are ``w' * (H' g')`` at the drawn
    weights ``w'``; the model's own weights come back after scoring and are the ones that train.

    The output must be one floating-point tensor (the logits), and the loss
    must come through the module's forward (``self(x)`` in ``training_step``); otherwise scoring stops with a
    ``ScoringError`` that says so (``T = 1`` scores the loss as it is).

    Every operation between the weights and the loss needs a double backward. Where one has none (``F.ctc_loss``, a
    custom ``autograd.Function`` marked ``once_differentiable``) scoring stops with a ``ScoringError`` and the model
    is left as it was. A custom ``autograd.Function`` whose backward is not itself differentiable but is not marked
    so contributes no Hessian terms, silently: torch cannot tell, so GraSP's scores then miss its curvature.
    """

    needs_data = True
    supports_sharding = False
    default_temperature = 200.0
    default_linear_reinit = True

    def score(self, context: ScoringContext) -> dict[str, Tensor]:  # noqa: D102
        if context.loss_fn is None:
            raise ScoringError("GraSP needs the loss, but the scoring context has no `loss_fn`.")
        if context.module is None and (context.temperature != 1.0 or context.linear_reinit):
            raise ScoringError(
                "GraSP's temperature and Linear redraw act on the model, but the scoring context has no `module`."
                " Pass the module, or `temperature=1.0` and `linear_reinit=False` to score the loss as it is."
            )
        with ExitStack() as stack:
            divide = None
            if context.temperature != 1.0:
                assert context.module is not None
                divide = _Temperature(context.temperature)
                stack.callback(context.module.register_forward_hook(divide).remove)
            if context.linear_reinit:
                assert context.module is not None
                stack.enter_context(xavier_linear_weights(context.module, context.generator))
            return self._score(context, divide)

    def _score(self, context: ScoringContext, divide: _Temperature | None = None) -> dict[str, Tensor]:
        assert context.loss_fn is not None
        g = context.mean_gradients()
        if divide is not None and divide.calls == 0:
            raise ScoringError(
                f"GraSP's temperature (T={divide.temperature:g}) divides the output of the module's `forward`, but"
                " the loss never went through it (does `training_step` call the layers directly?). Compute the"
                " logits with `self(x)` in `training_step`, or pass `temperature=1.0` to score without one."
            )
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


class _Temperature:
    """A forward hook that divides a module's output (the logits) by ``temperature`` and counts its calls."""

    def __init__(self, temperature: float) -> None:
        self.temperature, self.calls = temperature, 0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Tensor:
        if not (isinstance(output, Tensor) and output.is_floating_point()):
            kind = f"a {output.dtype} tensor" if isinstance(output, Tensor) else f"a {type(output).__name__}"
            raise ScoringError(
                f"GraSP's temperature (T={self.temperature:g}) divides the logits, but `{type(module).__name__}`'s"
                f" forward returned {kind}. Return the logits as one floating-point tensor, or pass"
                " `temperature=1.0` to score without a temperature."
            )
        self.calls += 1
        return output / self.temperature


@contextmanager
def xavier_linear_weights(module: nn.Module, generator: torch.Generator | None = None) -> Iterator[list[str]]:
    """Within the block, every ``nn.Linear`` weight of ``module`` holds a Xavier-normal draw; the originals come back.

    The draw is ``N(0, 2 / (fan_in + fan_out))`` per weight (``nn.init.xavier_normal_`` with gain 1), taken in the
    order of ``module.named_modules()`` from ``generator`` (on the CPU, so every process given the same seed draws
    the same weights), or from torch's global generator when it is ``None``. Only weights that are plain
    parameters are redrawn: parametrized (weight norm, spectral norm) and uninitialized lazy layers keep theirs.

    Args:
        module: The model whose Linear layers are redrawn.
        generator: Where the draws come from. Defaults to ``None``.

    Yields:
        The names of the redrawn weights.

    Example::

        >>> layer = nn.Linear(4, 2)
        >>> before = layer.weight.detach().clone()
        >>> with xavier_linear_weights(nn.Sequential(layer), torch.Generator().manual_seed(0)) as names:
        ...     names, torch.equal(layer.weight, before)
        (['0.weight'], False)
        >>> torch.equal(layer.weight, before)
        True
    """
    saved: list[tuple[nn.Parameter, Tensor]] = []
    names: list[str] = []
    try:
        with torch.no_grad():
            for name, layer in module.named_modules():
                weight = layer._parameters.get("weight") if isinstance(layer, nn.Linear) else None
                if (
                    not isinstance(weight, nn.Parameter)
                    or isinstance(weight, nn.parameter.UninitializedParameter)
                    or any(weight is w for w, _ in saved)
                ):
                    continue
                fan_out, fan_in = weight.shape
                draw = torch.randn(weight.shape, generator=generator) * math.sqrt(2.0 / (fan_in + fan_out))
                saved.append((weight, weight.detach().clone()))
                weight.copy_(draw.to(device=weight.device, dtype=weight.dtype))
                names.append(f"{name}.weight" if name else "weight")
        yield names
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)
