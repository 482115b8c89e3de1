"""Containers for sparse per-example Fishers: diagonal (D-PEFs) and low-rank (LRM-PEFs).

Both keep, per example, ``nnz`` (value, flat parameter index) pairs over a ParamSpace, the norm of the dense
PEF before sparsification, and a table of per-example data (class ids and probabilities, target position,
answer, top logits, ``fisher_trace``: tr F_i of the dense PEF). They save as a directory of safetensors shards plus ``metadata.json``; ``compute_pefs``
writes the same format incrementally, so one loader reads both.

- ``DiagonalPEFs``: f_i = sum_c w_c g_c^2, the ``nnz`` largest entries in descending order (so a prefix of
  them is again a valid sparsification), or, when ``compute_pefs`` kept every parameter, all of them in
  parameter order (``row_order``). ``norms`` is ||f_i||_2.
- ``LowRankPEFs``: U_i with columns u_c = sqrt(w_c) g_c, so F_i = U_i U_i^T; the ``nnz`` largest |entries|
  jointly over classes x parameters, sorted by (class, parameter); ``col_offsets`` delimit the classes and
  ``ranks`` is the number of classes per example. ``norms`` is ||U_i U_i^T||_F.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Float64, Int
from torch import Tensor

from ..params import ParamSpace
from ..provenance import versions
from ..store import FormatError, ShardStore, atomic_directory, load_tensors, read_metadata, save_tensors
from .sparse import lowrank_gram, sorted_csr, sparsify_lowrank

PEFS_FORMAT = "npeff_tl.pefs"
D_NORM_EPS = 1e-9  # added to the norm when normalising D-PEFs (reference value)
LRM_NORM_FLOOR = 1e-12  # floor of sqrt(norm) when normalising LRM-PEFs (reference value)
# Keys of ``metadata`` that PEFs share with anything made from PEFs of the same origin (a decomposition keeps them).
ORIGIN_KEYS = ("target", "model")


@dataclass(kw_only=True)
class PEFs(ABC):
    """Sparse PEFs of ``n`` examples over ``space`` (see the module docstring for the two kinds)."""

    values: Float[Tensor, "n nnz"]
    indices: Int[Tensor, "n nnz"]
    norms: Float64[Tensor, " n"]
    space: ParamSpace
    per_example: dict[str, Tensor] = field(default_factory=dict)
    dataset_fisher: Float64[Tensor, " size"] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = ""
    _row_fields: ClassVar[tuple[str, ...]] = ("values", "indices", "norms")

    def __post_init__(self):
        n = self.values.shape[0]
        for name, column in self.per_example.items():
            if column.shape[0] != n:
                raise ValueError(f"per_example[{name!r}] has {column.shape[0]} rows for {n} examples")
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= self.space.size):
            raise ValueError(f"parameter indices must lie in [0, {self.space.size}) (the size of the ParamSpace)")
        if self.dataset_fisher is not None and self.dataset_fisher.shape[0] != self.space.size:
            raise ValueError("dataset_fisher must have one entry per parameter of the space")

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def nnz(self) -> int:
        return int(self.values.shape[1])

    @property
    def is_normalized(self) -> bool:
        return bool(self.metadata.get("normalized", False))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, nnz={self.nnz}, space={self.space!r})"

    # ------------------------------------------------------------------------------- rows
    def subset(self, index: Tensor | Sequence[int] | slice) -> PEFs:
        """The PEFs of some examples (the dataset-level Fisher is kept: it describes the whole run)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        rows = {name: getattr(self, name)[index] for name in self._row_fields}
        per_example = {name: column[index] for name, column in self.per_example.items()}
        return dataclasses.replace(self, **rows, per_example=per_example)

    @classmethod
    def concatenate(cls, parts: Sequence[PEFs]) -> PEFs:
        """Stack PEF sets of the same kind, space, nnz, target rule and model."""
        if not parts:
            raise ValueError("concatenate needs at least one PEF set")
        first = parts[0]
        for other in parts[1:]:
            if type(first) is not type(other):
                raise ValueError(f"cannot combine {type(first).__name__} with {type(other).__name__}")
            if first.nnz != other.nnz:
                raise ValueError(f"the PEF sets have different nnz ({first.nnz} vs {other.nnz})")
            check_compatible(other, first.kind, first.space, first.metadata, "the first set holds",
                             keys=(*ORIGIN_KEYS, "normalized", "row_order"))
        rows = {name: torch.cat([getattr(p, name) for p in parts]) for name in first._row_fields}
        keys = set.intersection(*(set(p.per_example) for p in parts))
        per_example = {name: torch.cat([p.per_example[name] for p in parts]) for name in first.per_example if name in keys}
        fishers = [p.dataset_fisher for p in parts]
        fisher = None
        if all(f is not None for f in fishers):  # a mean over all examples of all parts
            fisher = sum(f * len(p) for f, p in zip(fishers, parts)) / sum(len(p) for p in parts)
        return dataclasses.replace(first, **rows, per_example=per_example, dataset_fisher=fisher)

    # ------------------------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> Path:
        """Save as a directory (metadata.json + safetensors), replacing ``path`` atomically."""
        with atomic_directory(path) as tmp:
            store = ShardStore(tmp, PEFS_FORMAT, self._store_config(), len(self), max(len(self), 1), lock=False)
            store.write(0, self._shard_tensors())
            if self.dataset_fisher is not None:
                save_tensors({"dataset_fisher": self.dataset_fisher}, tmp / "dataset_fisher.safetensors")
            store.mark_complete(provenance=self.provenance, dataset_fisher=self.dataset_fisher is not None)
        return Path(path)

    def _store_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "nnz": self.nnz, "space": self.space.to_dict(), "metadata": self.metadata}

    def _shard_tensors(self) -> dict[str, Tensor]:
        tensors = {name: getattr(self, name) for name in self._row_fields}
        tensors.update({f"per_example.{name}": column for name, column in self.per_example.items()})
        return tensors

    @classmethod
    def _from_shards(cls, shards: list[dict[str, Tensor]], space: ParamSpace, meta: dict[str, Any]) -> PEFs:
        tensors = shards[0] if len(shards) == 1 else {key: torch.cat([s[key] for s in shards]) for key in shards[0]}
        missing = [name for name in cls._row_fields if name not in tensors]
        if missing:
            raise FormatError(f"PEF shards lack the tensors {missing}; the files are corrupt or not PEFs")
        per_example = {k.removeprefix("per_example."): v for k, v in tensors.items() if k.startswith("per_example.")}
        rows = {name: tensors[name] for name in cls._row_fields}
        return cls(
            **rows,
            space=space,
            per_example=per_example,
            metadata=meta["config"].get("metadata", {}),
            provenance=meta.get("provenance", {}),
        )

    # ------------------------------------------------------------------------------- views
    def normalized(self) -> PEFs:
        """Each example scaled to (about) unit Frobenius norm of its dense PEF, as NPEFF fits expect."""
        if self.is_normalized:
            raise ValueError("these PEFs are already normalized")
        return dataclasses.replace(
            self, values=self.values / self._row_scale()[:, None].to(self.values.dtype),
            metadata={**self.metadata, "normalized": True},
        )

    @abstractmethod
    def _row_scale(self) -> Tensor:
        """Per-example divisor that normalises the PEFs (each kind has its reference convention)."""


