"""The sparse layouts PEF rows are stored and assembled in: CSR matrices with sorted columns, and low-rank rows
(entries chosen jointly over classes x parameters, kept in (class, parameter) order with per-class offsets)."""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float, Float64
from torch import Tensor


def sorted_csr(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix from per-entry (row, col, value), columns sorted within each row."""
    order = torch.argsort(rows * shape[1] + cols)
    rows, cols, values = rows[order], cols[order], values[order]
    crow = torch.zeros(shape[0] + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():  # torch flags sparse CSR as beta on every construction
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values, size=shape, check_invariants=False)


def sparsify_lowrank(factors: Float[Tensor, "b k size"], nnz: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``nnz`` |entries| of each example's factor jointly over classes x parameters, in (class, parameter)
    order: (values [b, nnz], parameter indices [b, nnz], col_offsets [b, k + 1])."""
    b, k, size = factors.shape
    flat = factors.reshape(b, k * size)
    chosen = flat.abs().topk(nnz, dim=1).indices  # flat index = class * size + parameter
    return lowrank_rows(flat.gather(1, chosen), chosen, size, k)


def lowrank_rows(values: Tensor, joint: Tensor, size: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stored layout of chosen low-rank entries given by joint index class * size + parameter: sorted in
    (class, parameter) order, as (values, parameter indices, col_offsets [b, k + 1])."""
    joint, order = joint.sort(dim=1)
    values = values.gather(1, order)
    col_offsets = torch.zeros(joint.shape[0], k + 1, dtype=torch.long, device=joint.device)
    classes = joint // size
    col_offsets[:, 1:] = torch.zeros_like(col_offsets[:, 1:]).scatter_add_(1, classes, torch.ones_like(classes)).cumsum(1)
    return values, joint % size, col_offsets


def lowrank_gram(factors: Float[Tensor, "b k size"], chunk: int = 1 << 14) -> Float64[Tensor, "b k k"]:
    """The k x k Gram matrices U^T U (classes x classes): products over chunks of ``chunk`` columns in the
    factors' dtype, added in float64 (float64 accuracy up to the chunk products' rounding, ~1e-6 relative in
    float32; converting the factors to float64 first cost a third of LRM-PEF time at GPT-2 width).
    ||U U^T||_F = ||U^T U||_F, so the PEF's norm never needs the size x size matrix."""
    b, k, size = factors.shape
    gram = torch.zeros(b, k, k, dtype=torch.float64, device=factors.device)
    for start in range(0, size, chunk):
        block = factors[..., start : start + chunk]
        gram += (block @ block.mT).double()
    return gram
