"""Exact per-row top-k over a row that arrives in pieces (one parameter tensor at a time).

``torch.topk`` on a multi-million-entry row costs far more than reading it, so large pieces are first cut
down by a threshold: the k-th best key kept so far (nothing at or below it can enter), or, when that is
not yet known or too low, an estimate from a fixed random sample of the piece, checked on the spot: a row
whose estimate leaves fewer than k entries above it gets an exact ``topk`` instead. Either way the result
is the exact top-k; the sample only decides how much work it takes.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

_SAMPLE_FRACTION = 32  # one entry in 32 estimates a piece's threshold
_MARGIN = 1.5  # aim for 1.5 k entries above the estimate (its error is a few percent)


class StreamingTopK:
    """The ``k`` entries of largest ``key(value)`` (>= 0) per row of ``total`` columns, over pieces added
    with their column offsets."""

    def __init__(self, rows: int, k: int, total: int, key=lambda values: values):
        if k > total:
            raise ValueError(f"cannot keep {k} of {total} entries")
        self.rows, self.k, self.total, self.key = rows, k, total, key
        self._dense: Tensor | None = None  # with k == total: the whole row, filled in place
        self._keys: list[Tensor] = []
        self._values: list[Tensor] = []
        self._indices: list[Tensor] = []
        self._width = 0  # columns held in the lists above
        self._floor: Tensor | None = None  # [rows] k-th best key so far (-inf while fewer than k are held)

    def add(self, values: Float[Tensor, "rows n"], offset: int) -> None:
        """Offer the entries of ``values`` (not kept: its memory may be reused); their column in the full row
        is ``offset`` + their column here."""
        n = values.shape[1]
        if self.k == self.total:  # everything is kept: no selection, only the final sort
            if self._dense is None:
                self._dense = torch.zeros(self.rows, self.total, dtype=values.dtype, device=values.device)
            self._dense[:, offset : offset + n] = values
            return
        keys = self.key(values)
        if n <= 4 * self.k:  # small piece: keep what could matter
            chosen = keys.topk(self.k, dim=1, sorted=False).indices if n > self.k else None
            valid = None
        else:
            chosen, valid = self._above_threshold(keys)
        if chosen is None:  # copies: the caller may reuse the memory of ``values``
            values = values.clone()
            self._hold(self.key(values), values, torch.arange(n, device=values.device).expand(self.rows, n) + offset)
        elif valid is None:
            self._hold(keys.gather(1, chosen), values.gather(1, chosen), chosen + offset)
        else:
            self._hold(keys.gather(1, chosen).masked_fill_(~valid, -math.inf), values.gather(1, chosen), chosen + offset)
        if self._width > 2 * self.k:
            self._compact()

    def result(self) -> tuple[Float[Tensor, "rows k"], Int[Tensor, "rows k"]]:
        """(values, column indices), sorted by descending key."""
        if self._dense is not None:
            order = _descending(self.key(self._dense))
            return self._dense.gather(1, order), order
        self._compact()
        order = _descending(self._keys[0])
        return self._values[0].gather(1, order), self._indices[0].gather(1, order)

    def _above_threshold(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Columns of each row above the row's threshold, padded to a common width, and which are real."""
        n = keys.shape[1]
        sample = torch.randint(n, (n // _SAMPLE_FRACTION,), generator=torch.Generator().manual_seed(n))
        rank = math.ceil(_MARGIN * self.k / _SAMPLE_FRACTION)
        estimate = keys[:, sample.to(keys.device)].topk(rank, dim=1, sorted=False).values.amin(1)
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


def _descending(keys: Float[Tensor, "rows n"]) -> Int[Tensor, "rows n"]:
    """The order that sorts each row by descending key (keys >= 0).

    Float32 and narrower: per row, a radix sort of the int32 codes 0x7FFFFFFF - bits (the bits of
    non-negative floats order like the floats), several times faster than a comparison sort.
    """
    if keys.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return keys.sort(dim=1, descending=True, stable=True).indices
    codes = 0x7FFFFFFF - keys.float().view(torch.int32)
    return torch.stack([row.sort(stable=True).indices for row in codes]) if len(codes) else codes.long()
