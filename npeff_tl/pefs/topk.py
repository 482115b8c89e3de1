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

from .workspace import Workspace

_SAMPLE_FRACTION = 32  # one entry in 32 estimates a piece's threshold
_MARGIN = 1.5  # aim for 1.5 k entries above the estimate (its error is a few percent)


def _sample_rank(k: int) -> int:
    """The rank in a piece's sample whose key estimates the piece's threshold for keeping k."""
    return math.ceil(_MARGIN * k / _SAMPLE_FRACTION)


class StreamingTopK:
    """The ``k`` entries of largest ``key(value)`` (>= 0) per row of ``total`` columns, over pieces added
    with their column offsets. ``key=None``: the values themselves (then they must be >= 0).

    With ``workspace``, keeping everything (k == total) fills and sorts a reused buffer: the result is then
    valid until the next ``StreamingTopK`` on that workspace.
    """

    def __init__(self, rows: int, k: int, total: int, key=None, workspace: Workspace | None = None):
        if k > total:
            raise ValueError(f"cannot keep {k} of {total} entries")
        self.rows, self.k, self.total = rows, k, total
        self.key = key or (lambda values: values)
        self._values_are_keys = key is None
        self._workspace = workspace or Workspace()
        self._dense: Tensor | None = None  # with k == total: the whole row, filled in place
        self._filled = 0
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
                self._dense = self._workspace.get("top-k rows", (self.rows, self.total), values.dtype, values.device)
            self._dense[:, offset : offset + n] = values
            self._filled += n
            return
        keys = self.key(values)
        if n <= 4 * self.k or n // _SAMPLE_FRACTION < _sample_rank(self.k):  # small piece: keep what could matter
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
            if self._filled != self.total:
                raise RuntimeError(f"keeping all {self.total} columns, but {self._filled} were added")
            order = self._workspace.get("top-k order", (self.rows, self.total), torch.long, self._dense.device)
            if self._values_are_keys:
                return sort_descending(self._dense, in_place=True, order=order)
            _, order = sort_descending(self.key(self._dense), in_place=True, order=order)
            return self._dense.gather(1, order), order
        self._compact()
        keys, order = sort_descending(self._keys[0])
        return (keys if self._values_are_keys else self._values[0].gather(1, order)), self._indices[0].gather(1, order)

    def _above_threshold(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Columns of each row above the row's threshold, padded to a common width, and which are real."""
        n = keys.shape[1]
        sample = torch.randint(n, (n // _SAMPLE_FRACTION,), generator=torch.Generator().manual_seed(n))
        rank = _sample_rank(self.k)
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


def sort_descending(
    keys: Float[Tensor, "rows n"], *, in_place: bool = False, order: Int[Tensor, "rows n"] | None = None
) -> tuple[Float[Tensor, "rows n"], Int[Tensor, "rows n"]]:
    """Each row sorted by descending key (keys >= 0; ties in column order), and the order that does it.
    ``in_place``: ``keys`` may be overwritten (float32 on CPU: it becomes the sorted keys); ``order``: where to
    write the order on the radix path below (otherwise a new tensor is returned).

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
    if order is None:
        order = torch.empty(codes.shape, dtype=torch.long, device=codes.device)
    for row in range(len(codes)):
        torch.sort(codes[row], stable=True, out=(codes[row], order[row]))
    return codes.bitwise_xor_(0x7FFFFFFF).view(torch.float32).to(keys.dtype), order
