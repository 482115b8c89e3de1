"""Label metrics of a dictionary's coefficients against known strategy labels.

AMI (primary) and NMI of the argmax assignment; purity@k (the most common label's share among each component's
k largest coefficients, averaged over components); best-match F1 per label (the best F1 of any component's
argmax cluster for it); on examples needing two or more factors, multi-factor recall (the share whose two
largest components name two different factors of theirs) with components named by factor
(``labels.component_factor``) and, beside it, by stratum (``labels.component_strategy``, which can never name a
pair stratum's two factors), and the factor AUC (per example, how well its factors' coefficient mass ranks above
the other factors', averaged; a rank measure that does not hang on exactly two components).

A one-hot assignment (a hard clustering) puts all of an example's mass on one component: it can never reach a
top-2 hit, and its factor AUC is at most (1 + 0.5) / 2 = 0.75 for a two-factor example (its second factor ties
with every absent one). The baselines here all have soft coefficients (SAE feature activations, k-means'
Gaussian affinities, gradient clustering's cosines), so these figures compare soft coefficients throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float, Float64
from torch import Tensor

from ..dictionaries import Dictionary, top_of
from ..examples import LabeledExamples
from .labels import component_factors, component_labels, most_frequent


def assignment(coefficients: Float[Tensor, "n r"]) -> list[int]:
    """The component with the largest coefficient per example (-1 where all are zero)."""
    W = torch.as_tensor(coefficients).double()
    best = W.argmax(1)
    best[W.max(1).values <= 0] = -1
    return best.tolist()


def purity_at(coefficients: Float[Tensor, "n r"], labels: Sequence[str], k: int = 20) -> float | None:
    """Mean over components of the most common label's share among the (positive) k largest coefficients."""
    W = torch.as_tensor(coefficients).double()
    shares = []
    for j in range(W.shape[1]):
        top = top_of(W[:, j], k).tolist()
        if top:
            shares.append(most_frequent(labels[i] for i in top)[1] / len(top))
    return sum(shares) / len(shares) if shares else None


def best_match_f1(coefficients: Float[Tensor, "n r"], labels: Sequence[str]) -> dict[str, float]:
    """Per label, the best F1 of any component's argmax cluster as a detector of that label."""
    clusters = torch.tensor(assignment(coefficients))
    out = {}
    for label in dict.fromkeys(labels):
        truth = torch.tensor([x == label for x in labels])
        best = 0.0
        for j in clusters.unique().tolist():
            if j < 0:
                continue
            predicted = clusters == j
            tp = float((predicted & truth).sum())
            if tp:
                best = max(best, 2 * tp / (float(predicted.sum()) + float(truth.sum())))
        out[label] = best
    return out


def train_ami(dictionary: Dictionary) -> float:
    """AMI of the training examples' argmax assignment against their labels: for choosing a setting (a hook, a
    width) on the train split only."""
    from sklearn.metrics import adjusted_mutual_info_score

    if dictionary.train.labels is None:
        raise ValueError(f"{dictionary.name}'s training examples have no labels; build it with labeled examples")
    return float(adjusted_mutual_info_score(dictionary.train.labels, assignment(dictionary.train_coefficients)))


def multi_factor_recall(coefficients: Float[Tensor, "n r"], factors: Sequence[Sequence[str]],
                        labels_of_components: Sequence[str | None]) -> float | None:
    """Share of the examples with two or more factors whose two largest components (both with positive
    coefficients) map to two different factors of theirs (None when there are no such examples)."""
    W = torch.as_tensor(coefficients).double()
    hits, total = 0, 0
    for i, needed in enumerate(factors):
        if len(set(needed)) < 2:
            continue
        total += 1
        top = W[i].topk(2)
        mapped = {labels_of_components[j] for j in top.indices.tolist()}
        hits += int(len(mapped) == 2 and mapped <= set(needed) and bool((top.values > 0).all()))
    return hits / total if total else None


def factor_mass(coefficients: Float[Tensor, "n r"], factors_of_components: Sequence[str | None],
                universe: Sequence[str]) -> Float64[Tensor, "n n_factors"]:
    """Each example's coefficients summed over the components named by each factor of ``universe`` (in its order,
    without repeats); components named by no factor of it count for none."""
    names = list(dict.fromkeys(universe))
    index = {f: i for i, f in enumerate(names)}
    W = torch.as_tensor(coefficients).double()
    to_factor = torch.zeros(W.shape[1], len(names), dtype=torch.float64)
    for j, f in enumerate(factors_of_components):
        if f in index:
            to_factor[j, index[f]] = 1.0
    return W @ to_factor


def factor_auc(coefficients: Float[Tensor, "n r"], factors: Sequence[Sequence[str]],
               factors_of_components: Sequence[str | None], universe: Sequence[str]) -> float | None:
    """Mean over the examples with two or more factors of the AUC of their factors' coefficient mass against the
    other factors' (mass of a factor: the sum of the example's coefficients on the components named by it; every
    factor of ``universe`` takes part, those named by no component with mass 0; ties count one half). None when no
    example has two factors."""
    names = list(dict.fromkeys(universe))
    mass = factor_mass(coefficients, factors_of_components, names)
    aucs = []
    for i, needed in enumerate(factors):
        needed = set(needed) & set(names)
        if len(set(factors[i])) < 2 or not needed or len(needed) == len(names):
            continue
        inside = torch.tensor([f in needed for f in names])
        a, b = mass[i, inside][:, None], mass[i, ~inside][None, :]
        aucs.append(float(((a > b).double() + 0.5 * (a == b).double()).mean()))
    return sum(aucs) / len(aucs) if aucs else None


def label_metrics(dictionary: Dictionary, coefficients: Float[Tensor, "n r"], examples: LabeledExamples,
                  k: int = 20) -> dict[str, float | None]:
    """AMI, NMI, purity@k, mean best-match F1 and, where the examples list their factors, multi-factor recall
    (components named by factor, and by stratum) and the factor AUC of one dictionary on ``examples``."""
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    labels = examples.labels
    if labels is None:
        raise ValueError("the examples have no labels; comparing against known labels needs LabeledExamples "
                         "with labels (e.g. LabeledExamples.from_dataset on a zoo split)")
    clusters = assignment(coefficients)
    f1 = best_match_f1(coefficients, labels)
    multi_factor = dict.fromkeys(("multi_factor_recall", "multi_factor_recall_by_stratum", "factor_auc"))
    if examples.factors is not None and dictionary.train.factors is not None:
        named = component_factors(dictionary, k)
        universe = [f for fs in dictionary.train.factors for f in fs]
        multi_factor = {
            "multi_factor_recall": multi_factor_recall(coefficients, examples.factors, named),
            "multi_factor_recall_by_stratum": multi_factor_recall(coefficients, examples.factors,
                                                                  component_labels(dictionary, k)),
            "factor_auc": factor_auc(coefficients, examples.factors, named, universe),
        }
    return {
        "ami": float(adjusted_mutual_info_score(labels, clusters)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        f"purity_at_{k}": purity_at(coefficients, labels, k),
        "best_match_f1": sum(f1.values()) / len(f1),
        **multi_factor,
    }


def median_ignoring_missing(values: Sequence[float | None]) -> float | None:
    """The median of the measured values (None and NaN are missing and left out; None when nothing is left)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(torch.tensor(finite, dtype=torch.float64).median()) if finite else None


def mean_ignoring_missing(values: Sequence[float | None]) -> float:
    """The mean of the measured values (None and NaN are missing and left out; NaN when nothing is left)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
