"""Argument types that LightningCLI checks while it parses a config, before anything is built.

With jsonargparse installed (LightningCLI's parser), ``Sparsity`` and ``ScopeName`` are registered types that check
with ``SNIPPruning``'s own messages and ``PositiveInt`` its restricted number type, so
``--trainer.callbacks.init_args.sparsity=1.5`` or ``scope=4:2`` is rejected at parse time (one line with
:class:`lightning_snip.cli.SNIPCLIMixin`). Without it they are plain ``float``, ``int`` and
``str``; ``SNIPPruning.__init__`` validates the values either way.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Literal

from lightning_snip.selection import parse_n_m

Structure = Literal["weight", "channel"]
"""What is pruned: single weights (masks) or whole channels (a physically smaller network)."""

SparsityOf = Literal["channels", "parameters", "macs"]
"""With channels removed, what ``sparsity`` counts: the channels, or the parameters or weight MACs they take along."""

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

    class Sparsity(float):
        """The fraction of weights (or channels) set to zero, in [0, 1)."""

        __slots__ = ()

        def __new__(cls, value: object) -> Sparsity:
            from lightning_snip._options import check_sparsity

            if isinstance(value, str):  # from the command line: --trainer.callbacks.init_args.sparsity=0.95
                with contextlib.suppress(ValueError):
                    value = float(value)
            return super().__new__(cls, check_sparsity(value))

    try:
        from jsonargparse.typing import PositiveInt, register_type
    except ImportError:  # the core package does not need jsonargparse
        Sparsity, PositiveInt = float, int
    else:
        register_type(Sparsity, float, Sparsity)
