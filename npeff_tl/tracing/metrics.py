"""What a trace measures at the target position: how patching a node changes the prediction.

``KL``: KL(patched || original) of the predictive distributions (the default; the same divergence selectivity
uses). ``AnswerLogProb``: the change of the log-probability of the original top prediction. Both give exact
effects from patched log-probabilities, and say which scalar outputs attribution methods linearise and how the
metric follows from their linearised changes.

KL has zero gradient at the original run (it is minimal there), so linearising the KL itself would estimate
every node's effect as 0. Attribution therefore linearises the network up to the logits of a few classes (the
original answer and the ``classes`` most probable tokens of the perturbed prediction, those that gain the
mass) and evaluates the KL exactly on the changed logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..interventions.probes import kl_rows


@dataclass(frozen=True)
class MetricState:
    """Per example: the linearised classes and the original log-probabilities, from the original and perturbed runs."""

    original: Float[Tensor, "b vocab"]  # log-probabilities, float64
    classes: Int[Tensor, "b m"]

    def rows(self, index: Tensor) -> MetricState:
        return MetricState(self.original[index], self.classes[index])


class TraceMetric(ABC):
    name: str

    @abstractmethod
    def state(self, original: Float[Tensor, "b vocab"], perturbed: Float[Tensor, "b vocab"]) -> MetricState:
        """What the metric needs from the original and perturbed log-probabilities (float64)."""

    @abstractmethod
    def exact(self, patched: Float[Tensor, "r vocab"], state: MetricState) -> Float[Tensor, " r"]:
        """The effect of a patch from the patched log-probabilities (``state`` rows match)."""

    @abstractmethod
    def outputs(self, logits: Float[Tensor, "b vocab"], state: MetricState) -> Float[Tensor, "b m"]:
        """The scalars that attribution linearises (with gradients)."""

    @abstractmethod
    def estimate(self, delta: Float[Tensor, "*nodes b m"], state: MetricState) -> Float[Tensor, "*nodes b"]:
        """The effect estimated from linearised changes ``delta`` of the outputs."""


class KL(TraceMetric):
    """KL(patched || original) at the target position; attribution linearises the logits of the original
    answer and of the ``classes`` top tokens of the perturbed prediction."""

    name = "kl"

    def __init__(self, classes: int = 3):
        if classes < 1:
            raise ValueError(f"classes must be >= 1 (tokens of the perturbed prediction to linearise), got {classes}")
        self.n_classes = classes

    def state(self, original, perturbed):
        answer = original.argmax(-1, keepdim=True)
        others = perturbed.scatter(1, answer, -torch.inf)
        top = others.topk(min(self.n_classes, others.shape[1] - 1), dim=1).indices
        return MetricState(original, torch.cat([answer, top], 1))

    def exact(self, patched, state):
        return kl_rows(patched, state.original)

    def outputs(self, logits, state):
        return logits.gather(1, state.classes.to(logits.device))

    def estimate(self, delta, state):
        # Only the linearised classes' logits move; the rest of the vocabulary keeps its logits.
        logp = state.original.gather(1, state.classes)  # [b, m]
        rest = state.original.scatter(1, state.classes, -torch.inf).logsumexp(1)  # log of the others' mass
        shifted = logp + delta.double()
        log_z = torch.logaddexp(shifted.logsumexp(-1), rest)  # how the log-normaliser moves
        q = (shifted - log_z[..., None]).exp()
        return ((q * delta.double()).sum(-1) - log_z).clamp(min=0)


class AnswerLogProb(TraceMetric):
    """log p(original answer | patched) - log p(original answer | original): negative where the patch hurts."""

    name = "logprob"

    def state(self, original, perturbed):
        return MetricState(original, original.argmax(-1, keepdim=True))

    def exact(self, patched, state):
        return (patched.gather(1, state.classes) - state.original.gather(1, state.classes))[:, 0]

    def outputs(self, logits, state):
        return logits.log_softmax(-1).gather(1, state.classes.to(logits.device))

    def estimate(self, delta, state):
        return delta[..., 0].double()


def trace_metric(metric: str | TraceMetric, classes: int) -> TraceMetric:
    """``metric`` as a TraceMetric: "kl" (with ``classes``), "logprob", or an instance."""
    if isinstance(metric, TraceMetric):
        return metric
    if metric == "kl":
        return KL(classes)
    if metric == "logprob":
        return AnswerLogProb()
    raise ValueError(f"metric must be 'kl', 'logprob' or a TraceMetric, got {metric!r}")