def check_compatible(pefs: PEFs, kind: str, space: ParamSpace, metadata: dict[str, Any], holder: str,
                     keys: Sequence[str] = ORIGIN_KEYS) -> None:
    """``pefs`` must match what ``holder`` ("the decomposition was fit on", "the first set holds") holds: its
    kind of PEF, parameter space and the ``keys`` of its metadata (target rule and model); a clear error otherwise."""
    if pefs.kind != kind:
        raise ValueError(f"these are {pefs.kind} PEFs but {holder} {kind} PEFs")
    if pefs.space != space:
        raise ValueError(f"these PEFs are over different parameter spaces from those {holder}")
    for key in keys:
        if pefs.metadata.get(key) != metadata.get(key):
            raise ValueError(f"these PEFs differ in {key} from those {holder}: {pefs.metadata.get(key)} vs "
                             f"{metadata.get(key)}")


@dataclass(kw_only=True, repr=False)
class DiagonalPEFs(PEFs):
    kind: ClassVar[str] = "diagonal"

    def _row_scale(self) -> Tensor:
        return self.norms + D_NORM_EPS

    @property
    def row_order(self) -> str:
        """"descending": the largest entries first (a prefix is again a valid sparsification); "parameter":
        every parameter of the space in parameter order (nothing was dropped, so nothing was sorted)."""
        return self.metadata.get("row_order", "descending")

    def entries(self) -> tuple[Int[Tensor, " e"], Int[Tensor, " e"], Float[Tensor, " e"], Int[Tensor, " n_plus_1"]]:
        """(row, column, value) of every stored entry in storage order, and row_offsets (one row per example)."""
        n = len(self)
        rows = torch.arange(n).repeat_interleave(self.nnz)
        return rows, self.indices.reshape(-1).long(), self.values.reshape(-1), torch.arange(n + 1)

    def to_csr(self) -> Float[Tensor, "n size"]:
        """A torch sparse CSR matrix [n, space.size] (column indices sorted within each row)."""
        rows, cols, values, _ = self.entries()
        return sorted_csr(rows, cols, values, (len(self), self.space.size))

    def to_dense(self) -> Float[Tensor, "n size"]:
        dense = torch.zeros(len(self), self.space.size, dtype=self.values.dtype)
        return dense.scatter_(1, self.indices.long(), self.values)

    @classmethod
    def from_dense(
        cls, matrix: Float[Tensor, "n size"], nnz: int | None = None, space: ParamSpace | None = None, **metadata: Any
    ) -> DiagonalPEFs:
        """Sparsify dense non-negative diagonals (rows); norms are taken before sparsification."""
        space = _space_for(space, matrix.shape[-1])
        if (matrix < 0).any():
            raise ValueError("diagonal PEFs are non-negative; the matrix has negative entries")
        nnz = check_nnz(nnz if nnz is not None else space.size, space.size)
        values, indices = matrix.topk(nnz, dim=1)
        norms = matrix.double().norm(dim=1)
        return cls(values=values, indices=indices, norms=norms, space=space, metadata=_synthetic(metadata), provenance={"versions": versions()})

    @classmethod
    def from_sparse(
        cls, matrix: Float[Tensor, "n size"], space: ParamSpace | None = None, **metadata: Any
    ) -> DiagonalPEFs:
        """From a sparse (CSR or COO) non-negative matrix; rows with fewer entries are padded with zeros."""
        csr = matrix.to_sparse_csr() if matrix.layout != torch.sparse_csr else matrix
        n, size = csr.shape
        space = _space_for(space, size)
        crow, cols, vals = csr.crow_indices(), csr.col_indices(), csr.values()
        if (vals < 0).any():
            raise ValueError("diagonal PEFs are non-negative; the matrix has negative entries")
        counts = crow.diff()
        nnz = check_nnz(max(int(counts.max()), 1), size)
        values = torch.zeros(n, nnz, dtype=vals.dtype)
        indices = torch.zeros(n, nnz, dtype=torch.long)
        for i in range(n):
            row_vals, row_cols = vals[crow[i] : crow[i + 1]], cols[crow[i] : crow[i + 1]].long()
            order = torch.argsort(row_vals, descending=True, stable=True)
            k = len(row_vals)
            values[i, :k], indices[i, :k] = row_vals[order], row_cols[order]
            if k < nnz:  # pad with zeros at columns the row does not use
                unused = torch.ones(size, dtype=torch.bool)
                unused[row_cols] = False
                indices[i, k:] = torch.nonzero(unused).flatten()[: nnz - k]
        norms = values.double().norm(dim=1)
        return cls(values=values, indices=indices, norms=norms, space=space, metadata=_synthetic(metadata), provenance={"versions": versions()})


