"""The sparse matrix NPEFF factors: normalised PEFs restricted to the parameters (columns) worth keeping.

Preprocessing follows the reference (docs/algorithms.md, "Preprocessing"): every example is divided by its
dense PEF's norm (unit weight in the Frobenius objective), and columns that appear in fewer than
``min_nnz_per_column`` rows are dropped; the kept-column map goes with every decomposition. For low-rank PEFs,
each (example, class) is a row and the constant term of the loss, sum_i ||U_i^T U_i||_F^2, is computed exactly
in float64 (the reference overcounts it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Float64, Int64
from torch import Tensor

from .. import distributed
from ..params import ParamSpace
from ..pefs import DiagonalPEFs, LowRankPEFs, PEFs
from ..pefs.containers import ORIGIN_KEYS
from ..pefs.sparse import sorted_csr
from ..provenance import tensor_fingerprint

BLOCK_COLUMNS = 8192  # the widest block of A on CPU: a block's rows of the dense factor stay in cache
TARGET_BLOCKS = 64  # blocks per matrix, so up to this many ranks share it (fewer blocks under 1,024 columns)


def block_width(n_columns: int, device: torch.device) -> int:
    """Columns per block of A: a function of the matrix and the device type, never of the number of ranks,
    so that every split of the columns over ranks is a split of the same blocks. A multiple of 16, so that a
    block's rows of a float32 factor in 64-byte aligned storage start 64-byte aligned on every rank (BLAS
    results can depend on alignment). On GPUs, no cap on the width (no cache to fit)."""
    width = 16 * -(-n_columns // (16 * TARGET_BLOCKS))
    return min(BLOCK_COLUMNS, width) if device.type == "cpu" else width


@dataclass(frozen=True)
class PEFMatrix:
    """Normalised PEFs as a sparse matrix A [rows, kept columns] plus what the decompositions need to know.

    A is held twice: as CSR blocks of consecutive columns (for A @ X: each block touches a cache-sized slice
    of X, ~4x faster on CPU than one CSR) and as one CSR of its transpose (for A^T @ Y).

    Under torch.distributed (``prepare(..., shard_columns=True)``), each rank holds the kept columns
    ``shard`` (whole blocks, balanced by non-zeros) and the factors' matching rows; ``times`` and ``gram``
    all-reduce their partial sums, so every rank gets the full products; ``t_times`` stays local. The blocks
    do not depend on the number of ranks, and the products add the blocks' shares in float64 and round once,
    so they come out the same (bar a rounding tie) however the blocks are split: iterative fits that amplify
    the last bit (LRM-NPEFF's accept/reject steps) follow the same path in any number of processes."""

    blocks: tuple[tuple[int, Tensor], ...]  # (first local column, CSR [rows, block width])
    At: Float[Tensor, "m_local rows"]
    row_example: Int64[Tensor, " rows"]  # the example of each row (rows = examples for diagonal PEFs)
    n_examples: int
    kept_columns: Int64[Tensor, " m"]  # indices into the ParamSpace (all ranks' columns)
    constant: float  # ||A||_F^2 (diagonal) or sum_i ||U_i^T U_i||_F^2 (low-rank), float64, over all columns
    kind: str  # "diagonal" or "lowrank"
    space: ParamSpace
    metadata: dict[str, Any]
    empty_examples: tuple[int, ...]  # zero-norm examples: all-zero rows, coefficients 0
    shard: tuple[int, int]  # this rank's range of kept columns (all of them in one process)
    sharded: bool = False  # columns split over the ranks of torch.distributed: products are all-reduced

    @property
    def n_columns(self) -> int:
        return int(self.kept_columns.shape[0])

    def local_columns(self, C: Float[Tensor, "r m"]) -> Float[Tensor, "r m_local"]:
        """This rank's columns of a [r, all kept columns] factor."""
        return C[:, self.shard[0] : self.shard[1]]

    def all_columns(self, C: Float[Tensor, "r m_local"]) -> Float[Tensor, "r m"]:
        """The full factor from every rank's columns (contiguous either way: reductions over a row then run in
        the same order in any number of processes)."""
        return distributed.all_gather_rows(C.T.contiguous()).T.contiguous() if self.sharded else C.contiguous()

    def gram(self, Xt: Float[Tensor, "m_local r"]) -> Float[Tensor, "r r"]:
        """X X^T for a factor held transposed, summed over the ranks' columns (the blocks' shares in float64)."""
        out = torch.zeros(Xt.shape[1], Xt.shape[1], dtype=torch.float64, device=Xt.device)
        for start, block in self.blocks:
            part = Xt[start : start + block.shape[1]]
            out += part.T @ part
        return self.sum(out).to(Xt.dtype)

    def inner(self, Xt: Float[Tensor, "m_local r"], Yt: Float[Tensor, "m_local r"]) -> float:
        """<X, Y> of two factors held transposed, summed over the ranks' columns: block by block in float64, so
        no float64 copy of a whole factor is made (at 85M columns and 32 components that copy is 22 GB)."""
        out = torch.zeros((), dtype=torch.float64, device=Xt.device)
        for start, block in self.blocks:
            stop = start + block.shape[1]
            out += (Xt[start:stop].double() * Yt[start:stop].double()).sum()
        return float(self.sum(out))

    def total(self) -> float:
        """The sum of all entries of A, float64."""
        return float(self.sum(self.values.double().sum()))

    def sum(self, partial: Tensor) -> Tensor:
        """A partial sum over this rank's columns, summed over the ranks (itself when not sharded)."""
        return distributed.all_reduce_sum(partial) if self.sharded else partial

    @property
    def n_rows(self) -> int:
        return int(self.row_example.shape[0])

    @property
    def values(self) -> Tensor:
        return self.At.values()

    @property
    def fit_metadata(self) -> dict[str, Any]:
        """The PEF metadata a decomposition keeps, to check later PEFs against."""
        return {key: self.metadata.get(key) for key in ORIGIN_KEYS}

    def example_sums(self, per_row: Float[Tensor, "rows r"]) -> Float[Tensor, "n r"]:
        """Sum the rows of each example (the identity for diagonal PEFs: one row per example)."""
        out = torch.zeros(self.n_examples, per_row.shape[1], dtype=per_row.dtype, device=per_row.device)
        return out.index_add_(0, self.row_example, per_row)

    def times(self, X: Float[Tensor, "m_local r"]) -> Float[Tensor, "rows r"]:
        """A @ X (X: this rank's rows of the factor; the blocks' products added in float64, over ranks too)."""
        out = torch.zeros(self.n_rows, X.shape[1], dtype=torch.float64, device=X.device)
        for start, block in self.blocks:
            out += block @ X[start : start + block.shape[1]]
        return self.sum(out).to(X.dtype)

    def t_times(self, Y: Float[Tensor, "rows r"]) -> Float[Tensor, "m_local r"]:
        """A^T @ Y (this rank's columns)."""
        return self.At @ Y

    def to_dense(self) -> Float[Tensor, "rows m"]:
        return self.At.to_dense().T

    def check_init(self, init: tuple[Tensor, Tensor], rank: int, name: str) -> tuple[Tensor, Tensor]:
        """A user's starting (W, components over all kept columns), checked against this matrix and copied to
        its device and dtype."""
        W, C = init
        want = ((self.n_examples, rank), (rank, self.n_columns))
        if (tuple(W.shape), tuple(C.shape)) != want:
            raise ValueError(f"init must be (W {list(want[0])}, {name} {list(want[1])} over the kept columns), "
                             f"got {list(W.shape)} and {list(C.shape)}")
        return W.clone().to(self.values), C.clone().to(self.values)

    def fingerprint(self) -> str:
        """A sha256 of the matrix (this rank's columns) and its kept columns (checkpoints refuse to resume on
        other data)."""
        return tensor_fingerprint([self.At.crow_indices(), self.At.col_indices(), self.At.values(), self.kept_columns,
                                   torch.tensor(self.shard)])


def prepare(
    pefs: PEFs,
    *,
    min_nnz_per_column: int = 1,
    columns: Int64[Tensor, " m"] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    shard_columns: bool = False,
) -> PEFMatrix:
    """Normalise ``pefs`` and assemble the matrix; ``columns`` keeps exactly those columns (a decomposition's),
    otherwise columns with fewer than ``min_nnz_per_column`` entries are dropped. With ``shard_columns`` under
    torch.distributed, this rank keeps only its share of the kept columns (balanced by non-zeros)."""
    if not isinstance(pefs, (DiagonalPEFs, LowRankPEFs)):
        raise TypeError(f"expected DiagonalPEFs or LowRankPEFs, got {type(pefs).__name__}")
    bad = (~torch.isfinite(pefs.values).all(1)) | (~torch.isfinite(pefs.norms))
    if bad.any():
        raise ValueError(f"PEFs of examples {bad.nonzero().flatten().tolist()[:10]} contain NaN or inf values")
    empty = tuple((pefs.norms <= 0).nonzero().flatten().tolist())
    if empty:
        warnings.warn(f"examples {list(empty[:20])} have zero-norm PEFs; they are left out (coefficients 0)", stacklevel=2)
    normed = pefs if pefs.is_normalized else pefs.normalized()
    rows, cols, values, row_offsets = normed.entries()  # in storage order: the CSR builders below sort them
    n_rows, n_examples, size, metadata = int(row_offsets[-1]), len(normed), normed.space.size, normed.metadata
    del normed  # its values live on in ``values`` only until the filtering below replaces them
    if empty:
        values = values.masked_fill(torch.isin(rows, _rows_of(torch.tensor(empty), row_offsets)), 0.0)
    if columns is None:
        if min_nnz_per_column < 1:
            raise ValueError(f"min_nnz_per_column must be >= 1, got {min_nnz_per_column}")
        kept = _columns_used(cols[values != 0], size, min_nnz_per_column)
    else:
        kept = torch.as_tensor(columns, dtype=torch.long)
        if kept.numel() and (kept.min() < 0 or kept.max() >= size or (kept.diff() <= 0).any()):
            raise ValueError(f"columns must be increasing indices in [0, {size})")
    if kept.numel() == 0:
        raise ValueError(f"no parameter appears in {min_nnz_per_column} or more examples; lower min_nnz_per_column")
    m = int(kept.numel())
    width = block_width(m, torch.device(device))
    position, keep = _positions_among(kept, cols, size)
    shard, sharded = (0, m), shard_columns and distributed.active()
    if sharded:  # whole blocks per rank, balanced by their entries
        per_block = torch.bincount(position[keep] // width, minlength=-(-m // width))
        first, last = distributed.balanced_ranges(per_block, distributed.world_size())[distributed.rank()]
        shard = (first * width, min(last * width, m))
        keep &= (position >= shard[0]) & (position < shard[1])
    rows, cols, values = rows[keep], position[keep] - shard[0], values[keep]
    del keep, position
    shape = (n_rows, shard[1] - shard[0])
    row_example = torch.arange(n_examples).repeat_interleave(row_offsets.diff())
    if pefs.kind == "diagonal":
        constant = values.double().square().sum()
        constant = float(distributed.all_reduce_sum(constant) if sharded else constant)
    else:  # ||U_i^T U_i||^2 needs the whole class x class Gram matrices: their column shares are summed first
        grams = _example_grams(rows, cols, values, row_example, row_offsets, n_examples)
        constant = float((distributed.all_reduce_sum(grams) if sharded else grams).square().sum())
    to = {"device": device, "dtype": dtype}
    blocks = _column_blocks(rows, cols, values, shape, width, to)
    return PEFMatrix(
        blocks=blocks,
        At=sorted_csr(cols, rows, values, (shape[1], shape[0])).to(**to),
        row_example=row_example.to(device),
        n_examples=n_examples,
        kept_columns=kept,
        constant=constant,
        kind=pefs.kind,
        space=pefs.space,
        metadata=metadata,
        empty_examples=empty,
        shard=shard,
        sharded=sharded,
    )


def _column_blocks(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int], width: int,
                   to: dict) -> tuple[tuple[int, Tensor], ...]:
    """CSR blocks of ``width`` consecutive columns (their entries grouped with one stable sort)."""
    block_of = cols // width
    order = torch.argsort(block_of, stable=True)
    counts = torch.bincount(block_of, minlength=-(-shape[1] // width)).tolist()
    del block_of
    blocks = []
    for j, (r, c, v) in enumerate(zip(*(t[order].split(counts) for t in (rows, cols, values)))):
        start = j * width
        blocks.append((start, sorted_csr(r, c - start, v, (shape[0], min(width, shape[1] - start))).to(**to)))
    return tuple(blocks)


def _rows_of(examples: Tensor, row_offsets: Tensor) -> Tensor:
    return torch.cat([torch.arange(row_offsets[e], row_offsets[e + 1]) for e in examples.tolist()])


GRAM_CHUNK_BYTES = 32 << 20  # the float64 outer products of one chunk of entries


# Columns are counted and renumbered through arrays as long as the space only where the space is no longer than
# the entries; otherwise by sorting and searching the entries (at GPT-2-small size the space has 85M parameters,
# 40 examples 2.6M entries, and the arrays took 1.4 GB). Either way the memory follows the entries.
def _columns_used(cols: Tensor, size: int, at_least: int) -> Tensor:
    """The columns named by at least ``at_least`` entries of ``cols``, increasing."""
    if size <= len(cols):
        return (torch.bincount(cols, minlength=size) >= at_least).nonzero().flatten()
    present, counts = torch.unique(cols, return_counts=True)
    return present[counts >= at_least]


def count_columns(pefs: PEFs) -> int:
    """How many parameters the PEFs' stored entries name: the most columns a fit keeps (memory estimates)."""
    return int(_columns_used(pefs.indices.flatten().long(), pefs.space.size, 1).numel())


def _positions_among(kept: Tensor, cols: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Each entry's position among the increasing ``kept`` columns (0 where it is not kept), and whether it is."""
    if size <= len(cols):
        index = torch.full((size,), -1, dtype=torch.long)
        index[kept] = torch.arange(len(kept))
        position = index[cols]
        keep = position >= 0
        return position.clamp_(min=0), keep
    position = torch.searchsorted(kept, cols).clamp_(max=len(kept) - 1)
    return position, kept[position] == cols


def gram_chunk_entries(classes: int) -> int:
    """Entries per chunk of the class x class Gram computation (at least one whole example per chunk)."""
    return max(1024, GRAM_CHUNK_BYTES // max(1, classes * classes * 8))


def _example_grams(
    rows: Tensor, cols: Tensor, values: Tensor, row_example: Tensor, row_offsets: Tensor, n_examples: int,
) -> Float64[Tensor, "n k k"]:
    """U_i^T U_i per example i (class x class, float64), where U_i has the rows of example i: the products of
    the entries that share (example, column), accumulated per example. Entries come example by example (the
    PEFs' order); they are taken in chunks of whole examples whose outer products fill about GRAM_CHUNK_BYTES,
    so the temporary memory follows the chunk, not the matrix."""
    example = row_example[rows]
    if len(example) > 1 and bool((example.diff() < 0).any()):
        raise ValueError("the entries must come example by example")
    rank = int(row_offsets.diff().max()) if len(row_offsets) > 1 else 0
    chunk_entries = gram_chunk_entries(rank)
    n_cols = int(cols.max()) + 1 if cols.numel() else 1
    grams = torch.zeros(n_examples, rank, rank, dtype=torch.float64)
    start = 0
    while start < len(example):
        stop = min(start + chunk_entries, len(example))
        if stop < len(example):  # end the chunk with a whole example
            stop = int(torch.searchsorted(example, example[stop - 1], right=True))
        first = int(example[start])
        chunk_example = example[start:stop]
        keys, slot = torch.unique((chunk_example - first) * n_cols + cols[start:stop], return_inverse=True)
        cls = rows[start:stop] - row_offsets[chunk_example]
        z = torch.zeros(len(keys), rank, dtype=torch.float64)
        z.index_put_((slot, cls), values[start:stop].double(), accumulate=True)  # per (example, column)
        grams.index_add_(0, keys // n_cols + first, z[:, :, None] * z[:, None, :])
        start = stop
    return grams
