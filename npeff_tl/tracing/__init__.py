"""Component circuits: where a perturbation's effect travels through the forward pass (``trace``), by exact
activation patching, AtP, or AtP* (QK fix + GradDrop)."""

from .agreement import agreement, spearman
from .metrics import KL, AnswerLogProb, TraceMetric
from .nodes import DEFAULT_NODES, NODE_KINDS, NodeKind
from .result import Trace, load_trace
from .tracer import METHODS, TraceMethod, trace

__all__ = ["agreement", "spearman", "KL", "AnswerLogProb", "TraceMetric", "DEFAULT_NODES", "NODE_KINDS", "NodeKind",
           "Trace", "load_trace", "METHODS", "TraceMethod", "trace"]
