"""Argument types that LightningCLI checks while it parses a config, before anything is built.

With jsonargparse installed (LightningCLI's parser), ``Sparsity`` and ``PositiveInt`` are its restricted number
types, so ``--trainer.callbacks.init_args.sparsity=1.5`` is rejected at parse time with a one-line message. Without
it they are plain ``float`` and ``int``; ``SNIPPruning.__init__`` validates the values either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    Sparsity = float
    PositiveInt = int
else:
    try:
        from jsonargparse.typing import PositiveInt, restricted_number_type
    except ImportError:  # the core package does not need jsonargparse
        Sparsity, PositiveInt = float, int
    else:
        Sparsity = restricted_number_type(
            "Sparsity", float, [(">=", 0.0), ("<", 1.0)], docstring="fraction of weights set to zero, in [0, 1)"
        )
