"""The runs a trace compares, for one batch of examples: the original model and the perturbed one (under the
perturbation's context manager). Noising patches nodes of the perturbed run into the original run; denoising
patches nodes of the original run into the perturbed run. ``Runs`` says which run is patched (its context and
log-probabilities) and holds the activations patched in."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..adapters import ModelAdapter

DIRECTIONS = ("noising", "denoising")


@dataclass(frozen=True)
class Runs:
    tokens: Int[Tensor, "b seq"]  # cut after the last target position (a causal model never looks further)
    targets: Int[Tensor, " b"]
    original: Float[Tensor, "b vocab"]  # log-probabilities at the targets, float64, CPU
    perturbed: Float[Tensor, "b vocab"]
    base: Float[Tensor, "b vocab"]  # the run patches go into: original (noising) or perturbed (denoising)
    context: Any  # a reusable context manager under which the base run runs
    sources: dict[str, Tensor]  # hook name -> the other run's activation, patched in


def capture(store: dict[str, Tensor], name: str, detach: bool = True):
    """A forward hook that keeps its activation in ``store`` under ``name``, the name it is registered under (a
    TransformerBridge's ``hook.name`` is its own alias, not the name asked for). It returns the activation, which
    puts the kept tensor itself on the forward path: a TransformerBridge hands its hooks a reshaped view (heads
    split at ``attn.hook_z``) and, when a hook returns nothing, goes on with the tensor before the reshape, so
    gradients taken at the kept view would be zero."""

    def keep(act, hook):
        store[name] = act.detach() if detach else act
        return act

    return keep


def target_log_probs(adapter: ModelAdapter, tokens: Tensor, targets: Tensor) -> Float[Tensor, "b vocab"]:
    """Float64 log-probabilities (on the CPU) at one target position per sequence, under whatever hooks are active."""
    logits = adapter.target_logits(tokens, targets[:, None])[:, 0]
    return logits.double().log_softmax(-1).cpu()


def run_pair(adapter: ModelAdapter, tokens: Tensor, targets: Tensor, perturbation, hooks: list[str],
             direction: str) -> Runs:
    """Both runs of one batch; ``hooks`` are the hook names whose activations are patched in."""
    model = adapter.model
    tokens = tokens[:, : int(targets.max()) + 1]
    acts: dict[str, Tensor] = {}

    keeping = adapter.hooks([(name, capture(acts, name)) for name in hooks])
    denoise = direction == "denoising"
    with torch.no_grad():
        with keeping if denoise else nullcontext():
            original = target_log_probs(adapter, tokens, targets)
        with perturbation, nullcontext() if denoise else keeping:
            perturbed = target_log_probs(adapter, tokens, targets)
    return Runs(tokens, targets, original, perturbed, perturbed if denoise else original,
                perturbation if denoise else nullcontext(), acts)
