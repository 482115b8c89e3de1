"""Per-example objectives: the scalars whose parameter gradients ``per_example_grads`` computes.

An objective maps the logits at an example's target position, plus that example's auxiliary data (an answer
token, class ids...), to ``n_outputs`` scalars. It must be written with vmap-safe operations (``gather``,
not Python indexing on tensors), because it runs inside ``torch.func`` transforms.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..targets import ClassRule, TopK


class Objective(ABC):
    """Scalars per example; ``aux`` holds per-example data (a tensor or a dict of tensors), row i for example i."""

    n_outputs: int = 1
    aux: Tensor | dict[str, Tensor] | None = None

    @abstractmethod
    def __call__(self, logits: Float[Tensor, "*batch vocab"], aux) -> Float[Tensor, "*batch k"]:
        """The objective values (last dimension ``n_outputs``) from logits and per-example aux rows."""


ObjectiveFor = Callable[[Tensor], Objective]
"""Picks a batch's objective from its logits at the target positions (detached, [b, vocab]); the objective's
``aux`` holds the rows of those b examples. PEFs use one to choose classes from the forward pass they
differentiate."""


def _gather(log_probs: Tensor, ids: Tensor) -> Tensor:
    return log_probs.gather(-1, ids.long().clamp(min=0))


class AnswerLogProb(Objective):
    """log p(answer) at the target position."""

    def __init__(self, answers: Int[Tensor, " n_examples"]):
        self.aux = torch.as_tensor(answers, dtype=torch.long).reshape(-1, 1)

    def __call__(self, logits, aux):
        return _gather(logits.log_softmax(-1), aux)


class CrossEntropy(Objective):
    """The loss -log p(label) at the target position."""

    def __init__(self, labels: Int[Tensor, " n_examples"]):
        self.aux = torch.as_tensor(labels, dtype=torch.long).reshape(-1, 1)

    def __call__(self, logits, aux):
        return -_gather(logits.log_softmax(-1), aux)


class ClassLogProbs(Objective):
    """scale_c * log p_c for given class ids per example, under a class rule's distribution.

    With ``scale = sqrt(w_c)`` the gradients are the PEF factor columns u_c = sqrt(w_c) grad log p_c directly.
    Ids of -1 (padding) give log p_0; give them scale 0.
    """

    def __init__(self, class_ids: Int[Tensor, "n_examples k"], rule: ClassRule = TopK(), scale: Tensor | None = None):
        ids = torch.as_tensor(class_ids, dtype=torch.long)
        scale = torch.ones(ids.shape, dtype=torch.float64) if scale is None else torch.as_tensor(scale)
        if scale.shape != ids.shape:
            raise ValueError(f"scale has shape {tuple(scale.shape)} but class_ids has shape {tuple(ids.shape)}")
        self.aux = {"ids": ids, "scale": scale}
        self.n_outputs = int(ids.shape[1])
        self.rule = rule

    def __call__(self, logits, aux):
        return _gather(self.rule.log_probs(logits), aux["ids"]) * aux["scale"].to(logits.dtype)


class FunctionObjective(Objective):
    """Any vmap-safe function ``fn(logits [..., vocab], aux [..., *]) -> [..., n_outputs]``."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], aux: Tensor, n_outputs: int = 1):
        self.fn, self.aux, self.n_outputs = fn, torch.as_tensor(aux), n_outputs

    def __call__(self, logits, aux):
        return self.fn(logits, aux)
