"""The kinds of per-example Fisher, one object each: its container, what its ``nnz`` is chosen from, and what
it keeps of a batch's factor columns u_c = sqrt(w_c) grad log p_c while they stream past one parameter tensor
at a time. ``pef_kind(name)`` finds one by the name files store ("diagonal", "lowrank"); another kind is one more
object here, with its container."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from jaxtyping import Float, Float64, Int
from torch import Tensor

from .containers import DiagonalPEFs, LowRankPEFs, PEFs
from .sparse import lowrank_gram, lowrank_rows
from .topk import AllColumns, row_selection
from .workspace import Workspace

class BatchRows(ABC):
    """One batch's stored rows, built from its factor columns as they come, one parameter tensor at a time."""

    @abstractmethod
    def add(self, start: int, factors: Float[Tensor, "b k numel"] | None, diagonal: Float[Tensor, "b numel"]) -> None:
        """The factor columns over parameters [start, start + numel) (None for kinds that do not use them) and
        their D-PEF entries sum_c u_c^2."""

    @abstractmethod
    def rows(self, class_ids: Int[Tensor, "b k"]) -> dict[str, Tensor]:
        """The batch's stored rows (values, indices, norms and what the kind adds); ``class_ids``: the classes
        chosen per example (-1: padding)."""


class PEFKind(ABC):
    """A kind of PEF: its name in files, its container, what nnz counts, and its batch rows."""

    name: ClassVar[str]
    container: ClassVar[type[PEFs]]
    counted: ClassVar[str]  # what nnz entries are chosen from, for error messages
    rank_one: ClassVar[bool]  # an NPEFF component of these PEFs is a direction g (pseudo-Fisher g g^T), not a diagonal
    uses_factors: ClassVar[bool]  # its rows need the factor columns u_c, not only their sum of squares

    def component_diagonal(self, component: Float[Tensor, " size"]) -> Float[Tensor, " size"]:
        """The diagonal of an NPEFF component's pseudo-Fisher (where its Fisher mass sits): h, or g^2."""
        return component.square() if self.rank_one else component

    @abstractmethod
    def choice_size(self, space_size: int, max_classes: int) -> int:
        """How many entries each example's nnz are chosen from."""

    def default_nnz(self, space_size: int, max_classes: int) -> int:
        return min(65536, self.choice_size(space_size, max_classes))

    @abstractmethod
    def batch_rows(self, b: int, k: int, nnz: int, space_size: int, max_classes: int, workspace: Workspace,
                   device: torch.device) -> BatchRows:
        """Rows for a batch of ``b`` examples with ``k`` class slots."""

    def layout(self, keeps_all: bool) -> dict[str, str]:
        """What the stored rows' metadata says about their order (``keeps_all``: nnz is the whole choice)."""
        return {}

    def __repr__(self) -> str:
        return f"PEFKind({self.name!r})"


class Diagonal(PEFKind):
    """D-PEFs: the diagonal f_i = sum_c u_c^2, its nnz largest entries (descending; every entry in parameter
    order when nnz is the whole space), norm ||f_i||."""

    name, container, counted, rank_one, uses_factors = "diagonal", DiagonalPEFs, "parameters", False, False

    def choice_size(self, space_size: int, max_classes: int) -> int:
        return space_size

    def layout(self, keeps_all: bool) -> dict[str, str]:
        return {"row_order": "parameter"} if keeps_all else {}

    def batch_rows(self, b, k, nnz, space_size, max_classes, workspace, device) -> BatchRows:
        return _DiagonalRows(b, nnz, space_size, workspace, device)


class LowRank(PEFKind):
    """LRM-PEFs: the factor U_i itself, its nnz largest |entries| over classes x parameters, norm ||U_i^T U_i||."""

    name, container, counted, rank_one, uses_factors = "lowrank", LowRankPEFs, "classes x parameters", True, True

    def choice_size(self, space_size: int, max_classes: int) -> int:
        return space_size * max_classes

    def batch_rows(self, b, k, nnz, space_size, max_classes, workspace, device) -> BatchRows:
        return _LowRankRows(b, k, nnz, space_size, max_classes, workspace, device)


