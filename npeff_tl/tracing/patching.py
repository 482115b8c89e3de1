"""Exact activation patching, the slow ground truth: one forward pass per (example, node), run in batches of
``patch_batch`` sequences. Each pass is the base run (original when noising, perturbed when denoising) with one
node's activation at one position replaced by its value in the other run."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ..adapters import ModelAdapter
from .metrics import MetricState, TraceMetric
from .nodes import NodeKind
from .runs import Runs, target_log_probs


def patching_effects(adapter: ModelAdapter, runs: Runs, kinds: list[NodeKind], metric: TraceMetric,
                     state: MetricState, patch_batch: int) -> dict[str, Float[Tensor, "b layers units pos"]]:
    """Per node kind, the exact effect of patching each node at each position up to each example's target
    (NaN at later positions, which a causal model's prediction never sees)."""
    cfg = adapter.model.cfg
    b, seq = runs.tokens.shape
    out = {}
    for kind in kinds:
        shape = (b, cfg.n_layers, kind.n_units(cfg), seq)
        effects = torch.full(shape, torch.nan, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij"), -1).reshape(-1, 4)
        jobs = grid[grid[:, 3] <= runs.targets.cpu()[grid[:, 0]]]  # rows (example, layer, unit, position)
        for chunk in jobs.split(patch_batch):
            with torch.no_grad(), runs.context, adapter.hooks(_patch_hooks(kind, chunk, runs)):
                patched = target_log_probs(adapter, runs.tokens[chunk[:, 0]], runs.targets[chunk[:, 0]])
            effects[tuple(chunk.T)] = metric.effect(patched, state.rows(chunk[:, 0]))
        out[kind.key] = effects
    return out


def _patch_hooks(kind: NodeKind, chunk: Tensor, runs: Runs) -> list:
    """One hook per layer in ``chunk``: row r gets the other run's value of its (unit, position)."""
    hooks = []
    for layer in chunk[:, 1].unique().tolist():
        rows = torch.nonzero(chunk[:, 1] == layer).flatten()
        example, unit, position = chunk[rows, 0], chunk[rows, 2], chunk[rows, 3]
        source = kind.as_units(runs.sources[kind.hook(layer)])

        def patch(act, hook, rows=rows, example=example, unit=unit, position=position, source=source):
            act = act.clone()
            kind.as_units(act)[rows, position, unit] = source[example, position, unit].to(act.dtype)
            return act

        hooks.append((kind.hook(layer), patch))
    return hooks
