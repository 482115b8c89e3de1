"""Matching the components of two dictionaries one to one (Hungarian assignment), on the |cosine| of their
parameter-space components or on the correlation of their coefficients over the same examples."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def hungarian(similarity: Float[Tensor, "r s"]) -> tuple[Tensor, Tensor, Tensor]:
    """The one-to-one pairing of rows and columns that maximises the total similarity: (rows, columns, their
    similarities), min(r, s) pairs in row order."""
    from scipy.optimize import linear_sum_assignment

    similarity = similarity.double().cpu()
    rows, cols = linear_sum_assignment(similarity.numpy(), maximize=True)
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    return rows, cols, similarity[rows, cols]


def _unit(x: Tensor, dim: int) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp(min=1e-300)


def matched_cosines(a: Float[Tensor, "r m"], b: Float[Tensor, "s m"]) -> tuple[Tensor, Tensor, Tensor]:
    """The one-to-one pairing of rows of ``a`` and ``b`` that maximises the total |cosine|:
    (rows of a, rows of b, their |cosines|), min(r, s) pairs."""
    return hungarian((_unit(a.double(), 1) @ _unit(b.double(), 1).T).abs())


def match_coefficients(a: Float[Tensor, "n ra"], b: Float[Tensor, "n rb"]) -> tuple[list[int], list[int], list[float]]:
    """Hungarian matching of the components of two dictionaries on the Pearson correlation of their coefficients
    over the same examples: (components of a, matched components of b, correlations), best first."""
    def standardized(x):
        x = torch.as_tensor(x).double()
        return _unit(x - x.mean(0), 0)

    rows, cols, corr = hungarian(standardized(a).T @ standardized(b))
    pairs = sorted(zip(rows.tolist(), cols.tolist(), corr.tolist()), key=lambda p: -p[2])
    return [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]