DIAGONAL, LOWRANK = Diagonal(), LowRank()
PEF_KINDS: dict[str, PEFKind] = {kind.name: kind for kind in (DIAGONAL, LOWRANK)}


def pef_kind(kind: str | PEFKind) -> PEFKind:
    """The kind named ``kind`` (or ``kind`` itself), with a clear error for an unknown name."""
    if isinstance(kind, PEFKind):
        return kind
    if kind not in PEF_KINDS:
        raise ValueError(f"kind must be {' or '.join(repr(k) for k in PEF_KINDS)}, got {kind!r}")
    return PEF_KINDS[kind]


def _by_chunks(x: Float[Tensor, "b n"], chunk: int, partial) -> Float64[Tensor, " b"]:
    """Per row, the float64 sum of ``partial`` (a float64 reduction of the last axis) over chunks of ``chunk``
    entries: the work in the working dtype, the adding up in float64, with no float64 copy of the rows."""
    b, n = x.shape
    whole = n - n % chunk
    return partial(x[:, :whole].view(b, -1, chunk)).sum(-1) + partial(x[:, whole:])


def row_sums(x: Float[Tensor, "b n"], chunk: int = 1024) -> Float64[Tensor, " b"]:
    """Row sums, float64 accurate up to the chunk sums' rounding (~1e-7 relative in float32); 20x faster on CPU
    than ``sum(dtype=torch.float64)``, which converts every entry."""
    return _by_chunks(x, chunk, lambda part: part.sum(-1).double())


def sum_squares(x: Float[Tensor, "b n"], chunk: int = 1024) -> Float64[Tensor, " b"]:
    """Row sums of squares from chunk norms (relative error ~1e-8 in float32)."""
    return _by_chunks(x, chunk, lambda part: torch.linalg.vector_norm(part, dim=-1).double().square())


class _DiagonalRows(BatchRows):
    def __init__(self, b: int, nnz: int, size: int, workspace: Workspace, device: torch.device):
        self.sum_sq = torch.zeros(b, dtype=torch.float64, device=device)
        self.top = row_selection(b, nnz, size, workspace=workspace)

    def add(self, start, factors, diagonal) -> None:
        self.sum_sq += sum_squares(diagonal)
        self.top.add(diagonal, start)

    def rows(self, class_ids) -> dict[str, Tensor]:
        values, indices = self.top.result()  # descending, or everything in parameter order
        return {"values": values, "indices": indices, "norms": self.sum_sq.sqrt()}


class _LowRankRows(BatchRows):
    def __init__(self, b: int, k: int, nnz: int, size: int, max_classes: int, workspace: Workspace,
                 device: torch.device):
        self.k, self.size = k, size
        self.gram = torch.zeros(b, k, k, dtype=torch.float64, device=device)
        self.top = row_selection(b, nnz, size * max_classes, key=torch.abs, workspace=workspace)

    def add(self, start, factors, diagonal) -> None:
        self.gram += lowrank_gram(factors)
        # (class c, parameter j) has joint index c * size + j; |u_c|^2 <= sum_c u_c^2 bounds every class's keys
        self.top.add_group(factors, [c * self.size + start for c in range(self.k)], diagonal)

    def rows(self, class_ids) -> dict[str, Tensor]:
        if isinstance(self.top, AllColumns):  # every entry, already in (class, parameter) order
            values, _ = self.top.result()
            b, device = values.shape[0], values.device
            indices = torch.arange(self.size, device=device).repeat(self.k).expand(b, -1)
            col_offsets = (torch.arange(self.k + 1, device=device) * self.size).expand(b, -1)
        else:
            values, indices, col_offsets = lowrank_rows(*self.top.result(), self.size, self.k)
        return {"values": values, "indices": indices, "norms": self.gram.flatten(1).norm(dim=1),
                "col_offsets": col_offsets, "ranks": (class_ids >= 0).sum(1)}
