"""NPEFF decompositions of PEFs: D-NPEFF (non-negative diagonals) and LRM-NPEFF (rank-1 directions)."""

from .decomposition import Decomposition, load_decomposition
from .dnpeff import DNPEFF
from .lrm import LRMNPEFF
from .matrix import PEFMatrix, prepare
from .solver import ConvergenceWarning
from .variants import VARIANTS, Variant, variant

__all__ = ["ConvergenceWarning", "DNPEFF", "LRMNPEFF", "Decomposition", "PEFMatrix", "load_decomposition", "prepare", "VARIANTS", "Variant", "variant"]
