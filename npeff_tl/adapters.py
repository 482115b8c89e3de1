"""Model adapters: the only place that knows how a model class stores parameters and computes logits.

The core asks an adapter for (a) the model's parameters under TransformerLens names and (b) the logits at
chosen token positions, optionally with some parameters replaced (for ``torch.func`` transforms). Supporting
another model class (e.g. TransformerBridge) means writing one more adapter, not touching the core.
"""

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
    W [(head), d_in, d_out], b [(head), d_out]. Per-example gradients of such parameters follow from x and
    the gradient at y alone (see ``pefs.linear_grads``)."""

    output: Capture
    input: Capture | None = None


def _output(args, kwargs, output):
    return output


def _first_arg(args, kwargs, output):
    return args[0]


def _kwarg(name: str) -> Callable[[tuple, dict, Any], Tensor]:
    def select(args, kwargs, output):
        return kwargs[name]

    return select


class ModelAdapter(ABC):
    """What npeff_tl needs from a model."""

    model: nn.Module

    @abstractmethod
    def named_parameters(self) -> dict[str, nn.Parameter]:
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

    def linear_maps(self) -> dict[str, LinearMap]:
        """Parameters (by name) whose per-example gradients may come from captured activations; the rest
        go through ``torch.func``. The default, no parameters, is always correct."""
        return {}

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


class _TargetLogits(nn.Module):
    """Runs a HookedTransformer to the final residual stream and unembeds only the target positions.

    Unembedding a handful of positions instead of all of them saves most of the cost of the unembedding
    (forward and backward), which dominates for large vocabularies.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        from transformer_lens.utilities.activation_functions import apply_softcap

        model = self.model
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)  # [batch, seq, d_model], before ln_final
        index = positions[..., None].expand(*positions.shape, resid.shape[-1])
        resid = resid.gather(1, index)  # [batch, k, d_model]
        if model.cfg.normalization_type is not None:
            resid = model.ln_final(resid)
        return apply_softcap(model.unembed(resid), model.cfg.output_logits_soft_cap)


class HookedTransformerAdapter(ModelAdapter):
    """Adapter for ``transformer_lens.HookedTransformer``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._target_logits = _TargetLogits(model)
        self._linear_maps: dict[str, LinearMap] | None = None

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    @property
    def vocab_size(self) -> int:
        return int(self.model.cfg.d_vocab)

    @property
    def ignores_padding(self) -> bool:
        return getattr(self.model.cfg, "attention_dir", "causal") != "bidirectional"  # TL masks no padding there

    def target_logits(
        self,
        tokens: Int[Tensor, "batch seq"],
        positions: Int[Tensor, "batch k"],
        params: Mapping[str, Tensor] | None = None,
    ) -> Float[Tensor, "batch k vocab"]:
        if params is None:
            return self._target_logits(tokens, positions)
        renamed = {f"model.{name}": value for name, value in params.items()}
        return torch.func.functional_call(self._target_logits, renamed, (tokens, positions), strict=False)

    def linear_maps(self) -> dict[str, LinearMap]:
        """Attention Q/K/V/O, MLP in/out (plain ``Attention`` and ``MLP`` modules) and the unembedding.

        Variants whose parameters act differently (grouped-query attention, gated or MoE MLPs, 4-bit weights)
        are left out, so they fall back to ``torch.func``.
        """
        if self._linear_maps is None:
            self._linear_maps = self._find_linear_maps()
        return self._linear_maps

    def _find_linear_maps(self) -> dict[str, LinearMap]:
        from transformer_lens.components import MLP, Attention, Unembed

        model, maps = self.model, {}
        if getattr(model.cfg, "load_in_4bit", False):
            return maps
        for layer, block in enumerate(model.blocks):
            prefix = f"blocks.{layer}"
            attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
            if type(attn) is Attention:
                for letter, source in (("Q", "query_input"), ("K", "key_input"), ("V", "value_input")):
                    out = Capture(getattr(attn, f"hook_{letter.lower()}"), _output)
                    maps[f"{prefix}.attn.W_{letter}"] = LinearMap(out, Capture(attn, _kwarg(source)))
                    maps[f"{prefix}.attn.b_{letter}"] = LinearMap(out)
                maps[f"{prefix}.attn.W_O"] = LinearMap(Capture(attn, _output), Capture(attn.hook_z, _output))
                maps[f"{prefix}.attn.b_O"] = LinearMap(Capture(attn, _output))
            if type(mlp) is MLP:
                pre = Capture(mlp.hook_pre, _output)
                maps[f"{prefix}.mlp.W_in"] = LinearMap(pre, Capture(mlp, _first_arg))
                maps[f"{prefix}.mlp.b_in"] = LinearMap(pre)
                maps[f"{prefix}.mlp.W_out"] = LinearMap(Capture(mlp, _output), Capture(mlp.hook_post, _output))
                maps[f"{prefix}.mlp.b_out"] = LinearMap(Capture(mlp, _output))
        if type(model.unembed) is Unembed:
            logits = Capture(model.unembed, _output)
            maps["unembed.W_U"] = LinearMap(logits, Capture(model.unembed, _first_arg))
            maps["unembed.b_U"] = LinearMap(logits)
        params = self.named_parameters()
        return {name: m for name, m in maps.items() if name in params}

    def config_summary(self) -> dict[str, Any]:
        cfg = self.model.cfg
        keys = [
            "model_name", "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx",
            "act_fn", "normalization_type", "positional_embedding_type",
        ]
        summary = {key: getattr(cfg, key, None) for key in keys}
        summary["class"] = type(self.model).__name__
        summary["dtype"] = str(self.dtype).removeprefix("torch.")
        return summary


def as_adapter(model: nn.Module | ModelAdapter) -> ModelAdapter:
    """Wrap ``model`` in the adapter for its class (an adapter is returned unchanged)."""
    if isinstance(model, ModelAdapter):
        return model
    from transformer_lens import HookedTransformer

    if isinstance(model, HookedTransformer):
        return HookedTransformerAdapter(model)
    raise TypeError(
        f"npeff_tl does not know how to run a {type(model).__name__}: pass a transformer_lens.HookedTransformer "
        "or wrap your model in a subclass of npeff_tl.adapters.ModelAdapter."
    )
