"""Exact per-row top-k over a row that arrives in pieces (one parameter tensor at a time), and the case where
nothing is to be dropped.

``torch.topk`` on a multi-million-entry row costs far more than reading it, so large pieces are first cut
down by a threshold: the k-th best key kept so far (nothing at or below it can enter), or, when that is
not yet known or too low, an estimate from a fixed random sample of the piece, checked on the spot: a row
whose estimate leaves fewer than k entries above it gets an exact ``topk`` instead. Either way the result
is the exact top-k; the sample only decides how much work it takes.

When k is the whole row, ``row_selection`` gives ``AllColumns`` instead: the row in column order, no selection
and no sort (sorting a whole GPT-2-width row cost twice the gradients' time and as much memory again).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .workspace import Workspace

_SAMPLE_FRACTION = 32  # one entry in 32 estimates a piece's threshold
_MARGIN = 1.5  # aim for 1.5 k entries above the estimate (its error is a few percent)


def _sample_rank(k: int) -> int:
    """The rank in a piece's sample whose key estimates the piece's threshold for keeping k."""
    return math.ceil(_MARGIN * k / _SAMPLE_FRACTION)


def _sample_columns(n: int) -> Int[Tensor, " s"]:
    """The fixed random sample (one column in ``_SAMPLE_FRACTION``, sorted) that estimates a piece's threshold."""
    return torch.randint(n, (n // _SAMPLE_FRACTION,), generator=torch.Generator().manual_seed(n)).sort().values


def row_selection(rows: int, k: int, total: int, key=None, workspace: Workspace | None = None):
    """What keeps ``k`` of ``total`` columns per row: ``AllColumns`` (column order) when k == total, else
    ``StreamingTopK`` (descending key, which refuses k > total)."""
    return AllColumns(rows, total, workspace) if k == total else StreamingTopK(rows, k, total, key)


class AllColumns:
    """Every column of each row, in column order, from pieces added with their column offsets. The row lives in
    a buffer of ``workspace`` (reused from batch to batch): the result is valid until the next ``AllColumns`` on
    that workspace."""

    def __init__(self, rows: int, total: int, workspace: Workspace | None = None):
        self.rows, self.total = rows, total
        self._workspace = workspace or Workspace()
        self._row: Tensor | None = None
        self._filled = 0

    def add(self, values: Float[Tensor, "rows n"], offset: int) -> None:
        """Copy ``values`` to columns ``offset`` onwards (``values`` is not kept)."""
        if self._row is None:
            self._row = self._workspace.get("all columns", (self.rows, self.total), values.dtype, values.device)
        self._row[:, offset : offset + values.shape[1]] = values
        self._filled += values.shape[1]

    def add_group(self, values: Float[Tensor, "rows g n"], offsets: list[int], bound=None) -> None:
        """Copy ``g`` pieces of one width to their column offsets (``StreamingTopK.add_group``'s call; nothing is
        selected here, so the bound is not needed)."""
        for c, offset in enumerate(offsets):
            self.add(values[:, c], offset)

    def result(self) -> tuple[Float[Tensor, "rows total"], Int[Tensor, "rows total"]]:
        """(values, column indices), in column order."""
        if self._filled != self.total:
            raise RuntimeError(f"keeping all {self.total} columns, but {self._filled} were added")
        return self._row, torch.arange(self.total, device=self._row.device).expand(self.rows, -1)


class StreamingTopK:
    """The ``k`` entries of largest ``key(value)`` (>= 0) per row of ``total`` columns, over pieces added
    with their column offsets. ``key=None``: the values themselves (then they must be >= 0)."""

    def __init__(self, rows: int, k: int, total: int, key=None):
        if k > total:
            raise ValueError(f"cannot keep {k} of {total} entries")
        self.rows, self.k, self.total = rows, k, total
        self.key = key or (lambda values: values)
        self._values_are_keys = key is None
        self._keys: list[Tensor] = []
        self._values: list[Tensor] = []
        self._indices: list[Tensor] = []
        self._width = 0  # columns held in the lists above
        self._floor: Tensor | None = None  # [rows] k-th best key so far (-inf while fewer than k are held)

    def add(self, values: Float[Tensor, "rows n"], offset: int) -> None:
        """Offer the entries of ``values`` (not kept: its memory may be reused); their column in the full row
        is ``offset`` + their column here."""
        n = values.shape[1]
        keys = self.key(values)
        if n <= 4 * self.k or n // _SAMPLE_FRACTION < _sample_rank(self.k):  # small piece: keep what could matter
            chosen = keys.topk(self.k, dim=1, sorted=False).indices if n > self.k else None
            valid = None
        else:
            chosen, valid = self._above_threshold(keys)
        if chosen is None:  # copies: the caller may reuse the memory of ``values``
            values = values.clone()
            self._hold(self.key(values), values, torch.arange(n, device=values.device).expand(self.rows, n) + offset)
        else:
            chosen_values = values.gather(1, chosen)
            chosen_keys = chosen_values.clone() if self._values_are_keys else keys.gather(1, chosen)
            if valid is not None:
                chosen_keys.masked_fill_(~valid, -math.inf)
            self._hold(chosen_keys, chosen_values, chosen + offset)
        if self._width > 2 * self.k:
            self._compact()

    def add_group(self, values: Float[Tensor, "rows g n"], offsets: list[int], bound: Float[Tensor, "rows n"]) -> None:
        """Offer ``g`` pieces of one width at once (piece c at column offset ``offsets[c]``) whose keys are bounded
        by ``bound``: key(values[:, c, j])^2 <= bound[:, j] for every c (LRM-PEFs: |u_c|^2 <= sum_c u_c^2). One
        threshold pass over the bound finds the candidates of all g pieces, instead of one key and one threshold
        pass per piece; the result is the same exact top-k."""
        rows, g, n = values.shape
        if g * n <= 4 * self.k or g * (n // _SAMPLE_FRACTION) < _sample_rank(self.k):
            for c in range(g):
                self.add(values[:, c], offsets[c])
            return
        sample = _sample_columns(n).to(values.device)
        sampled = torch.cat([values[:, c].index_select(1, sample) for c in range(g)], dim=1)  # piece by piece: the
        # pieces may be strided views (class-major buffers), where one index_select over the group is 5x slower
        estimate = self.key(sampled).topk(_sample_rank(self.k), dim=1, sorted=False).values.amin(1)
        floor = self._floor if self._floor is not None else torch.full_like(estimate, -math.inf)
        picked = []
        for row in range(rows):
            piece, column = self._group_hits(values[row], bound[row], torch.maximum(estimate[row], floor[row]))
            if len(piece) < self.k and estimate[row] > floor[row]:  # the estimate was too high for this row
                piece, column = self._group_hits(values[row], bound[row], floor[row])
                if len(piece) > self.k:
                    top = self.key(values[row, piece, column]).topk(self.k, sorted=False).indices
                    piece, column = piece[top], column[top]
            picked.append((piece, column))
        width = max(len(piece) for piece, _ in picked)
        kept = torch.zeros(rows, width, dtype=values.dtype, device=values.device)
        keys = torch.full((rows, width), -math.inf, dtype=values.dtype, device=values.device)
        indices = torch.zeros(rows, width, dtype=torch.long, device=values.device)
        starts = torch.as_tensor(offsets, device=values.device)
        for row, (piece, column) in enumerate(picked):
            chosen = values[row, piece, column]
            kept[row, : len(chosen)], keys[row, : len(chosen)] = chosen, self.key(chosen)
            indices[row, : len(chosen)] = starts[piece] + column
        self._hold(keys, kept, indices)
        if self._width > 2 * self.k:
            self._compact()

    def _group_hits(self, values: Float[Tensor, "g n"], bound: Float[Tensor, " n"], threshold: Tensor
                    ) -> tuple[Int[Tensor, " m"], Int[Tensor, " m"]]:
        """(piece, column) of the entries of key > ``threshold``: candidates from the bound first (key > t implies
        bound >= t^2, rounding included: squares and sums of non-negative numbers round monotonically; the
        margin only adds candidates), then the exact key test on them."""
        if threshold > 0:
            candidates = (bound >= threshold.to(bound.dtype).square() * (1 - 1e-5)).nonzero().squeeze(1)
        else:
            candidates = torch.arange(values.shape[1], device=values.device)
        piece, at = (self.key(values[:, candidates]) > threshold).nonzero(as_tuple=True)
        return piece, candidates[at]

    def result(self) -> tuple[Float[Tensor, "rows k"], Int[Tensor, "rows k"]]:
        """(values, column indices), sorted by descending key."""
        self._compact()
        keys, order = sort_descending(self._keys[0], in_place=True)  # the held keys are this object's own
        return (keys if self._values_are_keys else self._values[0].gather(1, order)), self._indices[0].gather(1, order)

    def _above_threshold(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Columns of each row above the row's threshold, padded to a common width, and which are real."""
        n = keys.shape[1]
        sample = _sample_columns(n)
        rank = _sample_rank(self.k)
        # index_select of sorted columns: twice as fast as keys[:, sample] on CPU
        estimate = keys.index_select(1, sample.to(keys.device)).topk(rank, dim=1, sorted=False).values.amin(1)
        floor = self._floor if self._floor is not None else torch.full_like(estimate, -math.inf)
        columns = []
        for row in range(self.rows):
            hits = (keys[row] > torch.maximum(estimate[row], floor[row])).nonzero().squeeze(1)
            if len(hits) < self.k and estimate[row] > floor[row]:  # the estimate was too high for this row
                hits = (keys[row] > floor[row]).nonzero().squeeze(1)
                if len(hits) > self.k:
                    hits = keys[row].topk(self.k, sorted=False).indices
            columns.append(hits)
        lengths = torch.tensor([len(c) for c in columns], device=keys.device)
        padded = torch.zeros(self.rows, int(lengths.max()), dtype=torch.long, device=keys.device)
        for row, c in enumerate(columns):
            padded[row, : len(c)] = c
        return padded, torch.arange(padded.shape[1], device=keys.device) < lengths[:, None]

    def _hold(self, keys: Tensor, values: Tensor, indices: Tensor) -> None:
        self._keys.append(keys)
        self._values.append(values)
        self._indices.append(indices)
        self._width += keys.shape[1]

    def _compact(self) -> None:
        if len(self._keys) == 1 and self._width <= self.k:
            return
        keys, values, indices = (torch.cat(parts, dim=1) for parts in (self._keys, self._values, self._indices))
        if keys.shape[1] > self.k:
            top = keys.topk(self.k, dim=1, sorted=False).indices
            keys, values, indices = keys.gather(1, top), values.gather(1, top), indices.gather(1, top)
        self._keys, self._values, self._indices = [keys], [values], [indices]
        self._width = keys.shape[1]
        if self._width >= self.k:
            self._floor = keys.amin(1)


def sort_descending(
    keys: Float[Tensor, "rows n"], *, in_place: bool = False
) -> tuple[Float[Tensor, "rows n"], Int[Tensor, "rows n"]]:
    """Each row sorted by descending key (keys >= 0; ties in column order), and the order that does it.
    ``in_place``: ``keys`` may be overwritten (float32 on CPU: it becomes the sorted keys).

    On CPU, float32 and narrower: per row, torch's radix sort (1-D integer tensors only) of the int32 codes
    0x7FFFFFFF - bits = bits ^ 0x7FFFFFFF (the bits of non-negative floats order like the floats), several
    times faster than a comparison sort; the sorted keys are decoded from the sorted codes, so no gather is
    needed. Elsewhere one sort of the whole matrix (on a GPU, a segmented sort of all rows at once).
    """
    if keys.dtype not in (torch.float32, torch.float16, torch.bfloat16) or keys.device.type != "cpu":
        return keys.sort(dim=1, descending=True, stable=True)
    if in_place and keys.dtype == torch.float32:
        codes = keys.view(torch.int32).bitwise_xor_(0x7FFFFFFF)
    else:
        codes = keys.float().view(torch.int32).bitwise_xor(0x7FFFFFFF)
    order = torch.empty(codes.shape, dtype=torch.long, device=codes.device)
    for row in range(len(codes)):
        torch.sort(codes[row], stable=True, out=(codes[row], order[row]))
    return codes.bitwise_xor_(0x7FFFFFFF).view(torch.float32).to(keys.dtype), order
