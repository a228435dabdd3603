"""The built-in pruning criteria, one file each, registered under their names when this package is imported."""

from lightning_snip.criteria.force import FORCE
from lightning_snip.criteria.grasp import GraSP
from lightning_snip.criteria.iterative_snip import IterativeSNIP
from lightning_snip.criteria.magnitude import Magnitude
from lightning_snip.criteria.random import Random
from lightning_snip.criteria.snip import SNIP
from lightning_snip.criteria.synflow import SynFlow

__all__ = ["FORCE", "SNIP", "GraSP", "IterativeSNIP", "Magnitude", "Random", "SynFlow"]
