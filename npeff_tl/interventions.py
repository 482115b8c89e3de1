"""Interventions: context managers that change a model's computation and restore it bit for bit on exit.

NPEFF perturbations move parameters along a direction in a ParamSpace (theta + sign * magnitude * d): g_j for
LRM-NPEFF, the Fisher-weighted step for D-NPEFF (docs/algorithms.md, "Perturbations"), random directions for
controls.
Entering saves the affected parameters and adds the step; leaving copies the saved values back (not a
subtraction, so nothing is lost to rounding), also when the block raises. Interventions nest, and they compose
with TransformerLens hooks (``model.hooks(...)``), which act on activations, not parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Float, Float64, Int
from torch import Tensor, nn

from .adapters import ModelAdapter, as_adapter
from .decomp import Decomposition
from .examples import Examples, TokensLike
from .params import ParamSpace
from .pefs.grads import as_examples, batch_target_logits, per_example_grads
from .pefs.objectives import CrossEntropy


class ParameterPerturbation:
    """Adds ``deltas`` (TL parameter name -> tensor of the parameter's shape) to a model's parameters while
    entered, and restores the exact previous values on exit. Reusable: it can be entered again after it exits
    (``kl_divergence`` enters it once per batch)."""

    def __init__(self, model: nn.Module | ModelAdapter, deltas: Mapping[str, Tensor]):
        self.params = as_adapter(model).named_parameters()
        unknown = [name for name in deltas if name not in self.params]
        if unknown:
            raise ValueError(f"no parameters named {unknown[:5]}; the model has e.g. {list(self.params)[:5]}")
        for name, delta in deltas.items():
            if tuple(delta.shape) != tuple(self.params[name].shape):
                raise ValueError(f"the step for {name} has shape {tuple(delta.shape)}, "
                                 f"the parameter {tuple(self.params[name].shape)}")
        self.deltas = dict(deltas)
        self._saved: dict[str, Tensor] | None = None

    def __enter__(self) -> ParameterPerturbation:
        if self._saved is not None:
            raise RuntimeError("this perturbation is already active; it cannot be nested inside itself")
        self._saved = {name: self.params[name].detach().clone() for name in self.deltas}
        try:
            with torch.no_grad():
                for name, delta in self.deltas.items():
                    param = self.params[name]
                    param.add_(delta.to(device=param.device, dtype=param.dtype))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        with torch.no_grad():
            for name, value in (self._saved or {}).items():
                self.params[name].copy_(value)
        self._saved = None


class HookIntervention:
    """TransformerLens forward hooks ``[(hook_name, fn), ...]`` active while entered (through ``model.hooks``, so
    only these hooks are removed on exit and the user's own hooks stay). Reusable, like ParameterPerturbation."""

    def __init__(self, model, fwd_hooks: list[tuple[str, Callable]]):
        known = set(getattr(model, "hook_dict", {}))
        unknown = [name for name, _ in fwd_hooks if name not in known]
        if unknown:
            raise ValueError(f"unknown hook names {unknown}; the model has e.g. {sorted(known)[:6]}")
        self.model, self.fwd_hooks = model, list(fwd_hooks)
        self._context = None

    def __enter__(self) -> HookIntervention:
        if self._context is not None:
            raise RuntimeError("this intervention is already active; it cannot be nested inside itself")
        self._context = self.model.hooks(fwd_hooks=self.fwd_hooks)
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        context, self._context = self._context, None
        context.__exit__(*exc)


@dataclass(frozen=True)
class ParameterDirection:
    """A direction together with the parameter space it is written in, so that ``perturb`` can refuse it for
    another space, even one of the same size (a plain tensor carries no such check)."""

    vector: Float[Tensor, " size"]
    space: ParamSpace

    def __post_init__(self):
        if tuple(self.vector.shape) != (self.space.size,):
            raise ValueError(f"the direction has shape {tuple(self.vector.shape)} but its space has {self.space.size} "
                             "entries")


def perturb(
    model: nn.Module | ModelAdapter,
    direction: Float[Tensor, " size"] | ParameterDirection,
    space: ParamSpace,
    magnitude: float,
    sign: int = 1,
) -> ParameterPerturbation:
    """theta + sign * magnitude * direction / ||direction|| over ``space``, as a ``ParameterPerturbation``."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    if isinstance(direction, ParameterDirection):
        if direction.space != space:
            raise ValueError(f"the direction was built for another parameter space ({direction.space}) than the one "
                             f"it is applied to ({space}); build it for this space")
        direction = direction.vector
    if tuple(direction.shape) != (space.size,):
        raise ValueError(f"the direction has shape {tuple(direction.shape)}; the space has {space.size} entries")
    norm = float(torch.linalg.vector_norm(direction.double()))
    if norm == 0:
        raise ValueError("the direction is zero; nothing to perturb along")
    step = direction.double() * (sign * magnitude / norm)  # cast to each parameter's dtype when applied
    return ParameterPerturbation(model, space.to_named(step))


def lrm_direction(decomposition: Decomposition, j: int, max_abs_cos: float | None = None) -> Float[Tensor, " size"]:
    """The unit direction of LRM-NPEFF component ``j`` over the whole ParamSpace.

    With ``max_abs_cos`` (the reference's semi-orthogonalisation), the component is rejected, in index order,
    from every other unit component whose |cosine| with it is at most ``max_abs_cos``; more similar ones are
    left alone."""
    if decomposition.kind != "lowrank":
        raise ValueError("lrm_direction needs an LRM-NPEFF decomposition; D-NPEFF components are diagonals")
    G = decomposition.G.double()
    units = G / torch.linalg.vector_norm(G, dim=1, keepdim=True).clamp(min=1e-300)
    direction = units[j].clone()
    if max_abs_cos is not None:
        for i in range(len(units)):
            if i != j and float((units[i] @ units[j]).abs()) <= max_abs_cos:
                direction -= (direction @ units[i]) * units[i]
    direction /= torch.linalg.vector_norm(direction).clamp(min=1e-300)
    full = torch.zeros(decomposition.space.size, dtype=torch.float64)
    full[decomposition.kept_columns] = direction.cpu()
    return full.to(decomposition.G.dtype)


def random_direction(space: ParamSpace, seed: int = 0, support: Tensor | None = None) -> ParameterDirection:
    """A control: a Gaussian direction over the whole space, or only on ``support`` (indices or a boolean
    mask over the space), drawn from ``seed``; ``perturb`` applies it to this space only."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(space.size, generator=g)
    if support is not None:
        support = torch.as_tensor(support)
        mask = support if support.dtype == torch.bool else torch.zeros(space.size, dtype=torch.bool).index_fill_(0, support.long(), True)
        direction = direction * mask
    return ParameterDirection(direction, space)


def _log_probs_in_batches(
    model: nn.Module | ModelAdapter, examples: Examples | TokensLike, batch_size: int
) -> Iterator[Callable[[], Tensor]]:
    """Per batch of examples, a function that computes the float64 log-probabilities at their target positions
    (without gradients) under whatever interventions are active when it is called."""
    adapter = as_adapter(model)
    examples = as_examples(examples, adapter=adapter)
    for start in range(0, len(examples), batch_size):
        index = torch.arange(start, min(start + batch_size, len(examples)))

        def log_probs(index=index) -> Tensor:
            with torch.no_grad():
                return batch_target_logits(adapter, examples, index).double().log_softmax(-1).cpu()

        yield log_probs


def target_log_probs(model: nn.Module | ModelAdapter, examples: Examples | TokensLike,
                     batch_size: int = 64) -> Float64[Tensor, "n vocab"]:
    """Log-probabilities at the target positions (float64, CPU) under any interventions active around the call."""
    return torch.cat([log_probs() for log_probs in _log_probs_in_batches(model, examples, batch_size)])


def kl_rows(p: Float[Tensor, "n vocab"], q: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """KL(p || q) per row, from log-probabilities."""
    return (p.exp() * (p - q)).sum(-1).clamp(min=0)


def kl_divergence(
    model: nn.Module | ModelAdapter,
    examples: Examples | TokensLike,
    intervention=None,
    *,
    reverse: bool = False,
    batch_size: int = 64,
) -> Float[Tensor, " n"]:
    """KL between the predictive distributions at the target positions with and without ``intervention`` (a
    reusable context manager such as ``ParameterPerturbation``, entered once per batch; None for none):
    KL(perturbed || original) by default, KL(original || perturbed) with ``reverse``. Float64, per example."""
    out = []
    for log_probs in _log_probs_in_batches(model, examples, batch_size):
        original = log_probs()
        if intervention is None:
            changed = original
        else:
            with intervention:
                changed = log_probs()
        out.append(kl_rows(original, changed) if reverse else kl_rows(changed, original))
    return torch.cat(out)


class KLProbe:
    """A fixed set of examples with their original predictive distributions (computed once): per-example KL and
    correctness under any intervention, for all examples or a subset. ``answers`` default to the original top
    predictions (so "correct" then means "prediction unchanged")."""

    def __init__(self, model: nn.Module | ModelAdapter, examples: Examples | TokensLike,
                 answers: Int[Tensor, " n"] | None = None, *, reverse: bool = False, batch_size: int = 64):
        self.model, self.examples = as_adapter(model), as_examples(examples)
        self.reverse, self.batch_size = reverse, batch_size
        self.original = target_log_probs(self.model, self.examples, batch_size)
        self.answers = self.original.argmax(-1) if answers is None else torch.as_tensor(answers).cpu()
        self.correct = (self.original.argmax(-1) == self.answers).double()

    def __len__(self) -> int:
        return len(self.examples)

    def run(self, intervention, index: Int[Tensor, " k"] | None = None) -> tuple[Float64[Tensor, " k"], Float64[Tensor, " k"]]:
        """(KL per example, 1.0 where the answer is still the top prediction) under ``intervention``, entered once,
        for examples ``index`` (all when None)."""
        index = torch.arange(len(self.examples)) if index is None else torch.as_tensor(index)
        with intervention:
            changed = target_log_probs(self.model, self.examples.subset(index), self.batch_size)
        original = self.original[index]
        kl = kl_rows(original, changed) if self.reverse else kl_rows(changed, original)
        return kl, (changed.argmax(-1) == self.answers[index]).double()


def calibrate_magnitude(
    mean_kl: Callable[[float], float], target: float, start: float, rtol: float = 0.05, max_steps: int = 40,
    limit: float = math.inf,
) -> tuple[float, float, bool]:
    """A magnitude m <= ``limit`` with mean_kl(m) within ``rtol`` of ``target``: steps of x4 from ``start`` until
    the target is bracketed, then geometric bisection (KL is continuous in m, so a bracket holds a solution).
    Returns (m, mean_kl(m), reached); when the target is not reached, the closest magnitude seen."""
    low, high, m = 0.0, math.inf, min(start, limit)
    best = (math.inf, start, math.nan)
    for _ in range(max_steps):
        kl = mean_kl(m)
        miss = abs(kl / target - 1)
        if miss < best[0]:
            best = (miss, m, kl)
        if miss <= rtol:
            return m, kl, True
        if kl < target:
            if m >= limit:
                break
            low = m
        else:
            high = m
        m = min(m * 4, limit) if high == math.inf else (high / 4 if low == 0 else math.sqrt(low * high))
    return best[1], best[2], False


def accuracy(model: nn.Module | ModelAdapter, examples: Examples | TokensLike, answers: Int[Tensor, " n"],
             batch_size: int = 64) -> Float[Tensor, " n"]:
    """1.0 where the top prediction at the target position is the answer, else 0.0 (under any interventions
    active around the call)."""
    predicted = target_log_probs(model, examples, batch_size).argmax(-1)
    return (predicted == torch.as_tensor(answers).cpu()).double()


# ---------------------------------------------------------------------------------- D-NPEFF perturbations
def sign_pattern(
    model: nn.Module | ModelAdapter,
    examples: Examples | TokensLike,
    space: ParamSpace,
    answers: Int[Tensor, " n"] | None = None,
    *,
    batch_size: int = 8,
) -> Float[Tensor, " size"]:
    """sign(sum over ``examples`` of grad_theta -log p(answer)), over ``space`` (answers default to the model's
    own top predictions). Stepping along minus this pattern is a sign-gradient descent step on their loss."""
    examples = as_examples(examples)
    if answers is None:
        answers = target_log_probs(model, examples).argmax(-1)
    total = torch.zeros(space.size, dtype=torch.float64)
    for block in per_example_grads(model, examples, space, CrossEntropy(answers), batch_size=batch_size,
                                   progress=False):
        total += block.grads[:, 0].double().sum(0).cpu()
    return torch.sign(total)


def dnpeff_direction(
    decomposition: Decomposition,
    j: int,
    dataset_fisher: Float[Tensor, " size"],
    signs: Float[Tensor, " size"],
    mix: float = 0.5,
    floor: float = 1e-6,
) -> Float64[Tensor, " size"]:
    """The Fisher-weighted D-NPEFF perturbation of component ``j`` as a direction d, so that theta + delta * d is
    theta - delta * s o (mix h) / ((1 - mix) F + mix h), with h the component and F the dataset-level Fisher
    (each scaled to unit L2 norm, F floored at ``floor``) and s the sign pattern of the component's top examples.
    Parameters where the component dominates the dataset Fisher move by about delta, the others barely move;
    ``mix`` in (0, 1) trades one against the other (mix -> 1: a sign step on the whole support)."""
    if decomposition.kind != "diagonal":
        raise ValueError("dnpeff_direction needs a D-NPEFF decomposition; use lrm_direction for LRM-NPEFF")
    if not 0 < mix < 1:
        raise ValueError(f"mix must be in (0, 1), got {mix}")
    size = decomposition.space.size
    if dataset_fisher.shape != (size,) or signs.shape != (size,):
        raise ValueError(f"dataset_fisher and signs need one entry per parameter of the space ({size}); got "
                         f"{tuple(dataset_fisher.shape)} and {tuple(signs.shape)}")
    h = decomposition.full(j).double().cpu()
    fisher = dataset_fisher.double().cpu()
    h = h / torch.linalg.vector_norm(h).clamp(min=1e-300)
    fisher = (fisher / torch.linalg.vector_norm(fisher).clamp(min=1e-300)).clamp(min=floor)
    return -signs.double().cpu() * (mix * h) / ((1 - mix) * fisher + mix * h)
