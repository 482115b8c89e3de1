"""The two runs a trace compares, for one batch of examples: the original model and the perturbed one (under
the perturbation's context manager), with the perturbed run's activations at every node hook."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..adapters import ModelAdapter


@dataclass(frozen=True)
class Runs:
    tokens: Int[Tensor, "b seq"]  # cut after the last target position (a causal model never looks further)
    targets: Int[Tensor, " b"]
    original: Float[Tensor, "b vocab"]  # log-probabilities at the targets, float64
    perturbed: Float[Tensor, "b vocab"]
    perturbed_acts: dict[str, Tensor]  # hook name -> activation of the perturbed run


def target_log_probs(adapter: ModelAdapter, tokens: Tensor, targets: Tensor) -> Float[Tensor, "b vocab"]:
    """Float64 log-probabilities (on the CPU) at one target position per sequence, under whatever hooks are active."""
    logits = adapter.target_logits(tokens, targets[:, None])[:, 0]
    return logits.double().log_softmax(-1).cpu()


def run_pair(adapter: ModelAdapter, tokens: Tensor, targets: Tensor, perturbation, hooks: list[str]) -> Runs:
    """Both runs of one batch; ``hooks`` are the hook names whose perturbed activations are kept."""
    model = adapter.model
    tokens = tokens[:, : int(targets.max()) + 1]
    acts: dict[str, Tensor] = {}

    def keep(act, hook):
        acts[hook.name] = act.detach()

    with torch.no_grad():
        original = target_log_probs(adapter, tokens, targets)
        with perturbation, model.hooks(fwd_hooks=[(name, keep) for name in hooks]):
            perturbed = target_log_probs(adapter, tokens, targets)
    return Runs(tokens, targets, original, perturbed, acts)
