"""A fitted NPEFF dictionary: coefficients W, components over kept columns, and how to read and reuse them.

``kind`` "diagonal" (D-NPEFF): component j is a non-negative diagonal pseudo-Fisher h_j (a row of H).
``kind`` "lowrank" (LRM-NPEFF): component j is the rank-1 pseudo-Fisher g_j g_j^T (g_j a row of G).
Both are stored over the kept columns; ``full`` and ``named`` give the whole ParamSpace and TL layouts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int64
from torch import Tensor

from .. import distributed
from ..params import ParamSpace
from ..pefs import PEFs
from ..pefs.containers import check_compatible
from ..pefs.kinds import pef_kind
from ..progress import progress_bar
from ..provenance import versions
from ..store import FormatError, atomic_directory, load_tensors, read_metadata, save_json, save_tensors
from .component import Component
from .matrix import prepare
from .solver import multiplicative_w, numerators

DECOMPOSITION_FORMAT = "npeff_tl.decomposition"


@dataclass(kw_only=True)
class Decomposition:
    """W [n_examples, r] >= 0 and components [r, m] over ``kept_columns`` of ``space``."""

    kind: str
    W: Float[Tensor, "n r"]
    components: Float[Tensor, "r m"]
    kept_columns: Int64[Tensor, " m"]
    space: ParamSpace
    metadata: dict[str, Any] = field(default_factory=dict)  # of the PEFs: target rule, model
    settings: dict[str, Any] = field(default_factory=dict)
    losses: list[dict[str, Any]] = field(default_factory=list)  # {"phase", "iteration", "loss"}
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        pef_kind(self.kind)  # a known kind of PEF, else a clear error
        if self.W.shape[1] != self.components.shape[0]:
            raise ValueError(f"W has {self.W.shape[1]} columns but there are {self.components.shape[0]} components")
        if self.components.shape[1] != self.kept_columns.shape[0]:
            raise ValueError("components and kept_columns disagree on the number of columns")

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def H(self) -> Tensor:
        """The D-NPEFF components (rows: non-negative diagonal pseudo-Fishers)."""
        if self.kind != "diagonal":
            raise AttributeError("H exists for D-NPEFF decompositions; this one is LRM-NPEFF (use G)")
        return self.components

    @property
    def G(self) -> Tensor:
        """The LRM-NPEFF components (rows g_j of the rank-1 pseudo-Fishers g_j g_j^T)."""
        if self.kind != "lowrank":
            raise AttributeError("G exists for LRM-NPEFF decompositions; this one is D-NPEFF (use H)")
        return self.components

    def __repr__(self) -> str:
        return (f"Decomposition(kind={self.kind!r}, n_examples={self.W.shape[0]}, n_components={self.n_components}, "
                f"columns={self.kept_columns.shape[0]} of {self.space.size})")

    # ---------------------------------------------------------------------------------- views
    def component(self, j: int) -> Component:
        """Component ``j`` as a ``Component`` (top examples, pseudo-Fisher, TL-layout readout)."""
        if not 0 <= j < self.n_components:
            raise IndexError(f"component {j} does not exist; there are {self.n_components}")
        return Component(self, j)

    def full(self, j: int) -> Float[Tensor, " size"]:
        """Component ``j`` over the whole ParamSpace (zeros at pruned columns)."""
        out = torch.zeros(self.space.size, dtype=self.components.dtype, device=self.components.device)
        out[self.kept_columns.to(out.device)] = self.components[j]
        return out

    def named(self, j: int) -> dict[str, Tensor]:
        """Component ``j`` as TL-shaped tensors, one per parameter of the space."""
        return self.space.to_named(self.full(j))

    # ---------------------------------------------------------------------------------- coefficients
    def fit_coefficients(
        self,
        pefs: PEFs,
        *,
        n_iter: int = 300,
        eps: float | None = None,
        batch_size: int = 4096,
        seed: int = 0,
        progress: bool = True,
    ) -> Float[Tensor, "n r"]:
        """Coefficients of new PEFs with the components fixed: multiplicative updates from a seeded uniform
        start, ``batch_size`` examples at a time (memory is bounded by the batch). Under torch.distributed the
        batches are shared out over the ranks (contiguous runs) and every rank gets all the coefficients."""
        check_compatible(pefs, self.kind, self.space, self.metadata, "the decomposition was fit on")
        eps = self.settings.get("eps", 1e-8) if eps is None else eps
        components = self.components
        generator = torch.Generator().manual_seed(seed)
        starts = list(range(0, len(pefs), batch_size))
        first, stop = distributed.balanced_ranges(torch.ones(len(starts), dtype=torch.long),
                                                  distributed.world_size())[distributed.rank()]
        parts = [torch.zeros(0, self.n_components, dtype=components.dtype, device=components.device)]
        for b, start in enumerate(progress_bar(starts, desc="coefficients", enabled=progress)):
            W = torch.rand(min(batch_size, len(pefs) - start), self.n_components, generator=generator)
            if not first <= b < stop:
                continue  # another rank's batch (its start was drawn all the same: one seeded stream)
            chunk = pefs.subset(slice(start, start + batch_size))
            matrix = prepare(chunk, columns=self.kept_columns, device=components.device, dtype=components.dtype)
            numerator, gram = numerators(matrix, components)
            parts.append(multiplicative_w(W.to(numerator), numerator, gram, n_iter, eps))
        return distributed.all_gather_rows(torch.cat(parts))

    # ---------------------------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> Path:
        """A directory with decomposition.safetensors and metadata.json, replacing ``path`` atomically."""
        with atomic_directory(path) as tmp:
            save_tensors({"W": self.W, "components": self.components, "kept_columns": self.kept_columns},
                         tmp / "decomposition.safetensors")
            save_json({
                "format": DECOMPOSITION_FORMAT, "format_version": 1, "kind": self.kind, "space": self.space.to_dict(),
                "metadata": self.metadata, "settings": self.settings, "losses": self.losses,
                "provenance": {"versions": versions(), **self.provenance},
            }, tmp / "metadata.json")
        return Path(path)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Decomposition:
        return dataclasses.replace(self, W=self.W.to(device=device, dtype=dtype),
                                   components=self.components.to(device=device, dtype=dtype))


def load_decomposition(path: str | os.PathLike, device: str | torch.device = "cpu") -> Decomposition:
    """Load a decomposition saved with ``Decomposition.save``."""
    meta = read_metadata(path, DECOMPOSITION_FORMAT)
    tensors = load_tensors(Path(path) / "decomposition.safetensors")
    missing = {"W", "components", "kept_columns"} - set(tensors)
    if missing:
        raise FormatError(f"{path}/decomposition.safetensors lacks {sorted(missing)}; it is corrupt")
    try:
        return Decomposition(
            kind=meta["kind"], W=tensors["W"].to(device), components=tensors["components"].to(device),
            kept_columns=tensors["kept_columns"], space=ParamSpace.from_dict(meta["space"]),
            metadata=meta.get("metadata", {}), settings=meta.get("settings", {}), losses=meta.get("losses", []),
            provenance=meta.get("provenance", {}),
        )
    except (KeyError, ValueError) as error:
        raise FormatError(f"{path} is not a consistent decomposition ({error})") from None
