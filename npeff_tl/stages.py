"""The pipeline's stages, each a function of a ``Run``: ``pefs`` -> ``fit`` -> ``selectivity`` (held-out
selectivity of the NPEFF components' perturbations) -> ``compare`` (the baselines, the comparison table, summary.json) -> ``report``. Each
skips what its artifacts show to be finished (``RunLayout``), so a re-run goes on where it stopped."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING


from .evaluation.selectivity import FIGURES as SELECTIVITY_FIGURES
from .baselines.factory import build_baselines
from .memory import estimate_memory, shortfall
from .store import load_json, save_json

if TYPE_CHECKING:
    from .pipeline import Run

logger = logging.getLogger(__name__)

FIGURES = ("ami", "nmi", "purity_at_20", "multi_factor_recall", "multi_factor_recall_by_stratum", "factor_auc", *(f"median_{f}" for f in SELECTIVITY_FIGURES))


def stage_pefs(run: Run) -> None:
    """Train-split PEFs of every kind the fit needs, and the examples as text for the report."""
    data, space = run.data, run.space
    run.say(f"npeff-tl: {run.model_name}, {len(data.train)} train / {len(data.test)} test examples, "
            f"{space.size:,} parameters -> {run.out}")
    if run.writes:
        save_json(data.display, run.layout.examples)
    from .decomp import VARIANTS

    for method in run.methods():
        kind = VARIANTS[method].pefs.name
        if not run.layout.has_pefs(kind):
            settings = run.pef_settings(kind)
            estimate = estimate_memory("pefs", **settings)
            run.say(f"  {kind} PEFs, batch {settings['batch_size']}: about {estimate}")
            _warn_if_short(estimate, f"the {kind} PEFs")
        run.pefs(kind)


def _warn_if_short(estimate, what: str) -> None:
    message = shortfall(estimate, what)
    if message:
        logger.warning(message)


def stage_fit(run: Run) -> None:
    """D-NPEFF / LRM-NPEFF decompositions of the train PEFs."""
    from .decomp import VARIANTS
    from .decomp.matrix import count_columns

    for method in run.methods():
        if not run.layout.has_decomposition(method):
            fit, variant = run.config.fit, VARIANTS[method]
            pefs = run.pefs(variant.pefs.name)
            columns = count_columns(pefs)
            estimate = estimate_memory(method, n_examples=len(pefs), nnz=pefs.nnz, n_columns=columns,
                                       rank=fit.n_components, classes=getattr(pefs, "max_rank", 1))
            run.say(f"  {method}: {fit.n_components} components over {columns:,} parameters, about {estimate}")
            _warn_if_short(estimate, f"the {method} fit")
            decomposition = fit.solver(method).fit(pefs, progress=run.progress)
            if run.writes:
                decomposition.save(run.layout.decomposition(method))
        run.say(f"  {method}: {run.config.fit.n_components} components fitted")


def _measure(run: Run, dictionary) -> None:
    """Held-out selectivity of ``dictionary``'s components with the most training mass, saved once. Normalised
    by the test examples' Fisher traces over the run's space, computed once for every dictionary that perturbs
    that space or acts on activations (gradient clustering perturbs a space of its own, and takes its own)."""
    from .dictionaries import ParameterDictionary
    from .evaluation.labels import components_by_mass
    from .evaluation.selectivity import measure_selectivity

    path = run.layout.selectivity(dictionary.name)
    if not run.layout.has_selectivity(dictionary.name):
        run.save_coefficients(dictionary)
        own_space = isinstance(dictionary, ParameterDictionary) and dictionary.space != run.space
        traces = None if own_space else run.test_traces
        components = sorted(components_by_mass(dictionary.train_coefficients, run.config.selectivity.n_measured))
        measure_selectivity(dictionary, run.data.test, components=components,
                            coefficients=run.coefficients(dictionary.name)["test"], fisher_traces=traces,
                            config=run.config.selectivity, progress=run.progress).save(path)
    if run.writes and not run.layout.has_effects(dictionary.name):
        _save_effects(run, dictionary, path)
    if run.writes and dictionary in run.npeff_dictionaries and not run.layout.has_traces(dictionary.name):
        _save_traces(run, dictionary, path)


def _save_effects(run: Run, dictionary, path: Path) -> None:
    """The logit effects of the measured components (``npeff_tl.effects``), with the text of every token named."""
    from .effects import logit_effects
    from .evaluation.selectivity import load_selectivity
    from .sources import str_tokens

    effects = [e.to_dict() for e in logit_effects(dictionary, run.data.test, load_selectivity(path),
                                                  run.coefficients(dictionary.name)["test"])]
    ids = sorted({t for e in effects for key in ("promoted", "suppressed", "before", "after") for t, _ in e[key]})
    save_json({"effects": effects, "tokens": dict(zip(map(str, ids), str_tokens(run.model, ids)))},
              run.layout.effects(dictionary.name))


def _save_traces(run: Run, dictionary, path: Path) -> None:
    """The circuits of the measured components (``npeff_tl.effects.component_traces``), where the run asks for
    them; with plain AtP where AtP*'s QK fix does not cover the model's attention (ALiBi, soft-capping...)."""
    from .effects import component_traces
    from .evaluation.selectivity import load_selectivity
    from .tracing.tracer import method_for

    if not run.config.selectivity.circuit_method:
        return
    method, why = method_for(run.model, run.config.selectivity.circuit_method)
    if why:
        run.say(f"  {dictionary.name}: {why}; circuits traced with plain AtP")
    traces = component_traces(dictionary, run.data.test, load_selectivity(path),
                              run.coefficients(dictionary.name)["test"], method=method, progress=run.progress)
    for j, result in traces.items():
        result.save(run.layout.traces(dictionary.name) / str(j))
    save_json({"components": sorted(traces), "method": method}, run.layout.traces(dictionary.name) / "index.json")
    run.say(f"  {dictionary.name}: circuits traced ({method}) for {len(traces)} components")


def stage_selectivity(run: Run) -> None:
    """Perturb along each NPEFF component: held-out coefficient and strategy selectivity with random controls."""
    for dictionary in run.npeff_dictionaries:
        _measure(run, dictionary)
        run.say(f"  {dictionary.name}: selectivity measured")


def stage_compare(run: Run) -> None:
    """Baselines next to NPEFF on the test split (label metrics, matching, selectivity), and summary.json."""
    from .evaluation.comparison import compare
    from .evaluation.selectivity import load_selectivity

    dictionaries = run.npeff_dictionaries + build_baselines(
        run.model, run.data.train, run.data.test, run.config.compare, run.config.fit.n_components, run.layout.sae,
        run.say)
    if not run.layout.has_comparison():
        for d in dictionaries:
            run.save_coefficients(d)
            if run.config.compare.selectivity or d in run.npeff_dictionaries:
                _measure(run, d)
        measured = {d.name: load_selectivity(run.layout.selectivity(d.name)) for d in dictionaries
                    if run.layout.has_selectivity(d.name)}
        compare(dictionaries, run.data.test, measured=measured, out=run.layout.comparison, progress=run.progress)
    run.say("  comparison done")


def stage_report(run: Run) -> None:
    from .report import write_report

    write_report(run.out)
    run.say(f"  report: {run.layout.report}")


STAGE_FUNCTIONS = {"pefs": stage_pefs, "fit": stage_fit, "selectivity": stage_selectivity,
                   "compare": stage_compare, "report": stage_report}


def write_summary(run: Run) -> dict:
    """summary.json from the comparison: per method the figures of FIGURES, per control the medians pooled
    over the NPEFF methods' components; ``seconds`` is the sum of the stages' first-run times."""
    from .evaluation.metrics import median_ignoring_missing
    from .evaluation.selectivity import load_selectivity

    rows = {row["method"]: row for row in load_json(run.layout.comparison / "comparison.json")["rows"]}
    methods = {name: {key: _finite(row.get(key)) for key in FIGURES} for name, row in rows.items() if "/" not in name}
    controls = {}
    for control in ("random", "random_support"):
        records = []
        for name in run.methods():
            result = load_selectivity(run.layout.selectivity(name))
            first = result.settings["kl_targets"][0]
            records += [r for r in result.records if r["method"] == control and r["kl_target"] == first]
        controls[control] = {f"median_{figure}": _finite(median_ignoring_missing([r.get(figure) for r in records]))
                             for figure in SELECTIVITY_FIGURES}
    summary = {"model": run.model_name, "n_examples": len(run.data.train) + len(run.data.test),
               "seconds": round(sum(t for k, t in run.timings.items() if k != "report"), 1), "methods": methods,
               "controls": controls}
    save_json(summary, run.layout.summary)
    return summary


def _finite(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value
