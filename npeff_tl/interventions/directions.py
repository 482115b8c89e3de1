"""The directions NPEFF components perturb along: g_j for LRM-NPEFF (optionally semi-orthogonalised), and the
Fisher-weighted step of D-NPEFF with the sign pattern of the component's top examples (docs/algorithms.md,
"Perturbations")."""

from __future__ import annotations

import torch
from jaxtyping import Float, Float64, Int
from torch import Tensor, nn

from ..adapters import ModelAdapter
from ..decomp import Decomposition
from ..examples import Examples, TokensLike
from ..params import ParamSpace
from ..pefs.grads import as_examples, per_example_grads
from ..pefs.objectives import CrossEntropy
from .probes import target_log_probs


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
