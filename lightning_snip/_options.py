"""Checking ``SNIPPruning``'s arguments in ``__init__``: a clear error naming the argument, the value and the fix."""

from __future__ import annotations

import math

from lightning_snip.scoring import available_criteria, get_criterion
from lightning_snip.selection import check_min_density, check_n_m_sparsity, parse_n_m


def check_sparsity(sparsity: object) -> float:
    """``sparsity`` as a float, or a ``TypeError``/``ValueError`` that names it, the value and the fix."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"`sparsity` must be a real number in [0, 1), got {sparsity!r}. Use e.g. 0.9.")
    if not (math.isfinite(sparsity) and 0.0 <= sparsity < 1.0):
        raise ValueError(
            f"`sparsity` must be in [0, 1) (the fraction of weights set to zero), got {sparsity!r}. Use e.g. 0.9"
            " for 90% zeros."
        )
    return float(sparsity)


def validate_options(
    *,
    sparsity: object,
    num_batches: object,
    criterion: str,
    scope: str,
    flags: dict[str, object],
    seed: object,
    iterations: object,
    schedule: str,
    min_density: object,
    structure: str = "weight",
    width_multiple: object = 1,
    temperature: object = None,
    linear_reinit: object = None,
    sparsity_of: object = "channels",
) -> None:
    """Raise ``TypeError``/``ValueError`` for the first argument that is wrong; ``flags`` are the booleans by name."""
    sparsity = check_sparsity(sparsity)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"`num_batches` must be an integer >= 1, got {num_batches!r}. Use e.g. 1.")
    if criterion not in available_criteria():
        raise ValueError(f"`criterion` must be one of {available_criteria()}, got {criterion!r}.")
    parse_n_m(scope)  # a ValueError that says what is allowed
    check_n_m_sparsity(scope, float(sparsity))
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"`seed` must be an integer or None, got {seed!r}.")
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1):
        raise ValueError(f"`iterations` must be an integer >= 1 or None, got {iterations!r}. Use e.g. 100.")
    if iterations not in (None, 1) and get_criterion(criterion).default_iterations is None:
        raise ValueError(
            f"`iterations={iterations}` but `criterion={criterion!r}` scores in one pass. Leave `iterations` unset, or"
            " pick an iterative criterion ('iterative_snip', 'force', 'synflow')."
        )
    if schedule not in ("exponential", "linear"):
        raise ValueError(f"`schedule` must be 'exponential' or 'linear', got {schedule!r}.")
    if isinstance(min_density, bool) or not isinstance(min_density, (int, float)):
        raise TypeError(f"`min_density` must be a fraction in [0, 1], got {min_density!r}. Use e.g. 0.01.")
    check_min_density(float(min_density), float(sparsity), str(scope), {})
    if flags.get("shuffle") and (parse_n_m(scope) is not None or scope == "constant_fan_in"):
        raise ValueError(f"`shuffle=True` would break the row pattern of `scope={scope!r}`; use one or the other.")
    if structure not in ("weight", "channel"):
        raise ValueError(
            f"`structure` must be 'weight' (prune single weights) or 'channel' (remove whole channels, a physically"
            f" smaller network), got {structure!r}."
        )
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"`temperature` must be a positive number or None, got {temperature!r}. Use e.g. 200.")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"`temperature` must be a positive number or None, got {temperature!r}. Use e.g. 200.")
        if get_criterion(criterion).default_temperature is None:
            raise ValueError(
                f"`temperature={temperature}` divides the logits while GraSP scores, but `criterion={criterion!r}`"
                " takes no temperature. Leave `temperature` unset, or use `criterion='grasp'`."
            )
    if linear_reinit is not None:
        if not isinstance(linear_reinit, bool):
            raise TypeError(f"`linear_reinit` must be True, False or None, got {linear_reinit!r}.")
        if get_criterion(criterion).default_linear_reinit is None:
            raise ValueError(
                f"`linear_reinit={linear_reinit}` redraws the Linear weights while GraSP scores, but"
                f" `criterion={criterion!r}` does not take it. Leave `linear_reinit` unset, or use `criterion='grasp'`."
            )
    if isinstance(width_multiple, bool) or not isinstance(width_multiple, int) or width_multiple < 1:
        raise ValueError(f"`width_multiple` must be an integer >= 1, got {width_multiple!r}. Use e.g. 8.")
    if sparsity_of not in ("channels", "parameters", "macs"):
        raise ValueError(
            f"`sparsity_of` must be 'channels', 'parameters' or 'macs', got {sparsity_of!r}. Use 'parameters' (or"
            " 'macs') to remove channels until `sparsity` of the model's parameters (or weight MACs) are gone."
        )
    if structure == "weight":
        if sparsity_of != "channels":
            raise ValueError(
                f"`sparsity_of={sparsity_of!r}` says what `sparsity` counts when whole channels are removed, so it"
                " needs `structure='channel'` (with single weights `sparsity` is the fraction of candidate weights)."
            )
        if width_multiple != 1:
            raise ValueError(
                f"`width_multiple={width_multiple}` rounds kept channel counts, so it needs `structure='channel'`."
            )
        return
    if scope not in ("global", "layerwise"):  # N:M and constant fan-in shape rows of single weights
        raise ValueError(
            f"`structure='channel'` ranks whole channels, so `scope` must be 'global' or 'layerwise', got {scope!r}."
        )
    if get_criterion(criterion).default_iterations is not None and criterion != "synflow":
        raise ValueError(
            f"`criterion={criterion!r}` prunes single weights between its rounds, which `structure='channel'` does"
            " not do. Use a one-shot criterion ('snip', 'grasp', 'synflow' with `iterations=1`, 'magnitude',"
            " 'random')."
        )
    if criterion == "synflow" and iterations not in (None, 1):
        raise ValueError(
            f"`structure='channel'` scores once; SynFlow's `iterations={iterations}` would prune single weights"
            " between rounds. Leave `iterations` unset (one round) or use `structure='weight'`."
        )
    if flags.get("shuffle"):
        raise ValueError("`shuffle=True` permutes single weights; it has no meaning with `structure='channel'`.")


def check_patterns(argument: str, value: object) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise TypeError(
            f"`{argument}` must be a list of non-empty glob patterns over parameter names (e.g. ['*.weight']) or"
            f" None, got {value!r}."
        )
    return list(value)
