"""Tiny models in HookedTransformer's layout built from configs (no downloads), for tests and their worker
processes: a HookedTransformer on transformer-lens < 4, a native TransformerBridge of the same settings on 4.x."""

import torch


def make_model(dtype=torch.float64, seed=0, n_layers=2, d_vocab=23, normalization_type="LN"):
    import npeff_tl as nt
    from npeff_tl.tl_models import build_model

    model = build_model(dict(n_layers=n_layers, d_model=16, d_head=8, n_heads=2, d_mlp=32, d_vocab=d_vocab, n_ctx=12,
                             act_fn="gelu", normalization_type=normalization_type, device="cpu", seed=seed,
                             dtype=dtype)).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so their gradients are exercised too
        for name, p in nt.as_adapter(model).named_parameters().items():
            if name.endswith((".b", ".w")) or ".b_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def unembed_bias(model) -> list[str]:
    """["unembed.b_U"] where the model trains an unembedding bias (a native TransformerBridge keeps it as a
    constant buffer, not a parameter), else []."""
    import npeff_tl as nt

    return ["unembed.b_U"] if "unembed.b_U" in nt.as_adapter(model).named_parameters() else []
