"""Comparing dictionaries (NPEFF, SAEs, clusterings) on the same examples, usually held out.

Against known labels: AMI (primary) and NMI of the argmax assignment; purity@k (the most common label's share
among each component's k largest coefficients, averaged over components); best-match F1 per label (the best
F1 of any component's argmax cluster for it); multi-factor recall (the share of examples needing two or more
strategies whose two largest components map to two of them, a component mapping to the label most frequent
among its top training examples). Between dictionaries: Hungarian matching of components on the correlation
of their coefficients over the examples. By interventions (optional): median coefficient and strategy
selectivity (``measure_selectivity``), raw and normalised by the sets' Fisher traces, with the
random-direction controls of parameter-space dictionaries.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .dictionaries import Dictionary, ParameterDictionary, as_labeled, top_of
from .examples import Examples, LabeledExamples
from .selectivity import FIGURES, SelectivityConfig, SelectivityResult, measure_selectivity
from .store import atomic_directory, save_json, versions

COMPARISON_FORMAT = "npeff_tl.comparison"


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
            shares.append(Counter(labels[i] for i in top).most_common(1)[0][1] / len(top))
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


def component_labels(dictionary: Dictionary, k: int = 20) -> list[str | None]:
    """Each component's label: the most frequent among its k top training examples (None without any)."""
    labels = dictionary.train.labels
    if labels is None:
        raise ValueError(f"{dictionary.name}'s training examples have no labels; build it with labeled examples")
    out = []
    for j in range(dictionary.n_components):
        top = dictionary.top_examples(j, k).tolist()
        out.append(Counter(labels[i] for i in top).most_common(1)[0][0] if top else None)
    return out


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


def match_coefficients(a: Float[Tensor, "n ra"], b: Float[Tensor, "n rb"]) -> tuple[list[int], list[int], list[float]]:
    """Hungarian matching of the components of two dictionaries on the Pearson correlation of their coefficients
    over the same examples: (components of a, matched components of b, correlations), best first."""
    from scipy.optimize import linear_sum_assignment

    def standardized(x):
        x = torch.as_tensor(x).double()
        x = x - x.mean(0)
        return x / torch.linalg.vector_norm(x, dim=0).clamp(min=1e-300)

    corr = standardized(a).T @ standardized(b)
    rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    pairs = sorted(zip(rows.tolist(), cols.tolist(), corr[rows, cols].tolist()), key=lambda p: -p[2])
    return [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]


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


def compare(
    dictionaries: Sequence[Dictionary],
    examples: LabeledExamples | Examples,
    *,
    labels: Sequence[str] | None = None,
    factors: Sequence[Sequence[str]] | None = None,
    k: int = 20,
    selectivity: SelectivityConfig | bool = False,
    selectivity_components: int | None = None,
    measured: Mapping[str, SelectivityResult] | None = None,
    fisher_traces: Float[Tensor, " n"] | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
):
    """A table (pandas DataFrame), one row per dictionary (and per control when selectivity is measured), with
    the label metrics on ``examples``, the mean matched coefficient correlation with every other dictionary
    (``matched_corr_<name>``), each dictionary's own figures (e.g. SAE evaluations) and, with ``selectivity``
    (True or a ``SelectivityConfig``), median coefficient and strategy selectivity, raw and normalised (each
    parameter-space dictionary by the Fisher traces over its own space; the others, which act on activations,
    by ``fisher_traces``, default: those over the first parameter-space dictionary's space). With ``out``, the table is
    saved there as comparison.csv and comparison.json, and each selectivity result in selectivity/<name>/.
    ``labels`` / ``factors`` give (or replace) the examples' strategy labels and per-example factor lists.
    ``selectivity_components`` caps the components measured per dictionary (those with the largest total
    training coefficient), since each needs its own magnitude searches. ``measured`` gives selectivity results
    already measured (by dictionary name): they are used as they are, not measured again, nor saved again."""
    import pandas as pd

    examples = as_labeled(examples)
    if labels is not None or factors is not None:
        examples = dataclasses.replace(examples, labels=labels if labels is not None else examples.labels,
                                       factors=factors if factors is not None else examples.factors)

    names = [d.name for d in dictionaries]
    if len(set(names)) != len(names):
        raise ValueError(f"dictionary names must be unique to tell rows apart; got {names} (pass name=... when "
                         "building them)")
    coefficients = {d.name: d.coefficients(examples) for d in dictionaries}
    rows = []
    results: dict[str, SelectivityResult] = {}
    for d in dictionaries:
        row = {"method": d.name, "description": d.describe(), "n_components": d.n_components}
        row.update(label_metrics(d, coefficients[d.name], examples, k))
        for other in dictionaries:
            if other is not d:
                row[f"matched_corr_{other.name}"] = _mean(match_coefficients(coefficients[d.name],
                                                                             coefficients[other.name])[2])
        row.update(getattr(d, "evaluation", None) or {})
        if selectivity or d.name in (measured or {}):
            if d.name in (measured or {}):
                result = measured[d.name]
            else:
                config = selectivity if isinstance(selectivity, SelectivityConfig) else SelectivityConfig()
                components = None
                if selectivity_components is not None and d.n_components > selectivity_components:
                    mass = torch.as_tensor(d.train_coefficients).double().sum(0)
                    components = mass.topk(selectivity_components).indices.sort().values.tolist()
                traces = None
                if not isinstance(d, ParameterDictionary):
                    if fisher_traces is None:
                        fisher_traces = _parameter_traces(dictionaries, examples, config)
                    traces = fisher_traces
                result = results[d.name] = measure_selectivity(d, examples, components=components,
                                                               coefficients=coefficients[d.name], config=config,
                                                               fisher_traces=traces, progress=progress)
            medians = result.medians()
            row.update({f"median_{key}": medians[d.name][key] for key in FIGURES})
            rows.append(row)
            for control in result.methods[1:]:
                rows.append({"method": f"{d.name}/{control}", "description": f"control for {d.name}: {control}",
                             **{f"median_{key}": medians[control][key] for key in FIGURES}})
        else:
            rows.append(row)
    table = pd.DataFrame(rows)
    if out is not None:
        with atomic_directory(out) as tmp:
            table.to_csv(tmp / "comparison.csv", index=False)
            save_json({"format": COMPARISON_FORMAT, "format_version": 1, "rows": _json_rows(table),
                       "n_examples": len(examples), "k": k, "provenance": {"versions": versions()}},
                      tmp / "comparison.json")
            for name, result in results.items():
                result.save(tmp / "selectivity" / name)
    return table


def _parameter_traces(dictionaries: Sequence[Dictionary], examples: LabeledExamples,
                      config: SelectivityConfig) -> Tensor | None:
    """Fisher traces of the examples over the first parameter-space dictionary's space (None without one)."""
    for d in dictionaries:
        if isinstance(d, ParameterDictionary):
            return d.fisher_traces(examples, config.trace_classes)
    return None


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _json_rows(table) -> list[dict]:
    """Rows with NaN as None (valid JSON)."""
    return [{key: (None if isinstance(v, float) and v != v else v) for key, v in row.items()}
            for row in table.to_dict(orient="records")]

