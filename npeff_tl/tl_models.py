"""Models in HookedTransformer's layout on either TransformerLens: the zoo and ``save_checkpoint`` directories keep a
HookedTransformerConfig and a HookedTransformer state dict. transformer-lens < 4 builds a ``HookedTransformer``
from them; 4.x, which has none, builds a native ``TransformerBridge`` from the same settings and converts the state
dict into its layout (TransformerLens's own ``convert_tl_checkpoint``), so the same files run on both."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .adapters.hooked import hooked_transformer_class


def build_model(config: dict[str, Any], tokenizer=None) -> nn.Module:
    """An untrained model of the HookedTransformerConfig settings ``config`` (``device``, ``seed``, ``dtype`` as
    a torch dtype or its name, ...)."""
    config = dict(config)
    if isinstance(config.get("dtype"), str):
        config["dtype"] = getattr(torch, config["dtype"])
    if (hooked := hooked_transformer_class()) is not None:
        from transformer_lens import HookedTransformerConfig

        with warnings.catch_warnings():  # TL 3.9 steers new code to TransformerBridge; these files are HookedTransformer's
            warnings.simplefilter("ignore", DeprecationWarning)
            return hooked(HookedTransformerConfig.from_dict(config), tokenizer=tokenizer)
    from transformer_lens import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    device, dtype = config.pop("device", None), config.get("dtype")
    return TransformerBridge.boot_native(TransformerBridgeConfig(**config), tokenizer=tokenizer, device=device,
                                         dtype=dtype, model_name=config.get("model_name") or "native")


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a HookedTransformer state dict into ``model`` (strict), converting it for a native bridge."""
    if hooked_transformer_class() is None:
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

        state_dict = convert_tl_checkpoint(state_dict, model.cfg)
    model.load_state_dict(state_dict, strict=True)
