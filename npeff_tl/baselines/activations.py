"""Activations at a TransformerLens hook, at the examples' target positions (shared by SAE and k-means baselines)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..examples import Examples


def check_hook(model: nn.Module, hook_name: str) -> None:
    known = getattr(model, "hook_dict", {})
    if hook_name not in known:
        near = [name for name in known if name.endswith(hook_name.rsplit(".", 1)[-1])][:6]
        raise ValueError(f"unknown hook {hook_name!r}; hooks of this kind in the model: {near or sorted(known)[:6]}")


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
    device = next(model.parameters()).device
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(start + batch_size, n))
        sequences = examples.seq_index[index] if positions == "target" else index
        _, cache = model.run_with_cache(examples.tokens[sequences].to(device), names_filter=[hook_name])
        acts = cache[hook_name]
        if positions == "target":
            rows.append(acts[torch.arange(len(index)), examples.position[index].to(device)])
        else:
            lengths = examples.lengths[sequences].to(device)
            real = torch.arange(acts.shape[1], device=device)[None] < lengths[:, None]
            rows.append(acts[real])
    return torch.cat(rows).flatten(1).float().cpu()
