"""What the iterative criteria share: pruning in rounds on the masked network, then restoring the weights.

Plain PyTorch. Each round scores the candidates with the current mask applied to the weights (``mask * w``), and all
rounds but the last select the next mask at the schedule's density (:meth:`ScoringContext.densities`) with the
caller's selection rule, so counts are exact. The last round's scores go back to the caller, whose selection at the
final density gives the masks. One copy of the candidates is kept to restore them; no model is copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor

from lightning_snip.scoring import ScoringContext, ScoringError

#: The score of a weight an earlier round pruned, below every score a kept weight can have (scores are >= 0).
PRUNED = -1.0

RoundScores = Callable[[int, Mapping[str, Tensor]], dict[str, Tensor]]
"""Given the round and the original weights, the scores of the candidates with the current mask applied."""


@contextmanager
def restored(weights: Mapping[str, Tensor]) -> Iterator[dict[str, Tensor]]:
    """Yield a copy of the weights' values and write it back into them on exit, whatever happens."""
    originals = {name: w.detach().clone() for name, w in weights.items()}
    try:
        yield originals
    finally:
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(originals[name])


def prune_in_rounds(context: ScoringContext, round_scores: RoundScores, bring_back: bool) -> dict[str, Tensor]:
    """Run the rounds of an iterative criterion and return the last round's scores.

    Args:
        context: The scoring context; its ``select``, ``sparsity``, ``iterations`` and ``schedule`` are used.
        round_scores: The scores of one round, computed on the masked network.
        bring_back: Whether a weight pruned in an earlier round may be kept again (FORCE). When not, its score is
            :data:`PRUNED` in every later round.

    Raises:
        ScoringError: If the context has no ``select`` and more than one round is asked for.
    """
    if context.iterations > 1 and context.select is None:
        raise ScoringError("An iterative criterion needs `select` in its scoring context to prune between rounds.")
    densities = context.densities()
    kept: dict[str, Tensor] | None = None
    with restored(context.weights) as originals:
        for round_index, density in enumerate(densities):
            if kept is not None:
                with torch.no_grad():
                    for name, w in context.weights.items():
                        w.copy_(torch.where(kept[name], originals[name], 0))
            scores = round_scores(round_index, originals)
            if kept is not None and not bring_back:
                scores = {name: s.masked_fill_(~kept[name], PRUNED) for name, s in scores.items()}
            if round_index == len(densities) - 1:
                return scores
            assert context.select is not None
            kept = context.select(scores, 1.0 - density)
    raise AssertionError("unreachable: there is at least one round")  # pragma: no cover


def snip_in_rounds(context: ScoringContext, dense_weights: bool) -> dict[str, Tensor]:
    """``|g * w|`` in rounds, with ``g`` taken on the masked network.

    ``w`` is the masked weights for iterative SNIP, which never brings a weight back, or the original dense ones for
    FORCE, which can.
    """

    def round_scores(round_index: int, originals: Mapping[str, Tensor]) -> dict[str, Tensor]:
        grads = context.mean_gradients(round_index)
        weights = originals if dense_weights else {name: w.detach() for name, w in context.weights.items()}
        return {name: grad.mul_(weights[name]).abs_() for name, grad in grads.items()}

    return prune_in_rounds(context, round_scores, bring_back=dense_weights)
