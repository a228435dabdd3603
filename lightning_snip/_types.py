"""Argument types that LightningCLI checks while it parses a config, before anything is built.

With jsonargparse installed (LightningCLI's parser), ``Sparsity`` and ``PositiveInt`` are its restricted number
types and ``ScopeName`` a registered string type, so ``--trainer.callbacks.init_args.sparsity=1.5`` or
``scope=4:2`` is rejected at parse time with a one-line message. Without it they are plain ``float``, ``int`` and
``str``; ``SNIPPruning.__init__`` validates the values either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from lightning_snip.selection import parse_n_m

Structure = Literal["weight", "channel"]
"""What is pruned: single weights (masks) or whole channels (a physically smaller network)."""

if TYPE_CHECKING:
    Sparsity = float
    PositiveInt = int
    ScopeName = str
else:

    class ScopeName(str):
        """``"global"``, ``"layerwise"``, ``"constant_fan_in"`` or ``"N:M"`` with integers ``0 < N < M``."""

        __slots__ = ()

        def __new__(cls, value: str) -> ScopeName:
            parse_n_m(value)
            return super().__new__(cls, value)

    try:
        from jsonargparse.typing import register_type
    except ImportError:
        pass
    else:
        register_type(ScopeName, str, ScopeName)

    try:
        from jsonargparse.typing import PositiveInt, restricted_number_type
    except ImportError:  # the core package does not need jsonargparse
        Sparsity, PositiveInt = float, int
    else:
        Sparsity = restricted_number_type(
            "Sparsity", float, [(">=", 0.0), ("<", 1.0)], docstring="fraction of weights set to zero, in [0, 1)"
        )
