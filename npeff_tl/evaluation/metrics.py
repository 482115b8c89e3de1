"""Label metrics of a dictionary's coefficients against known strategy labels.

AMI (primary) and NMI of the argmax assignment; purity@k (the most common label's share among each component's
k largest coefficients, averaged over components); best-match F1 per label (the best F1 of any component's
argmax cluster for it); multi-factor recall (the share of examples needing two or more strategies whose two
largest components map to two of them, a component mapping to its strategy: ``labels.component_strategy``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..dictionaries import Dictionary, top_of
from ..examples import LabeledExamples
from .labels import component_labels, most_frequent


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
    """Share of the examples with two or more factors whose two largest components map to two different
    factors of theirs (None when there are no such examples)."""
    W = torch.as_tensor(coefficients).double()
    hits, total = 0, 0
    for i, needed in enumerate(factors):
        if len(set(needed)) < 2:
            continue
        total += 1
        first, second = W[i].topk(2).indices.tolist()
        mapped = {labels_of_components[first], labels_of_components[second]}
        hits += int(len(mapped) == 2 and mapped <= set(needed))
    return hits / total if total else None


def label_metrics(dictionary: Dictionary, coefficients: Float[Tensor, "n r"], examples: LabeledExamples,
                  k: int = 20) -> dict[str, float | None]:
    """AMI, NMI, purity@k, mean best-match F1 and multi-factor recall of one dictionary on ``examples``."""
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    labels = examples.labels
    if labels is None:
        raise ValueError("the examples have no labels; comparing against known labels needs LabeledExamples "
                         "with labels (e.g. LabeledExamples.from_dataset on a zoo split)")
    clusters = assignment(coefficients)
    f1 = best_match_f1(coefficients, labels)
    recall = None
    if examples.factors is not None:
        recall = multi_factor_recall(coefficients, examples.factors, component_labels(dictionary, k))
    return {
        "ami": float(adjusted_mutual_info_score(labels, clusters)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        f"purity_at_{k}": purity_at(coefficients, labels, k),
        "best_match_f1": sum(f1.values()) / len(f1),
        "multi_factor_recall": recall,
    }


def median_ignoring_missing(values: Sequence[float | None]) -> float | None:
    """The median of the measured values (None and NaN are missing and left out; None when nothing is left)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(torch.tensor(finite, dtype=torch.float64).median()) if finite else None


def mean_ignoring_missing(values: Sequence[float | None]) -> float:
    """The mean of the measured values (None and NaN are missing and left out; NaN when nothing is left)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
