"""The adapter for TransformerLens's ``HookedTransformer`` (transformer-lens < 4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from .base import Capture, LinearMap, ModelAdapter, select_first_arg, select_kwarg, select_output


def hooked_transformer_class() -> type | None:
    """TransformerLens's ``HookedTransformer``, or None where it has none (transformer-lens 4)."""
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        return None
    return HookedTransformer


def is_hooked_transformer(model: nn.Module) -> bool:
    cls = hooked_transformer_class()
    return cls is not None and isinstance(model, cls)


class _TargetLogits(nn.Module):
    """Runs a HookedTransformer to the final residual stream and unembeds only the target positions.

    Unembedding a handful of positions instead of all of them saves most of the cost of the unembedding
    (forward and backward), which dominates for large vocabularies. Where nothing observes the unembedding
    (no hook on it or its hook points), the same map is applied without calling the module: TransformerLens's
    ``Unembed`` copies W_U transposed on every call (at GPT-2's vocabulary ~0.1 s on a CPU, more than a 2-layer
    model's forward pass to the residual stream).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        from transformer_lens.components import Unembed
        from transformer_lens.utilities.activation_functions import apply_softcap

        model = self.model
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)  # [batch, seq, d_model], before ln_final
        index = positions[..., None].expand(*positions.shape, resid.shape[-1])
        resid = resid.gather(1, index)  # [batch, k, d_model]
        if model.cfg.normalization_type is not None:
            resid = model.ln_final(resid)
        unembed = model.unembed
        if _observed(unembed) or type(unembed) is not Unembed:
            logits = unembed(resid)
        else:
            logits = F.linear(resid, unembed.W_U.T, unembed.b_U)
        return apply_softcap(logits, model.cfg.output_logits_soft_cap)


def _observed(module: nn.Module) -> bool:
    """Whether calling ``module`` would run a hook (its own or one of its submodules', e.g. TransformerLens hook
    points), so that skipping the call would change what someone sees."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in module.modules())


class HookedTransformerAdapter(ModelAdapter):
    """Adapter for ``transformer_lens.HookedTransformer``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._target_logits = _TargetLogits(model)
        self._linear_maps: dict[str, LinearMap] | None = None

    def named_parameters(self) -> dict[str, Tensor]:
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
                    out = Capture(getattr(attn, f"hook_{letter.lower()}"), select_output)
                    maps[f"{prefix}.attn.W_{letter}"] = LinearMap(out, Capture(attn, select_kwarg(source)))
                    maps[f"{prefix}.attn.b_{letter}"] = LinearMap(out)
                maps[f"{prefix}.attn.W_O"] = LinearMap(Capture(attn, select_output), Capture(attn.hook_z, select_output))
                maps[f"{prefix}.attn.b_O"] = LinearMap(Capture(attn, select_output))
            if type(mlp) is MLP:
                pre = Capture(mlp.hook_pre, select_output)
                maps[f"{prefix}.mlp.W_in"] = LinearMap(pre, Capture(mlp, select_first_arg))
                maps[f"{prefix}.mlp.b_in"] = LinearMap(pre)
                maps[f"{prefix}.mlp.W_out"] = LinearMap(Capture(mlp, select_output), Capture(mlp.hook_post, select_output))
                maps[f"{prefix}.mlp.b_out"] = LinearMap(Capture(mlp, select_output))
        if type(model.unembed) is Unembed:
            logits = Capture(model.unembed, select_output)
            maps["unembed.W_U"] = LinearMap(logits, Capture(model.unembed, select_first_arg))
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


