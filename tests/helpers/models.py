"""Tiny HookedTransformers built from configs (no downloads), for tests and their worker processes."""

import torch


def make_model(dtype=torch.float64, seed=0, n_layers=2, d_vocab=23, normalization_type="LN"):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=16, d_head=8, n_heads=2, d_mlp=32, d_vocab=d_vocab, n_ctx=12,
        act_fn="gelu", normalization_type=normalization_type, device="cpu", seed=seed, dtype=dtype,
    )
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so their gradients are exercised too
        for name, p in model.named_parameters():
            if name.endswith((".b", ".w")) or ".b_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model
