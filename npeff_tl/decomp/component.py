"""One NPEFF component: its top examples, its pseudo-Fisher as TL-shaped tensors, and where its mass sits.

The mass of a component is its pseudo-Fisher's diagonal: h_j for D-NPEFF, g_j^2 for LRM-NPEFF (the diagonal
of g_j g_j^T). The readout reports the share of that mass per TL parameter tensor, per attention head
(``blocks.{l}.attn.*``, summed over everything but the head axis) and per MLP neuron (``W_in`` columns,
``W_out`` rows, ``b_in`` entries).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..pefs.kinds import pef_kind

if TYPE_CHECKING:  # a Decomposition makes its Components; this module needs the name only
    from .decomposition import Decomposition


_BLOCK = re.compile(r"blocks\.(\d+)\.(attn|mlp)\.(\w+)$")
_HEAD_PARAMS = {"W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"}  # head axis first in TL layouts
_NEURON_AXIS = {"W_in": 1, "W_gate": 1, "W_out": 0, "b_in": 0, "b_gate": 0}  # the d_mlp axis


@dataclass(frozen=True)
class Readout:
    """Shares of a component's mass: per parameter tensor, per (layer, head), per (layer, neuron) and, under
    grouped-query attention, per (layer, key/value group). ``heads`` / ``neurons`` are zero where the space holds
    no such parameter. Under grouped-query attention a key/value head serves several query heads: in ``heads`` its
    mass is shared evenly among them; ``groups`` keeps each group whole (its query heads' mass plus its key/value
    head's), and has no columns without grouping (or when the space holds no key/value weight to show it)."""

    tensors: dict[str, float]
    heads: Float[Tensor, "n_layers n_heads"]
    neurons: Float[Tensor, "n_layers d_mlp"]
    groups: Float[Tensor, "n_layers n_groups"]


@dataclass(frozen=True)
class Component:
    """Component ``index`` of ``decomposition``."""

    decomposition: Decomposition
    index: int

    @property
    def coefficients(self) -> Float[Tensor, " n"]:
        return self.decomposition.W[:, self.index]

    def top_examples(self, k: int = 10, relative: bool = False) -> tuple[Int[Tensor, " k"], Float[Tensor, " k"]]:
        """(example indices, scores) of the ``k`` largest coefficients; with ``relative``, coefficients divided
        by each example's total (how much of the example this component explains)."""
        W = self.decomposition.W
        scores = self.coefficients / W.sum(1).clamp(min=1e-30) if relative else self.coefficients
        top = scores.topk(min(k, len(scores)))
        return top.indices, top.values

    def pseudo_fisher(self) -> dict[str, Tensor]:
        """The diagonal of the component's pseudo-Fisher as TL-shaped tensors (h_j, or g_j^2 for LRM-NPEFF)."""
        full = self.decomposition.full(self.index)
        return self.decomposition.space.to_named(pef_kind(self.decomposition.kind).component_diagonal(full))

    def direction(self) -> dict[str, Tensor]:
        """LRM-NPEFF only: g_j itself as TL-shaped tensors (the pseudo-Fisher is g_j g_j^T)."""
        if not pef_kind(self.decomposition.kind).rank_one:
            raise ValueError("D-NPEFF components are diagonals, not directions; use pseudo_fisher()")
        return self.decomposition.named(self.index)

    def readout(self) -> Readout:
        mass = {name: t.double() for name, t in self.pseudo_fisher().items()}
        total = sum(float(t.sum()) for t in mass.values()) or 1.0
        layers, n_heads, n_kv, d_mlp = 0, 0, None, 0
        for name, t in mass.items():
            if m := _BLOCK.match(name):
                layers = max(layers, int(m.group(1)) + 1)
                if m.group(2) == "attn" and m.group(3) in _HEAD_PARAMS:
                    n_heads = max(n_heads, t.shape[0])
                    n_kv = t.shape[0] if n_kv is None else min(n_kv, t.shape[0])
                if m.group(2) == "mlp" and m.group(3) in _NEURON_AXIS:
                    d_mlp = max(d_mlp, t.shape[_NEURON_AXIS[m.group(3)]])
        n_groups = n_kv if n_kv is not None and n_kv < n_heads else 0
        heads = torch.zeros(layers, n_heads, dtype=torch.float64)
        groups = torch.zeros(layers, n_groups, dtype=torch.float64)
        neurons = torch.zeros(layers, d_mlp, dtype=torch.float64)
        for name, t in mass.items():
            if not (m := _BLOCK.match(name)):
                continue
            layer, kind, param = int(m.group(1)), m.group(2), m.group(3)
            if kind == "attn" and param in _HEAD_PARAMS:
                per_head = t.flatten(1).sum(1) / total
                group = n_heads // len(per_head)  # > 1 for the key/value heads of grouped-query attention
                heads[layer] += per_head.repeat_interleave(group) / group
                if n_groups:  # query head h belongs to group h // (n_heads / n_groups), as the model repeats k/v
                    groups[layer] += per_head.reshape(n_groups, -1).sum(1)
            if kind == "mlp" and param in _NEURON_AXIS:
                axis = _NEURON_AXIS[param]
                neurons[layer] += (t.sum(1 - axis) if t.ndim == 2 else t) / total
        return Readout({name: float(t.sum()) / total for name, t in mass.items()}, heads, neurons, groups)
