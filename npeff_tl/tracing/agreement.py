"""How well an estimated trace ranks nodes like a reference (exact patching): Spearman correlation of the
mean effects' magnitudes over every node present in both, and recall of the reference's top nodes."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from .result import Trace


def ranks(x: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Ranks 1..n, ties given their average rank."""
    order = x.argsort(stable=True)
    sorted_x = x[order]
    rank = torch.empty(len(x), dtype=torch.float64)
    start = 0
    for run in torch.unique_consecutive(sorted_x, return_counts=True)[1].tolist():
        rank[order[start:start + run]] = start + (run + 1) / 2
        start += run
    return rank


def spearman(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Spearman's rank correlation (Pearson correlation of tie-averaged ranks); NaN when either is constant."""
    ra, rb = ranks(a.double()), ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float(ra @ rb) / denominator if denominator > 0 else float("nan")


def agreement(reference: Trace, estimate: Trace, kinds: tuple[str, ...] = ("attn.hook_z", "hook_mlp_out"),
              top: int = 10, among: int = 20) -> dict[str, float]:
    """Over all nodes of ``kinds`` x offsets present in both (mean |effect|): ``spearman``, and ``recall``, the
    share of the reference's ``top`` nodes among the estimate's ``among`` largest."""
    kinds = tuple(k for k in kinds if k in reference.per_example and k in estimate.per_example)
    if not kinds:
        raise ValueError("the two traces share no node kinds to compare")
    ref = torch.cat([reference.effects[k].flatten() for k in kinds]).abs()
    est = torch.cat([estimate.effects[k].flatten() for k in kinds]).abs()
    present = ~(ref.isnan() | est.isnan())
    ref, est = ref[present], est[present]
    top_ref = set(ref.topk(min(top, len(ref))).indices.tolist())
    top_est = set(est.topk(min(among, len(est))).indices.tolist())
    return {"spearman": spearman(ref, est), "recall": len(top_ref & top_est) / max(1, len(top_ref))}

