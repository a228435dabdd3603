"""The built-in pruning criteria, one file each, registered under their names when this package is imported."""

from lightning_snip.criteria.magnitude import Magnitude
from lightning_snip.criteria.random import Random
from lightning_snip.criteria.snip import SNIP

__all__ = ["SNIP", "Magnitude", "Random"]
