"""Parameter perturbations: context managers that move a model's parameters and restore them bit for bit on exit.

NPEFF perturbations move parameters along a direction in a ParamSpace (theta + sign * magnitude * d): g_j for
LRM-NPEFF, the Fisher-weighted step for D-NPEFF (``directions``; docs/algorithms.md, "Perturbations"), random
directions for controls. Entering saves the affected parameters and adds the step; leaving copies the saved
values back (not a subtraction, so nothing is lost to rounding), also when the block raises. Interventions nest,
and they compose with TransformerLens hooks (``model.hooks(...)``), which act on activations, not parameters;
``HookIntervention`` is the activation-side counterpart for dictionaries that act at a hook.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..adapters import ModelAdapter, as_adapter
from ..params import ParamSpace


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
