"""``trace``: where in the forward pass a perturbation's effect travels. For each node (head output, MLP
output, residual stream; optionally MLP neurons) at each position up to the target, the effect on a metric of
patching that node from the perturbed run into the original run (noising: is its change sufficient?) or from
the original run into the perturbed run (denoising: is its change necessary?), by exact patching, AtP or AtP*."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..adapters import as_adapter
from ..adapters.bridge import is_bridge
from ..adapters.hooked import is_hooked_transformer
from ..examples import Examples, TokensLike
from ..interventions import ParameterDirection, perturb
from ..pefs.grads import as_examples
from ..progress import progress_bar
from .attribution import attribution_effects, check_qk_fix, qk_fix_problems
from .metrics import TraceMetric, trace_metric
from .nodes import DEFAULT_NODES, node_kinds
from .patching import patching_effects
from .result import Trace
from .runs import DIRECTIONS, run_pair


@dataclass(frozen=True)
class TraceMethod:
    """How node effects are obtained: exact patching, or attribution with or without AtP*'s two fixes."""

    name: str
    exact: bool = False
    qk_fix: bool = False
    grad_drop: bool = False


METHODS = {m.name: m for m in (TraceMethod("patching", exact=True), TraceMethod("atp"),
                               TraceMethod("atp*", qk_fix=True, grad_drop=True))}


def trace(
    model: nn.Module,
    perturbation,
    examples: Examples | TokensLike,
    *,
    magnitude: float | None = None,
    sign: int = 1,
    method: str | TraceMethod = "atp*",
    metric: str | TraceMetric = "kl",
    classes: int = 3,
    nodes: tuple[str, ...] = DEFAULT_NODES,
    direction: str = "noising",
    batch_size: int = 16,
    patch_batch: int = 256,
    progress: bool = True,
) -> Trace:
    """Trace ``perturbation`` on ``examples`` (their target positions) through ``model`` (a HookedTransformer
    or a TransformerBridge; AtP*'s QK fix covers causal dot-product attention with rotary embeddings and grouped-query
    attention, and refuses attention it does not reproduce, e.g. ALiBi or soft-capping: see ``method_for``).

    ``perturbation`` is a reusable context manager that changes the model (a ``ParameterPerturbation``, a
    dictionary's ``intervention(j, magnitude, sign)``, a ``HookIntervention``) or a ``ParameterDirection``
    applied at ``magnitude`` with ``sign``. ``method``: "patching" (exact, one forward per node and example),
    "atp" or "atp*" (QK fix + GradDrop). ``metric``: "kl" (KL of the patched vs the original prediction;
    attribution linearises the logits of the answer and the ``classes`` top tokens of the perturbed prediction)
    or "logprob" (change of the original answer's log-probability). ``nodes``: kinds from
    ``npeff_tl.tracing.NODE_KINDS``. ``direction``: "noising" patches the perturbed run's nodes into the original
    run; "denoising" patches the original run's nodes into the perturbed run (negative KL effects then remove
    part of the perturbation's effect). An effect is the patched run's metric minus the unpatched run's. The model
    is left exactly as it was (hooks removed, parameters restored)."""
    if not (is_hooked_transformer(model) or is_bridge(model)):
        raise TypeError(f"trace needs a transformer_lens.HookedTransformer or TransformerBridge, got "
                        f"{type(model).__name__}")
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        method = METHODS[method]
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if batch_size < 1 or patch_batch < 1:
        raise ValueError(f"batch_size and patch_batch must be >= 1, got {batch_size} and {patch_batch}")
    adapter = as_adapter(model)
    kinds = node_kinds(model, nodes)
    measure = trace_metric(metric, classes)
    if method.qk_fix:
        check_qk_fix(model.cfg)
    perturbation = _as_intervention(model, perturbation, magnitude, sign)
    examples = as_examples(examples, adapter=adapter)
    if len(examples) == 0:
        raise ValueError("no examples to trace")
    n_offsets = int(examples.position.max()) + 1
    hooks = [kind.hook(layer) for kind in kinds for layer in range(model.cfg.n_layers)]

    per_example = {kind.key: [] for kind in kinds}
    totals = []
    bar = progress_bar(total=len(examples), desc=f"trace ({method.name})", enabled=progress, unit="ex")
    for start in range(0, len(examples), batch_size):
        index = torch.arange(start, min(start + batch_size, len(examples)))
        tokens = examples.tokens[examples.seq_index[index]].to(adapter.device)
        runs = run_pair(adapter, tokens, examples.position[index].to(adapter.device), perturbation, hooks, direction)
        state = measure.state(runs.original, runs.perturbed, runs.base)
        totals.append(measure.value(runs.perturbed, state) - measure.value(runs.original, state))
        if method.exact:
            effects = patching_effects(adapter, runs, kinds, measure, state, patch_batch)
        else:
            effects = attribution_effects(adapter, runs, kinds, measure, state, qk_fix=method.qk_fix,
                                          grad_drop=method.grad_drop)
        for kind in kinds:
            by_offset = _by_offset(effects[kind.key], examples.position[index], n_offsets)
            per_example[kind.key].append(by_offset if kind.unit else by_offset[:, :, 0])
        bar.update(len(index))
    bar.close()
    settings = {"classes": getattr(measure, "n_classes", None), "nodes": [k.key for k in kinds],
                "direction": direction, "magnitude": magnitude, "sign": sign, "n_examples": len(examples),
                "batch_size": batch_size}
    return Trace(method.name, measure.name, {k: torch.cat(v) for k, v in per_example.items()}, torch.cat(totals),
                 settings)


