"""The NPEFF variants, one object each: the method name configs, run directories and result rows use, the
display name, the kind of PEF it factors (which also says whether a component is a diagonal or a direction)
and its solver. ``variant(name)`` finds one by method name ("dnpeff", "lrm_npeff") or by the kind of PEF its
decompositions record ("diagonal", "lowrank"); another variant is one more object here."""

from __future__ import annotations

from dataclasses import dataclass

from ..pefs.kinds import DIAGONAL, LOWRANK, PEFKind
from .dnpeff import DNPEFF
from .lrm import LRMNPEFF


@dataclass(frozen=True)
class Variant:
    """One NPEFF variant (see the module docstring)."""

    name: str  # method name: configs, run directories, result rows
    display: str
    pefs: PEFKind  # the PEFs it factors; its decompositions record this kind
    solver: type  # its settings dataclass, whose fit(pefs) returns a Decomposition

    @property
    def rank_one(self) -> bool:
        """Components are directions g_j (pseudo-Fisher g_j g_j^T), not diagonals h_j."""
        return self.pefs.rank_one


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("dnpeff", "D-NPEFF", DIAGONAL, DNPEFF),
    Variant("lrm_npeff", "LRM-NPEFF", LOWRANK, LRMNPEFF),
)}


def variant(name: str) -> Variant:
    """The variant with method name ``name`` or whose decompositions record the PEF kind ``name``."""
    for v in VARIANTS.values():
        if name in (v.name, v.pefs.name):
            return v
    raise ValueError(f"unknown NPEFF method {name!r}; choose from {', '.join(VARIANTS)}")
