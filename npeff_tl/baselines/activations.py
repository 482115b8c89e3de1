"""Activations at a TransformerLens hook, at the examples' target positions (shared by SAE and k-means baselines)."""

from __future__ import annotations

import re

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..examples import Examples


def middle_hook(model: nn.Module) -> str:
    """Where activation baselines (SAEs, k-means) look by default, chosen without labels: the residual stream
    entering the middle block (``blocks.{n_layers // 2}.hook_resid_pre``)."""
    return f"blocks.{model.cfg.n_layers // 2}.hook_resid_pre"


def residual_hooks(model: nn.Module) -> list[str]:
    """The residual stream before every block and after the last: the candidates when a hook is chosen with
    labels (an oracle advantage, reported as such)."""
    n_layers = model.cfg.n_layers
    return [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]


def check_hook(model: nn.Module, hook_name: str) -> None:
    known = getattr(model, "hook_dict", {})
    if hook_name not in known:
        near = [name for name in known if name.endswith(hook_name.rsplit(".", 1)[-1])][:6]
        raise ValueError(f"unknown hook {hook_name!r}; hooks of this kind in the model: {near or sorted(known)[:6]}")


def sequence_activations(model: nn.Module, tokens: Int[Tensor, "b seq"], hook_name: str) -> Tensor:
    """Activations at ``hook_name`` for a batch of sequences ([b, seq, ...]), without gradients; the forward pass
    stops after the block that holds the hook."""
    block = re.match(r"blocks\.(\d+)\.", hook_name)
    device = next(model.parameters()).device
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(device), names_filter=[hook_name],
                                        stop_at_layer=int(block.group(1)) + 1 if block else None)
    return cache[hook_name]


def hook_activations(model: nn.Module, examples: Examples, hook_name: str, *, positions: str = "target",
                     batch_size: int = 64) -> Float[Tensor, "n d"]:
    """Activations at ``hook_name``: at each example's target position (``positions="target"``), or every real
    token of every sequence (``"all"``, for training SAEs), as float32 rows on the CPU (per-head hooks are
    flattened)."""
    check_hook(model, hook_name)
    if positions not in ("target", "all"):
        raise ValueError(f"positions must be 'target' or 'all', got {positions!r}")
    rows = []
    n = len(examples) if positions == "target" else len(examples.tokens)
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(start + batch_size, n))
        sequences = examples.seq_index[index] if positions == "target" else index
        acts = sequence_activations(model, examples.tokens[sequences], hook_name)
        if positions == "target":
            rows.append(acts[torch.arange(len(index)), examples.position[index].to(acts.device)])
        else:
            lengths = examples.lengths[sequences].to(acts.device)
            real = torch.arange(acts.shape[1], device=acts.device)[None] < lengths[:, None]
            rows.append(acts[real])
    return torch.cat(rows).flatten(1).float().cpu()
