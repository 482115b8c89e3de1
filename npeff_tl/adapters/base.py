"""What npeff_tl needs from a model (``ModelAdapter``), how a parameter acts as a linear map (``LinearMap``), and
``as_adapter``, which picks the adapter for a model's class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn


@dataclass(frozen=True)
class Capture:
    """A tensor of the forward pass: ``select(args, kwargs, output)`` of one call of ``module``."""

    module: nn.Module
    select: Callable[[tuple, dict, Any], Tensor]


@dataclass(frozen=True)
class LinearMap:
    """How a parameter acts at every position: a weight as ``y = x @ W`` (``input`` captures x), a bias as
    ``y = ... + b`` (``input`` is None). Shapes: x [batch, pos, (head), d_in], y [batch, pos, (head), d_out],
    W [(head), d_in, d_out], b [(head), d_out]. ``output_heads``: y arrives as [batch, pos, heads * d_out], its
    heads side by side (a Hugging Face projection), and is split into them before use. Per-example gradients
    of such parameters follow from x and the gradient at y alone (see ``pefs.linear_grads``)."""

    output: Capture
    input: Capture | None = None
    output_heads: int = 0


def select_output(args, kwargs, output):
    return output


def select_first_arg(args, kwargs, output):
    return args[0]


def select_kwarg(name: str) -> Callable[[tuple, dict, Any], Tensor]:
    def select(args, kwargs, output):
        return kwargs[name]

    return select


class ModelAdapter(ABC):
    """What npeff_tl needs from a model."""

    model: nn.Module

    @abstractmethod
    def named_parameters(self) -> dict[str, Tensor]:
        """All parameters under TransformerLens names, in the model's own order."""

    @abstractmethod
    def target_logits(
        self,
        tokens: Int[Tensor, "batch seq"],
        positions: Int[Tensor, "batch k"],
        params: Mapping[str, Tensor] | None = None,
    ) -> Float[Tensor, "batch k vocab"]:
        """Logits predicted at ``positions`` of each sequence; ``params`` replaces parameters by name."""

    @abstractmethod
    def config_summary(self) -> dict[str, Any]:
        """A JSON-able description of the model, saved with results."""

    def parameters_behind(self, names: list[str]) -> list[nn.Parameter]:
        """The model's own parameters that hold ``names`` (the same tensors, unless the adapter shows the model's
        parameters in another layout: then the ones the views are taken of). Gradients flow to these."""
        params = self.named_parameters()
        return list({id(params[n]): params[n] for n in names}.values())

    def linear_maps(self) -> dict[str, LinearMap]:
        """Parameters (by name) whose per-example gradients may come from captured activations; the rest
        go through ``torch.func``. The default, no parameters, is always correct."""
        return {}

    def hooks(self, fwd_hooks: list[tuple[str, Callable]]):
        """A context manager adding forward hooks ``(hook name, fn(activation, hook))`` to a TransformerLens model
        (``model.hooks``), removed on exit."""
        return self.model.hooks(fwd_hooks=fwd_hooks)

    @property
    def vocab_size(self) -> int | None:
        """The number of token ids the model embeds (None: unknown, so token ids go unchecked)."""
        return None

    @property
    def ignores_padding(self) -> bool:
        """Whether right-padding can never change a prediction (causal attention); else padded batches are refused."""
        return True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def as_adapter(model: nn.Module | ModelAdapter) -> ModelAdapter:
    """Wrap ``model`` in the adapter for its class (an adapter is returned unchanged)."""
    if isinstance(model, ModelAdapter):
        return model
    from .bridge import BridgeAdapter, is_bridge
    from .hooked import HookedTransformerAdapter, is_hooked_transformer

    if is_hooked_transformer(model):
        return HookedTransformerAdapter(model)
    if is_bridge(model):
        return BridgeAdapter(model)
    raise TypeError(
        f"npeff_tl does not know how to run a {type(model).__name__}: pass a transformer_lens.HookedTransformer "
        "or TransformerBridge, or wrap your model in a subclass of npeff_tl.adapters.ModelAdapter."
    )
