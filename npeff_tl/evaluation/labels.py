"""What a component stands for, from labels and coefficients alone: the label most frequent among its top
training examples (its strategy), the factor most frequent among them (each example counting once for each
factor it needs), and which components carry the most training mass."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from jaxtyping import Float
from torch import Tensor

from ..dictionaries import Dictionary


def most_frequent(labels: Iterable[str]) -> tuple[str, int] | None:
    """The most frequent label and its count (the first seen wins a tie); None for no labels."""
    counts = Counter(labels).most_common(1)
    return counts[0] if counts else None


def component_strategy(dictionary: Dictionary, j: int, k: int = 20) -> str | None:
    """Component ``j``'s strategy: the label most frequent among its k top training examples (None without any)."""
    labels = dictionary.train.labels
    if labels is None:
        raise ValueError(f"{dictionary.name}'s training examples have no labels; build it with labeled examples")
    found = most_frequent(labels[i] for i in dictionary.top_examples(j, k).tolist())
    return found[0] if found else None


def component_labels(dictionary: Dictionary, k: int = 20) -> list[str | None]:
    """Every component's strategy (``component_strategy``)."""
    return [component_strategy(dictionary, j, k) for j in range(dictionary.n_components)]


def component_factor(dictionary: Dictionary, j: int, k: int = 20) -> str | None:
    """Component ``j``'s factor: the factor most frequent among its k top training examples, each example counting
    once for each of its factors (a pair stratum such as ``attribute+induction`` counts for both), so a component
    can be named by a single factor even where the strata include pairs (None without any)."""
    factors = dictionary.train.factors
    if factors is None:
        raise ValueError(f"{dictionary.name}'s training examples have no factors; build it with examples that "
                         f"list each one's factors (LabeledExamples(factors=...))")
    found = most_frequent(f for i in dictionary.top_examples(j, k).tolist() for f in dict.fromkeys(factors[i]))
    return found[0] if found else None


def component_factors(dictionary: Dictionary, k: int = 20) -> list[str | None]:
    """Every component's factor (``component_factor``)."""
    return [component_factor(dictionary, j, k) for j in range(dictionary.n_components)]


def components_by_mass(train_coefficients: Float[Tensor, "n r"], n: int | None = None) -> list[int]:
    """Components with a positive total training coefficient, the largest total first (at most ``n``)."""
    mass = torch.as_tensor(train_coefficients).double().sum(0)
    order = [j for j in mass.argsort(descending=True, stable=True).tolist() if mass[j] > 0]
    return order if n is None else order[:n]
