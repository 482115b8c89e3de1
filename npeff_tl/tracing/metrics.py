"""What a trace measures at the target position, and how patching a node changes it.

A metric has a value per prediction: ``KL``, KL(p || p_original) (the default; the divergence selectivity uses),
or ``AnswerLogProb``, the log-probability of the original top prediction. A node's effect is the value of the
patched prediction minus the value of the run it was patched into (the original run when noising, the perturbed
run when denoising).

KL has zero gradient at the original run (it is minimal there), so linearising the KL itself would estimate
every node's effect as 0 when noising. Attribution therefore linearises the network up to the logits of a few
classes (the original answer and the ``classes`` most probable tokens of the perturbed prediction, those that
gain the mass) and evaluates the KL exactly on the changed logits, the rest of the vocabulary unchanged.
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
    """Per example (float64 log-probabilities at the target): the original run, the run patches go into, and the
    classes attribution linearises."""

    original: Float[Tensor, "b vocab"]
    base: Float[Tensor, "b vocab"]
    classes: Int[Tensor, "b m"]

    def rows(self, index: Tensor) -> MetricState:
        return MetricState(self.original[index], self.base[index], self.classes[index])


class TraceMetric(ABC):
    name: str

    @abstractmethod
    def classes(self, original: Float[Tensor, "b vocab"], perturbed: Float[Tensor, "b vocab"]) -> Int[Tensor, "b m"]:
        """The classes whose logits attribution linearises."""

    @abstractmethod
    def value(self, log_probs: Float[Tensor, "r vocab"], state: MetricState) -> Float[Tensor, " r"]:
        """The metric of predictions (``state`` rows match)."""

    @abstractmethod
    def outputs(self, logits: Float[Tensor, "b vocab"], state: MetricState) -> Float[Tensor, "b m"]:
        """The scalars that attribution linearises (with gradients)."""

    @abstractmethod
    def estimate(self, delta: Float[Tensor, "*nodes b m"], state: MetricState) -> Float[Tensor, "*nodes b"]:
        """The effect estimated from linearised changes ``delta`` of the outputs at the base run."""

    def state(self, original: Tensor, perturbed: Tensor, base: Tensor) -> MetricState:
        return MetricState(original, base, self.classes(original, perturbed))

    def effect(self, patched: Float[Tensor, "r vocab"], state: MetricState) -> Float[Tensor, " r"]:
        """The exact effect of a patch: its value minus the base run's."""
        return self.value(patched, state) - self.value(state.base, state)


class KL(TraceMetric):
    """KL(p || p_original) at the target position; attribution linearises the logits of the original answer and
    of the ``classes`` top tokens of the perturbed prediction."""

    name = "kl"

    def __init__(self, classes: int = 3):
        if classes < 1:
            raise ValueError(f"classes must be >= 1 (tokens of the perturbed prediction to linearise), got {classes}")
        self.n_classes = classes

    def classes(self, original, perturbed):
        answer = original.argmax(-1, keepdim=True)
        others = perturbed.scatter(1, answer, -torch.inf)
        return torch.cat([answer, others.topk(min(self.n_classes, others.shape[1] - 1), dim=1).indices], 1)

    def value(self, log_probs, state):
        return kl_rows(log_probs, state.original)

    def outputs(self, logits, state):
        return logits.gather(1, state.classes.to(logits.device))

    def estimate(self, delta, state):
        # The base run's logits with only the linearised classes moved by delta, in closed form and in terms of
        # expm1 / log1p, so that tiny changes keep their precision: with p the base probabilities and
        # Z = 1 + sum_S p (e^delta - 1) the new normaliser, KL(new || original) = sum_S q delta - log Z
        # + (KL(base || original) + sum_S p (e^delta - 1)(base - original)) / Z.
        base, original, classes = state.base, state.original, state.classes
        delta = delta.double()
        p = base.gather(1, classes).exp()
        grown = p * torch.expm1(delta)  # [..., b, m]
        log_z = torch.log1p(grown.sum(-1))
        q = p * (delta - log_z[..., None]).exp()
        kl_base = kl_rows(base, original)
        shift = base.gather(1, classes) - original.gather(1, classes)
        new = (q * delta).sum(-1) - log_z + (kl_base + (grown * shift).sum(-1)) * (-log_z).exp()
        return new.clamp(min=0) - kl_base  # a KL is >= 0; rounding can say less


class AnswerLogProb(TraceMetric):
    """log p(original answer): the effect is the change of the original answer's log-probability."""

    name = "logprob"

    def classes(self, original, perturbed):
        return original.argmax(-1, keepdim=True)

    def value(self, log_probs, state):
        return log_probs.gather(1, state.classes)[:, 0]

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
