"""npeff_tl: NPEFF (Non-Negative Per-Example Fisher Factorization) for TransformerLens models.

Importing the package is light: TransformerLens is imported only when a model is wrapped, and SAE-Lens only
when an SAE baseline is used.
"""

import logging

from . import baselines, tracing, zoo
from .adapters import HookedTransformerAdapter, ModelAdapter, as_adapter
from .decomp import DNPEFF, LRMNPEFF, ConvergenceWarning, Decomposition, load_decomposition
from .decomp.component import Component, Readout
from .dictionaries import Dictionary, NPEFFDictionary, ParameterDictionary
from .evaluation import (
    SelectivityConfig,
    SelectivityResult,
    compare,
    load_selectivity,
    matched_cosines,
    measure_selectivity,
    split_half_stability,
)
from .examples import Examples, LabeledExamples
from .interventions import (
    HookIntervention,
    KLProbe,
    ParameterDirection,
    ParameterPerturbation,
    calibrate_magnitude,
    dnpeff_direction,
    kl_divergence,
    lrm_direction,
    perturb,
    random_direction,
    sign_pattern,
)
from .params import ParamSpace
from .pefs import (
    AnswerLogProb,
    ClassLogProbs,
    CrossEntropy,
    DiagonalPEFs,
    FunctionObjective,
    GradBlock,
    LowRankPEFs,
    Objective,
    PEFs,
    compute_pefs,
    fisher_traces,
    load_pefs,
    per_example_grads,
)
from .config import RunConfig, load_config
from .pipeline import Run, run_all
from .report import write_report
from .checkpoints import save_checkpoint
from .sources import load_model
from .store import FormatError, LockedError
from .targets import Candidates, ClassRule, Sampled, Target, Threshold, TopK, TopKWithTail
from .tracing import Trace, load_trace, trace

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "HookedTransformerAdapter", "ModelAdapter", "as_adapter", "Examples", "ParamSpace",
    "AnswerLogProb", "ClassLogProbs", "CrossEntropy", "FunctionObjective", "Objective", "GradBlock",
    "DiagonalPEFs", "LowRankPEFs", "PEFs", "compute_pefs", "fisher_traces", "load_pefs", "per_example_grads",
    "FormatError", "LockedError", "Candidates", "ClassRule", "Sampled", "Target", "Threshold", "TopK", "TopKWithTail", "zoo", "baselines",
    "ConvergenceWarning", "DNPEFF", "LRMNPEFF", "Decomposition", "load_decomposition", "matched_cosines",
    "Component", "Readout", "ParameterPerturbation", "kl_divergence", "lrm_direction", "perturb", "random_direction",
    "dnpeff_direction", "sign_pattern", "LabeledExamples", "HookIntervention", "KLProbe", "ParameterDirection", "calibrate_magnitude",
    "Dictionary", "NPEFFDictionary", "ParameterDictionary", "compare",
    "SelectivityConfig", "SelectivityResult", "load_selectivity", "measure_selectivity", "split_half_stability",
    "RunConfig", "load_config", "Run", "run_all", "write_report", "load_model", "save_checkpoint",
    "tracing", "Trace", "load_trace", "trace",
]
