"""Matching the components of two dictionaries (Hungarian assignment on |cosine|)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def matched_cosines(a: Float[Tensor, "r m"], b: Float[Tensor, "s m"]) -> tuple[Tensor, Tensor, Tensor]:
    """The one-to-one pairing of rows of ``a`` and ``b`` that maximises the total |cosine|:
    (rows of a, rows of b, their |cosines|), min(r, s) pairs."""
    from scipy.optimize import linear_sum_assignment

    a = a.double() / torch.linalg.vector_norm(a.double(), dim=1, keepdim=True).clamp(min=1e-300)
    b = b.double() / torch.linalg.vector_norm(b.double(), dim=1, keepdim=True).clamp(min=1e-300)
    cosines = (a @ b.T).abs().cpu()
    rows, cols = linear_sum_assignment(cosines.numpy(), maximize=True)
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    return rows, cols, cosines[rows, cols]
