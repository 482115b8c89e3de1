"""Comparing dictionaries (NPEFF, SAEs, clusterings) on the same examples, usually held out: one table with the
label metrics (``metrics``), the mean matched coefficient correlation with every other dictionary
(``matching.match_coefficients``) and, optionally, median coefficient and strategy selectivity
(``selectivity``), raw and normalised by the sets' Fisher traces, with the random-direction controls of
parameter-space dictionaries.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from jaxtyping import Float
from torch import Tensor

from ..dictionaries import Dictionary, ParameterDictionary, as_labeled
from ..examples import Examples, LabeledExamples
from ..provenance import versions
from ..store import atomic_directory, save_json
from .labels import components_by_mass
from .matching import match_coefficients
from .metrics import mean_ignoring_missing, label_metrics
from .selectivity import FIGURES, SelectivityConfig, SelectivityResult, measure_selectivity

COMPARISON_FORMAT = "npeff_tl.comparison"


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
                correlations = match_coefficients(coefficients[d.name], coefficients[other.name])[2]
                row[f"matched_corr_{other.name}"] = mean_ignoring_missing(correlations)
        row.update(d.figures())
        if selectivity or d.name in (measured or {}):
            if d.name in (measured or {}):
                result = measured[d.name]
            else:
                config = selectivity if isinstance(selectivity, SelectivityConfig) else SelectivityConfig()
                components = None
                if selectivity_components is not None and d.n_components > selectivity_components:
                    components = sorted(components_by_mass(d.train_coefficients, selectivity_components))
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


def _json_rows(table) -> list[dict]:
    """Rows with NaN as None (valid JSON)."""
    return [{key: (None if isinstance(v, float) and v != v else v) for key, v in row.items()}
            for row in table.to_dict(orient="records")]

