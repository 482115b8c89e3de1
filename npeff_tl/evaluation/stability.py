"""Split-half stability: a label-free score for choosing NPEFF's settings on the training examples.

The same solver is fitted to two random halves of the training PEFs; every training example then gets coefficients
under both fits, and the two fits' components are paired one to one by the correlation of those coefficients
(Hungarian). A setting whose components are structure of the data, rather than of one sample of it, is found again
from the other half and scores near 1. No labels enter, so a setting chosen by it carries no oracle advantage.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..decomp import DNPEFF, LRMNPEFF, Decomposition
from ..pefs.containers import PEFs
from .matching import match_coefficients, matched_cosines


@dataclasses.dataclass(frozen=True)
class SplitHalfStability:
    """How alike two fits to disjoint halves of the same examples are.

    Attributes:
        coefficient_correlation: mean Pearson correlation of the paired components' coefficients over all
            examples (the score: which examples a component claims, as purity and AMI read it).
        component_cosine: mean |cosine| of the paired components' parameter-space vectors.
        correlations: the paired correlations, best first.
    """

    coefficient_correlation: float
    component_cosine: float
    correlations: tuple[float, ...]


def split_half_stability(
    solver: DNPEFF | LRMNPEFF, pefs: PEFs, *, seed: int = 0, progress: bool = False
) -> SplitHalfStability:
    """Fit ``solver`` to two random halves of ``pefs`` (drawn with ``seed``) and compare the fits."""
    if len(pefs) < 4:
        raise ValueError(f"split_half_stability needs at least 4 examples to split in two, got {len(pefs)}")
    order = torch.randperm(len(pefs), generator=torch.Generator().manual_seed(seed))
    halves = order[: len(pefs) // 2].sort().values, order[len(pefs) // 2:].sort().values
    first, second = (solver.fit(pefs.subset(half), progress=progress) for half in halves)
    coefficients = [fit.fit_coefficients(pefs, progress=progress) for fit in (first, second)]
    _, _, correlations = match_coefficients(*coefficients)
    cosines = matched_cosines(*_on_shared_columns(first, second))[2]
    return SplitHalfStability(coefficient_correlation=sum(correlations) / len(correlations),
                              component_cosine=float(cosines.mean()), correlations=tuple(correlations))


def _on_shared_columns(a: Decomposition, b: Decomposition) -> tuple[Tensor, Tensor]:
    """Both fits' components over the union of their kept columns (a fit drops the columns its half never uses)."""
    columns = torch.cat([a.kept_columns, b.kept_columns]).unique()  # sorted

    def spread(fit: Decomposition) -> Tensor:
        out = torch.zeros(fit.n_components, len(columns), dtype=torch.float64)
        out[:, torch.searchsorted(columns, fit.kept_columns.cpu())] = fit.components.double().cpu()
        return out
    return spread(a), spread(b)