def method_for(model, method: str) -> tuple[str, str | None]:
    """``method``, or "atp" where it is AtP* and the QK fix does not cover ``model``'s attention (ALiBi, soft-capping,
    sinks...: ``attribution.qk_fix_problems``), with the reason (None when nothing changed): what a run traces with
    when its configured method cannot run on this model."""
    problems = qk_fix_problems(model.cfg) if METHODS[method].qk_fix else []
    if not problems:
        return method, None
    return "atp", f"AtP*'s QK fix does not cover {', '.join(problems)}"


def _as_intervention(model, perturbation, magnitude: float | None, sign: int):
    if isinstance(perturbation, ParameterDirection):
        if magnitude is None:
            raise ValueError("a ParameterDirection needs magnitude= (how far to move along it)")
        return perturb(model, perturbation, perturbation.space, magnitude, sign)
    if isinstance(perturbation, Tensor):
        raise TypeError("a plain tensor carries no parameter space; wrap it as nt.ParameterDirection(vector, space) "
                        "or pass nt.perturb(model, vector, space, magnitude)")
    if not (hasattr(perturbation, "__enter__") and hasattr(perturbation, "__exit__")):
        raise TypeError(f"perturbation must be a context manager (e.g. nt.perturb(...), dictionary.intervention(j, "
                        f"magnitude, sign)) or a ParameterDirection, got {type(perturbation).__name__}")
    if magnitude is not None:
        raise ValueError("magnitude= applies to a ParameterDirection only; this intervention has its own")
    return perturbation


def _by_offset(effects: Tensor, targets: Tensor, n_offsets: int) -> Tensor:
    """[b, layers, units, pos] -> [b, layers, units, offset] with offset = target - pos (NaN where pos < 0)."""
    offsets = torch.arange(n_offsets)
    positions = targets[:, None] - offsets[None, :]  # [b, offsets]
    index = positions.clamp(0, effects.shape[-1] - 1)
    index = index[:, None, None, :].expand(*effects.shape[:3], n_offsets)
    out = effects.gather(3, index)
    return out.masked_fill((positions < 0)[:, None, None, :], torch.nan)
