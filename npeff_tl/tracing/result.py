"""A trace's result: per node kind, the effect of patching each node (layer, unit, position relative to the
target) per example and averaged over examples; saved as safetensors + JSON like other results."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..provenance import versions
from ..store import atomic_directory, load_tensors, read_metadata, save_json, save_tensors
from .nodes import NODE_KINDS, RESID_POST, node_name

TRACE_FORMAT = "npeff_tl.trace"
COMPONENT_NODES = ("attn.hook_z", "hook_mlp_out", "mlp.hook_post")  # what the circuit is made of


@dataclass(frozen=True)
class Trace:
    """``per_example[key]``: [n_examples, n_layers, *units, n_offsets] for node kind ``key`` (``attn.hook_z``:
    units = heads; ``mlp.hook_post``: neurons; ``hook_mlp_out`` / ``hook_resid_post``: none). Offset o is the
    position o tokens before the target (0 = the target itself); NaN where an example has no such position.
    ``total``: each example's effect of the whole perturbation on the same metric."""

    method: str
    metric: str
    per_example: dict[str, Float[Tensor, "n ..."]]
    total: Float[Tensor, " n"]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def effects(self) -> dict[str, Tensor]:
        """Mean over the examples that have each position (NaN where none has)."""
        return {key: _nanmean0(value) for key, value in self.per_example.items()}

    def __len__(self) -> int:
        return len(self.total)

    def ranked(self, kinds: tuple[str, ...] = COMPONENT_NODES) -> list[dict]:
        """Every node of ``kinds`` with its mean effect, largest |effect| first: name (TL hook, unit in brackets),
        layer, unit (None for a whole activation), offset before the target, effect."""
        rows, means = [], self.effects
        for key in kinds:
            if key not in self.per_example:
                continue
            kind, mean = NODE_KINDS[key], means[key]
            grid = mean.reshape(mean.shape[0], -1, mean.shape[-1])  # [layers, units, offsets]
            for layer, unit, offset in torch.nonzero(~grid.isnan()).tolist():
                rows.append({"node": node_name(kind, layer, unit), "layer": layer, "unit": unit if kind.unit else None,
                             "offset": offset, "effect": float(grid[layer, unit, offset])})
        return sorted(rows, key=lambda row: -abs(row["effect"]))

    def top_nodes(self, k: int = 10, kinds: tuple[str, ...] = COMPONENT_NODES) -> list[dict]:
        return self.ranked(kinds)[:k]

    def heatmap(self) -> Float[Tensor, "n_layers n_offsets"]:
        """Layer x position: the mean effect of patching the residual stream after each block at each offset
        (where in the forward pass the perturbation's effect is carried)."""
        if RESID_POST.key not in self.per_example:
            raise ValueError(f"this trace has no {RESID_POST.key} nodes; trace with them to get the heat map")
        return self.effects[RESID_POST.key]

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_directory(path) as tmp:
            save_tensors({**{f"per_example.{k}": v for k, v in self.per_example.items()}, "total": self.total},
                         tmp / "trace.safetensors")
            save_json({"format": TRACE_FORMAT, "format_version": 1, "method": self.method, "metric": self.metric,
                       "settings": self.settings, "provenance": {"versions": versions()}}, tmp / "metadata.json")
        return Path(path)


def load_trace(path: str | os.PathLike) -> Trace:
    """Load a trace saved with ``Trace.save``."""
    meta = read_metadata(path, TRACE_FORMAT)
    tensors = load_tensors(Path(path) / "trace.safetensors")
    per_example = {k.removeprefix("per_example."): v for k, v in tensors.items() if k.startswith("per_example.")}
    return Trace(meta["method"], meta["metric"], per_example, tensors["total"], meta["settings"])


def _nanmean0(x: Tensor) -> Tensor:
    present = ~x.isnan()
    count = present.sum(0)
    mean = torch.where(present, x, 0).sum(0) / count.clamp(min=1)
    return mean.masked_fill(count == 0, torch.nan)
