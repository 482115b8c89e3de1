"""Measuring dictionaries: label metrics, matching, split-half stability (label-free), held-out selectivity and the
comparison table that joins them."""

from .comparison import compare
from .labels import (component_factor, component_factors, component_labels, component_strategy,
                     components_by_mass)
from .matching import match_coefficients, matched_cosines
from .metrics import factor_auc, factor_mass, label_metrics, multi_factor_recall, train_ami
from .selectivity import SelectivityConfig, SelectivityResult, load_selectivity, measure_selectivity
from .stability import SplitHalfStability, split_half_stability

__all__ = [
    "compare", "component_factor", "component_factors", "component_labels", "component_strategy",
    "components_by_mass", "match_coefficients", "matched_cosines", "factor_auc", "factor_mass", "label_metrics",
    "multi_factor_recall", "train_ami", "SelectivityConfig", "SelectivityResult", "load_selectivity",
    "measure_selectivity", "SplitHalfStability", "split_half_stability",
]
