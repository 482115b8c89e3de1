"""The nodes a trace patches: per layer and position, attention heads' outputs (``attn.hook_z``), MLP outputs
(``hook_mlp_out``), the residual stream after the block (``hook_resid_post``) and, optionally, MLP neurons
(``mlp.hook_post``). Each kind knows its TransformerLens hook, its units (heads, neurons or one), how to
overwrite a unit at a position, and what a change of the unit adds to the residual stream (used by AtP*'s QK fix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass(frozen=True)
class NodeKind:
    """One kind of node. Activations are viewed as ``[batch, pos, units, features]``: a patch replaces one
    unit's features at one position; an attribution sums gradient x change over the features."""

    key: str  # the hook name after "blocks.{layer}."
    unit: str  # what one unit is, for people: "head", "neuron" or "" (the whole activation)
    sublayer: int  # where in its block it sits: 0 in attention, 1 in (or after) the MLP
    is_writer: bool  # whether it is one of the block's writes into the residual stream (or inside one)

    def writer_index(self, layer: int) -> int:
        """Its place in the sequence of residual writers attn_0, mlp_0, attn_1, ... (GradDrop's units)."""
        return 2 * layer + self.sublayer

    def hook(self, layer: int) -> str:
        return f"blocks.{layer}.{self.key}"

    def n_units(self, cfg) -> int:
        return {"head": cfg.n_heads, "neuron": cfg.d_mlp, "": 1}[self.unit]

    def unit_shape(self, cfg) -> tuple[int, ...]:
        """The unit axes of the result tensors: (n_heads,), (d_mlp,) or () for a whole activation."""
        return (self.n_units(cfg),) if self.unit else ()

    def as_units(self, act: Tensor) -> Float[Tensor, "batch pos units features"]:
        """A view of a hook's activation with one unit axis and one feature axis."""
        if self.unit == "head":
            return act
        return act.unsqueeze(-1) if self.unit == "neuron" else act.unsqueeze(2)

    def writes(self, model, layer: int, delta: Float[Tensor, "batch pos units features"], first_unit: int = 0
               ) -> Float[Tensor, "batch pos units d_model"]:
        """What a change ``delta`` of each unit adds to the residual stream after its block (linear in delta);
        ``delta`` may hold the units from ``first_unit`` on only."""
        units = slice(first_unit, first_unit + delta.shape[2])
        if self.unit == "head":
            W_O = model.blocks[layer].attn.W_O[units]  # [head, d_head, d_model]
            return torch.einsum("bpud,udm->bpum", delta, W_O.to(delta.dtype))
        if self.unit == "neuron":
            W_out = model.blocks[layer].mlp.W_out[units]  # [d_mlp, d_model]
            return delta * W_out.to(delta.dtype)
        return delta


HEADS = NodeKind("attn.hook_z", "head", 0, True)
MLP_OUT = NodeKind("hook_mlp_out", "", 1, True)
RESID_POST = NodeKind("hook_resid_post", "", 1, False)
NEURONS = NodeKind("mlp.hook_post", "neuron", 1, True)
NODE_KINDS = {kind.key: kind for kind in (HEADS, MLP_OUT, RESID_POST, NEURONS)}
DEFAULT_NODES = (HEADS.key, MLP_OUT.key, RESID_POST.key)


def node_kinds(model, names) -> list[NodeKind]:
    """The node kinds named (keys of NODE_KINDS), checked against the model's hooks."""
    names = list(names)
    unknown = [name for name in names if name not in NODE_KINDS]
    if unknown or not names:
        raise ValueError(f"unknown node kinds {unknown}; choose from {list(NODE_KINDS)}")
    missing = [name for name in names if NODE_KINDS[name].hook(0) not in model.hook_dict]
    if missing:
        raise ValueError(f"this model has no {missing} hooks (e.g. an attention-only model has no MLP); leave "
                         f"them out of nodes=")
    return [NODE_KINDS[name] for name in names]


def node_name(kind: NodeKind, layer: int, unit: int) -> str:
    """A node's name in TransformerLens style: ``blocks.1.attn.hook_z[3]`` for head 3, ``blocks.0.hook_mlp_out``."""
    return kind.hook(layer) + (f"[{unit}]" if kind.unit else "")