@dataclass(kw_only=True, repr=False)
class LowRankPEFs(PEFs):
    col_offsets: Int[Tensor, "n k_plus_1"]
    ranks: Int[Tensor, " n"]

    kind: ClassVar[str] = "lowrank"
    _row_fields: ClassVar[tuple[str, ...]] = ("values", "indices", "norms", "col_offsets", "ranks")

    @property
    def max_rank(self) -> int:
        return int(self.col_offsets.shape[1]) - 1

    def _row_scale(self) -> Tensor:
        return self.norms.sqrt().clamp(min=LRM_NORM_FLOOR)

    def _class_of_entry(self) -> Tensor:
        """The class (factor column) of every stored entry, [n, nnz]."""
        entry = torch.arange(self.nnz)
        return (entry[None, None, :] >= self.col_offsets[:, 1:, None]).sum(1)

    def entries(self) -> tuple[Int[Tensor, " e"], Int[Tensor, " e"], Float[Tensor, " e"], Int[Tensor, " n_plus_1"]]:
        """(row, column, value) of every stored entry of a real class, in storage order (example by example),
        and row_offsets: one row per (example, class) for the first ``ranks[i]`` classes of each example;
        example i owns rows row_offsets[i]:row_offsets[i + 1]."""
        row_offsets = self.row_offsets
        classes = self._class_of_entry()
        real = classes < self.ranks[:, None]  # entries of padding classes are zeros; they get no row
        rows = (row_offsets[:-1, None] + classes)[real]
        return rows, self.indices.long()[real], self.values[real], row_offsets

    def to_csr(self) -> Float[Tensor, "rows size"]:
        """A torch sparse CSR matrix of the factor rows (one row per example and real class, as in ``entries``;
        ``row_offsets`` says which rows are whose), column indices sorted within each row."""
        rows, cols, values, row_offsets = self.entries()
        return sorted_csr(rows, cols, values, (int(row_offsets[-1]), self.space.size))

    @property
    def row_offsets(self) -> Int[Tensor, " n_plus_1"]:
        """Example i owns the factor rows row_offsets[i]:row_offsets[i + 1] of ``to_csr()`` (its ``ranks[i]`` classes)."""
        offsets = torch.zeros(len(self) + 1, dtype=torch.long)
        offsets[1:] = self.ranks.long().cumsum(0)
        return offsets

    def to_dense(self) -> Float[Tensor, "n k size"]:
        """The sparsified factors U_i as a dense [n, max_rank, size] tensor."""
        dense = torch.zeros(len(self), self.max_rank * self.space.size, dtype=self.values.dtype)
        flat = self._class_of_entry() * self.space.size + self.indices.long()
        return dense.scatter_(1, flat, self.values).reshape(len(self), self.max_rank, self.space.size)

    @classmethod
    def from_dense(
        cls,
        factors: Float[Tensor, "n k size"] | Sequence[Float[Tensor, "_ size"]],
        nnz: int | None = None,
        space: ParamSpace | None = None,
        **metadata: Any,
    ) -> LowRankPEFs:
        """Sparsify dense factors U_i (F_i = U_i U_i^T): a [n, k, size] tensor or a list of [k_i, size]
        tensors for examples of different ranks. Norms are taken before sparsification."""
        factor_list = list(factors.unbind(0)) if isinstance(factors, Tensor) else [torch.as_tensor(f) for f in factors]
        if not factor_list:
            raise ValueError("no examples: the list of factors is empty")
        size = factor_list[0].shape[-1]
        space = _space_for(space, size)
        ranks = torch.tensor([f.shape[0] for f in factor_list], dtype=torch.long)
        if int(ranks.min()) < 1 or any(f.shape[-1] != size for f in factor_list):
            raise ValueError("every example needs a [k_i >= 1, size] factor, all with the same size")
        joint = size * int(ranks.max())
        nnz = check_nnz(nnz if nnz is not None else joint, joint, "classes x parameters")
        padded = torch.zeros(len(factor_list), int(ranks.max()), size, dtype=factor_list[0].dtype)
        for i, f in enumerate(factor_list):
            padded[i, : f.shape[0]] = f
        values, indices, col_offsets = sparsify_lowrank(padded, nnz)
        return cls(
            values=values, indices=indices, norms=lowrank_gram(padded).flatten(1).norm(dim=1), col_offsets=col_offsets, ranks=ranks,
            space=space, metadata=_synthetic(metadata), provenance={"versions": versions()},
        )


