"""Interventions: context managers that change a model's computation and restore it bit for bit on exit.

NPEFF perturbations move parameters along a direction in a ParamSpace (theta + sign * magnitude * d).
Entering saves the affected parameters and adds the step; leaving copies the saved values back (not a
subtraction, so nothing is lost to rounding), also when the block raises. Interventions nest, and they compose
with TransformerLens hooks (``model.hooks(...)``), which act on activations, not parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from .adapters import ModelAdapter, as_adapter
from .decomp import Decomposition
from .examples import Examples, TokensLike
from .params import ParamSpace
from .pefs.grads import as_examples, batch_target_logits


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


def perturb(
    model: nn.Module | ModelAdapter,
    direction: Float[Tensor, " size"],
    space: ParamSpace,
    magnitude: float,
    sign: int = 1,
) -> ParameterPerturbation:
    """theta + sign * magnitude * direction / ||direction|| over ``space``, as a ``ParameterPerturbation``."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
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


def random_direction(space: ParamSpace, seed: int = 0, support: Tensor | None = None) -> Float[Tensor, " size"]:
    """A control: a Gaussian direction over the whole space, or only on ``support`` (indices or a boolean
    mask over the space), drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(space.size, generator=g)
    if support is not None:
        support = torch.as_tensor(support)
        mask = support if support.dtype == torch.bool else torch.zeros(space.size, dtype=torch.bool).index_fill_(0, support.long(), True)
        direction = direction * mask
    return direction


def _log_probs_in_batches(
    model: nn.Module | ModelAdapter, examples: Examples | TokensLike, batch_size: int
) -> Iterator[Callable[[], Tensor]]:
    """Per batch of examples, a function that computes the float64 log-probabilities at their target positions
    (without gradients) under whatever interventions are active when it is called."""
    adapter, examples = as_adapter(model), as_examples(examples)
    for start in range(0, len(examples), batch_size):
        index = torch.arange(start, min(start + batch_size, len(examples)))

        def log_probs(index=index) -> Tensor:
            with torch.no_grad():
                return batch_target_logits(adapter, examples, index).double().log_softmax(-1).cpu()

        yield log_probs


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
        p, q = (original, changed) if reverse else (changed, original)
        out.append((p.exp() * (p - q)).sum(-1).clamp(min=0))
    return torch.cat(out)


def accuracy(model: nn.Module | ModelAdapter, examples: Examples | TokensLike, answers: Int[Tensor, " n"],
             batch_size: int = 64) -> Float[Tensor, " n"]:
    """1.0 where the top prediction at the target position is the answer, else 0.0 (under any interventions
    active around the call)."""
    predicted = torch.cat([log_probs().argmax(-1) for log_probs in _log_probs_in_batches(model, examples, batch_size)])
    return (predicted == torch.as_tensor(answers).cpu()).double()
