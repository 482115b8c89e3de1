"""Per-example gradients and per-example Fishers (PEFs): computation, containers, storage."""

from .compute import compute_pefs, fisher_traces
from .containers import DiagonalPEFs, LowRankPEFs, PEFs, load_pefs
from .grads import GradBlock, per_example_grads
from .objectives import AnswerLogProb, ClassLogProbs, CrossEntropy, FunctionObjective, Objective

__all__ = [
    "compute_pefs", "fisher_traces", "DiagonalPEFs", "LowRankPEFs", "PEFs", "load_pefs", "GradBlock", "per_example_grads",
    "AnswerLogProb", "ClassLogProbs", "CrossEntropy", "FunctionObjective", "Objective",
]