def _space_for(space: ParamSpace | None, size: int) -> ParamSpace:
    if space is None:
        return ParamSpace.flat(size)
    if space.size != size:
        raise ValueError(f"the matrix has {size} columns but the ParamSpace has {space.size} parameters")
    return space


def check_nnz(nnz: int, size: int, space: str = "parameters") -> int:
    """``nnz`` if it lies in [1, size], else a ValueError saying what it counts."""
    if not 1 <= nnz <= size:
        raise ValueError(
            f"nnz={nnz} must lie in [1, {size}]: it is the number of entries kept per example, and the "
            f"space it is taken from has {size} {space} (select more parameters or lower nnz)"
        )
    return nnz


def _synthetic(metadata: dict[str, Any]) -> dict[str, Any]:
    return {"target": None, "model": None, "normalized": False, "source": "synthetic", **metadata}


def load_pefs(path: str | os.PathLike) -> DiagonalPEFs | LowRankPEFs:
    """Load PEFs saved with ``.save`` or written by ``compute_pefs(..., store=path)``."""
    meta = read_metadata(path, PEFS_FORMAT)
    if not meta.get("complete"):
        raise FormatError(
            f"{path} is an unfinished PEF store; finish it by running compute_pefs(..., store={str(path)!r}) "
            "again with the same arguments"
        )
    config = meta.get("config", {})
    classes = {cls.kind: cls for cls in PEFs.__subclasses__()}  # one container per kind of PEF
    if config.get("kind") not in classes or "space" not in config:
        raise FormatError(f"{path}/metadata.json does not describe PEFs (kind {config.get('kind')!r})")
    cls = classes[config["kind"]]
    space = ParamSpace.from_dict(config["space"])
    store = ShardStore(path, PEFS_FORMAT, config, meta["n_examples"], meta["shard_size"], lock=False)
    missing = [j for j in range(len(store.ranges)) if not store.is_done(j)]
    if missing:
        raise FormatError(f"{path} is marked complete but shards {missing[:10]} are missing; re-run "
                          f"compute_pefs(..., store={str(path)!r}) with the same arguments to recompute them")
    shards = [store.read(j) for j in range(len(store.ranges))]
    try:
        pefs = cls._from_shards(shards, space, meta)
    except (RuntimeError, TypeError) as error:
        raise FormatError(f"{path}: the shards do not fit together ({error}); the files are corrupt") from None
    if len(pefs) != meta["n_examples"] or pefs.nnz != config.get("nnz"):
        raise FormatError(f"{path}: the shards hold {len(pefs)} x {pefs.nnz} entries, metadata says otherwise")
    fisher_file = Path(path) / "dataset_fisher.safetensors"
    if meta.get("dataset_fisher", fisher_file.exists()):  # stores older than the flag: the file decides
        if not fisher_file.exists():
            raise FormatError(f"{fisher_file} is missing, though the store was saved with it; re-run "
                              f"compute_pefs(..., store={str(path)!r}) with the same arguments to recompute it")
        pefs.dataset_fisher = load_tensors(fisher_file)["dataset_fisher"]
    return pefs
