"""Selectivity: does perturbing a component disrupt its own examples and leave the others alone?

Measured on held-out examples, never on the examples the decomposition was fitted to (their coefficients come
from ``Decomposition.fit_coefficients``). Per component and sign, the perturbation's magnitude (the L2 norm of
the parameter step) is searched so that the mean KL over the component's top held-out examples hits a target
(0.5 nats, also 0.1). Then:

- coefficient selectivity = mean KL(top set) / mean KL(baseline), the baseline being held-out examples drawn
  with a seed outside the top set; the larger over the two signs;
- strategy selectivity, which does not use coefficients to choose examples: the component gets the strategy most
  frequent among its top training examples, and the ratio is the mean KL over held-out examples of that strategy
  over the mean KL over held-out examples of all other strategies (the larger over the two signs);
- a component x strategy matrix of mean KL and of accuracy drop (at the first KL target, at the sign with the
  larger coefficient selectivity);
- normalised coefficient and strategy selectivity: each ratio divided by the ratio of the two sets' mean
  Fisher traces (tr F_i over the parameter space, of the whole predictive distribution). A random step of norm m moves example i by about
  m^2 tr F_i / (2 size) nats, so the raw ratio of a random direction is the trace ratio, whatever the sets
  (confident examples have small traces and are hard to move); normalised, it is about 1 by construction, and
  a component's figure says how much more it moves its own examples than their sensitivity explains.

It works on any ``Dictionary`` (NPEFF, SAEs, clusterings), through its coefficients and interventions. For
dictionaries that perturb parameters, controls get the same procedure at the same magnitudes: a random
direction over the whole space, and one on the component's support.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from ..dictionaries import Dictionary, ParameterDictionary, draw_baseline, mean_ratio, top_of
from ..examples import LabeledExamples
from ..interventions import KLProbe, calibrate_magnitude, perturb, random_direction
from ..progress import progress_bar
from ..provenance import versions
from ..store import atomic_directory, load_json, load_tensors, save_json, save_tensors
from ..targets import ClassRule, TopKWithTail
from .labels import component_strategy
from .metrics import median_ignoring_missing

logger = logging.getLogger(__name__)

CONTROLS = ("random", "random_support")
FIGURES = ("selectivity", "strategy_selectivity", "norm_selectivity", "norm_strategy_selectivity")
SELECTIVITY_FORMAT = "npeff_tl.selectivity"


@dataclass(frozen=True)
class SelectivityConfig:
    """Settings of ``measure_selectivity``.

    Attributes:
        n_top: top held-out examples per component (largest held-out coefficients).
        n_baseline: held-out baseline examples per component, drawn with ``seed`` outside the top set.
        kl_targets: mean KL (nats) on the top set that the magnitude search aims for; the first one is used for
            the component x strategy matrices.
        reverse_kl: KL(original || perturbed) instead of KL(perturbed || original).
        n_top_train: top training examples per component; the most frequent strategy among them is its strategy.
        controls: which controls to run, from ("random", "random_support").
        rtol: relative tolerance on the KL target.
        max_search_steps: KL evaluations allowed per magnitude search (up to the dictionary's
            ``magnitude_bounds``; a sign whose KL target is out of reach is left out: its figures are None).
        batch_size: examples per forward pass.
        seed: seeds the baselines and the control directions.
        trace_classes: the class rule of the Fisher traces that normalised selectivity divides by (when the
            traces are not given to ``measure_selectivity``). The KL is taken over the whole vocabulary, so the
            default estimates the whole distribution's Fisher: the top 4 classes exactly, the tail by 12 draws
            (``TopKWithTail``); a top-k trace alone misses most of an uncertain prediction's Fisher.
    """

    n_top: int = 20
    n_baseline: int = 200
    kl_targets: tuple[float, ...] = (0.5, 0.1)
    reverse_kl: bool = False
    n_top_train: int = 20
    controls: tuple[str, ...] = CONTROLS
    rtol: float = 0.05
    max_search_steps: int = 40
    batch_size: int = 64
    seed: int = 0
    trace_classes: ClassRule = TopKWithTail(4, 12)

    def __post_init__(self):
        for name in ("n_top", "n_baseline", "n_top_train", "max_search_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.kl_targets or min(self.kl_targets) <= 0:
            raise ValueError(f"kl_targets must be positive KL values in nats, got {self.kl_targets}")
        unknown = set(self.controls) - set(CONTROLS)
        if unknown:
            raise ValueError(f"unknown controls {sorted(unknown)}; choose from {CONTROLS}")
        if not 0 < self.rtol < 1:
            raise ValueError(f"rtol must be in (0, 1), got {self.rtol}")


@dataclass
class SelectivityResult:
    """Per (method, component, KL target) records, and per method the component x strategy matrices.

    ``records`` rows have: method ("dnpeff" / "lrm_npeff" / a control), component, kl_target, strategy, and per
    sign (suffix ``_plus`` / ``_minus``) magnitude, top_kl, baseline_kl, selectivity, strategy_selectivity,
    calibrated; then selectivity and strategy_selectivity (the larger over the signs), sign (of the larger
    coefficient selectivity), trace_ratio and strategy_trace_ratio (mean Fisher trace of the top set over the
    baseline's, of the strategy's examples over the others'), norm_selectivity and norm_strategy_selectivity
    (the ratios divided by them; None without traces) and, for D-NPEFF, mix.
    """

    records: list[dict]
    strategies: tuple[str, ...]
    components: list[int]
    kl_matrix: dict[str, Float[Tensor, "r s"]]
    accuracy_drop: dict[str, Float[Tensor, "r s"]]
    settings: dict

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.records))

    def medians(self, kl_target: float | None = None) -> dict[str, dict[str, float | None]]:
        """Per method: median coefficient and strategy selectivity over components, raw and normalised, at
        ``kl_target`` (default: the first target). None where nothing was measured."""
        kl_target = self.settings["kl_targets"][0] if kl_target is None else kl_target
        out = {}
        for method in self.methods:
            rows = [r for r in self.records if r["method"] == method and r["kl_target"] == kl_target]
            out[method] = {key: median_ignoring_missing([r.get(key) for r in rows]) for key in FIGURES}
        return out

    def to_frame(self):
        """The records as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.records)

    def save(self, path: str | os.PathLike) -> Path:
        """A directory with selectivity.json (records and settings) and matrices.safetensors."""
        with atomic_directory(path) as tmp:
            tensors = {f"{kind}.{method}": m for kind, mats in (("kl", self.kl_matrix), ("accuracy_drop", self.accuracy_drop))
                       for method, m in mats.items()}
            save_tensors(tensors, tmp / "matrices.safetensors")
            save_json({"format": SELECTIVITY_FORMAT, "format_version": 1, "records": self.records,
                       "strategies": list(self.strategies), "components": self.components,
                       "settings": self.settings, "provenance": {"versions": versions()}}, tmp / "selectivity.json")
        return Path(path)


def load_selectivity(path: str | os.PathLike) -> SelectivityResult:
    """Load a result saved with ``SelectivityResult.save``."""
    meta = load_json(Path(path) / "selectivity.json")
    tensors = load_tensors(Path(path) / "matrices.safetensors")
    mats = {"kl": {}, "accuracy_drop": {}}
    for key, value in tensors.items():
        kind, method = key.split(".", 1)
        mats[kind][method] = value
    return SelectivityResult(meta["records"], tuple(meta["strategies"]), meta["components"], mats["kl"],
                             mats["accuracy_drop"], meta["settings"])


def measure_selectivity(
    dictionary: Dictionary,
    heldout: LabeledExamples,
    *,
    components: Sequence[int] | None = None,
    coefficients: Float[Tensor, "n_heldout r"] | None = None,
    fisher_traces: Float[Tensor, " n_heldout"] | None = None,
    config: SelectivityConfig = SelectivityConfig(),
    progress: bool = True,
) -> SelectivityResult:
    """Coefficient and strategy selectivity of a dictionary's components, with controls for parameter-space
    dictionaries (see the module docstring).

    Args:
        dictionary: e.g. ``NPEFFDictionary``; its training examples give each component's strategy.
        heldout: examples not used in the fit, with answers (default: the model's predictions) and strategy
            labels (needed for strategy selectivity and the matrices).
        components: which components (default all).
        coefficients: the held-out coefficients if already computed (default: ``dictionary.coefficients``).
        fisher_traces: tr F_i of the held-out examples, for normalised selectivity (default: computed over a
            parameter-space dictionary's space with ``config.trace_classes``; without them, dictionaries that
            act on activations get no normalised figures).
    """
    r = dictionary.n_components
    if len(heldout) < config.n_top + config.n_baseline:
        raise ValueError(f"{len(heldout)} held-out examples are too few for a top set of {config.n_top} and a disjoint "
                         f"baseline of {config.n_baseline}; give more held-out examples or lower n_top/n_baseline")
    components = list(range(r)) if components is None else [int(j) for j in components]
    bad = [j for j in components if not 0 <= j < r]
    if bad:
        raise ValueError(f"components {bad} do not exist; the dictionary has {r} (0..{r - 1})")
    W_heldout = (dictionary.coefficients(heldout) if coefficients is None else torch.as_tensor(coefficients)).double().cpu()
    train_labels = dictionary.train.labels
    strategies = tuple(dict.fromkeys(heldout.labels)) if heldout.labels is not None else ()
    masks = {s: torch.tensor([x == s for x in heldout.labels]) for s in strategies}  # held-out examples per strategy
    probe = KLProbe(dictionary.model, heldout.examples, heldout.answers, reverse=config.reverse_kl,
                    batch_size=config.batch_size)
    parameter_space = isinstance(dictionary, ParameterDictionary)
    controls = config.controls if parameter_space else ()
    if fisher_traces is None and parameter_space:
        fisher_traces = dictionary.fisher_traces(heldout, config.trace_classes)
    traces = None if fisher_traces is None else torch.as_tensor(fisher_traces).double().cpu()
    if traces is not None and traces.shape != (len(heldout),):
        raise ValueError(f"fisher_traces has shape {tuple(traces.shape)}; give one trace per held-out example "
                         f"({len(heldout)})")

    records: list[dict] = []
    methods = [dictionary.name, *controls]
    shape = (len(components), len(strategies))
    kl_matrix = {m: torch.full(shape, math.nan, dtype=torch.float64) for m in methods}
    accuracy_drop = {m: torch.full(shape, math.nan, dtype=torch.float64) for m in methods}
    for row, j in enumerate(progress_bar(components, desc=f"selectivity ({dictionary.name})", enabled=progress)):
        top_train = dictionary.top_examples(j, config.n_top_train)
        top = top_of(W_heldout[:, j], config.n_top)
        if len(top_train) == 0 or len(top) == 0:
            logger.warning("component %d has no examples with positive coefficients; it is left out", j)
            continue
        baseline = draw_baseline(len(heldout), top, config.n_baseline, config.seed * 100_003 + j)
        strategy = None
        if train_labels is not None and strategies:
            strategy = component_strategy(dictionary, j, config.n_top_train)
        trace_ratios = {"trace_ratio": None, "strategy_trace_ratio": None}
        if traces is not None:
            trace_ratios = {"trace_ratio": mean_ratio(traces[top], traces[baseline]),
                            "strategy_trace_ratio": _strategy_ratio(traces, masks.get(strategy))}
        start, limit = dictionary.magnitude_bounds(j)
        makers: dict[str, Callable[[int, float], object]] = {
            dictionary.name: lambda sign, m, j=j: dictionary.intervention(j, m, sign)}
        if parameter_space:
            space, seed = dictionary.space, config.seed * 100_003 + j
            randoms = {"random": random_direction(space, seed=seed),
                       "random_support": random_direction(space, seed=seed, support=dictionary.support(j))}
            for c in controls:
                makers[c] = lambda sign, m, d=randoms[c]: perturb(dictionary.model, d, space, m, sign)
        for target in config.kl_targets:
            def mean_kl(m: float, sign: int) -> float:
                return float(probe.run(makers[dictionary.name](sign, m), top)[0].mean())

            found = {sign: calibrate_magnitude(lambda m, sign=sign: mean_kl(m, sign), target, start, config.rtol,
                                               config.max_search_steps, limit) for sign in (1, -1)}
            magnitudes = {sign: m if reached else None for sign, (m, _, reached) in found.items()}
            if None in magnitudes.values():
                logger.warning("%s component %d: mean KL %.3g on the top set is out of reach for sign(s) %s with "
                               "magnitudes up to %.3g; those signs are left out", dictionary.name, j, target,
                               [s for s, m in magnitudes.items() if m is None], limit)
            extra = dictionary.intervention_settings(j)  # after the search above: what it settled on
            for name, make in makers.items():
                record = {"method": name, "component": j, "kl_target": target, "strategy": strategy,
                          **(extra if name == dictionary.name else dict.fromkeys(extra))}
                figures, best = _at_magnitudes(probe, make, magnitudes, top, baseline, masks.get(strategy))
                record.update(figures)
                record.update(trace_ratios)
                record["norm_selectivity"] = _divided(figures["selectivity"], trace_ratios["trace_ratio"])
                record["norm_strategy_selectivity"] = _divided(figures["strategy_selectivity"],
                                                               trace_ratios["strategy_trace_ratio"])
                record["calibrated_plus"], record["calibrated_minus"] = (
                    (found[1][2], found[-1][2]) if name == dictionary.name else (None, None))
                records.append(record)
                if target == config.kl_targets[0] and strategies and best is not None:
                    kl, correct = best
                    for col, mask in enumerate(masks.values()):
                        kl_matrix[name][row, col] = kl[mask].mean()
                        accuracy_drop[name][row, col] = probe.correct[mask].mean() - correct[mask].mean()
    settings = {**asdict(config), "trace_classes": config.trace_classes.to_dict(), "method": dictionary.name,
                "fisher_traces": traces is not None, "n_heldout": len(heldout), "n_train": len(dictionary.train),
                "description": dictionary.describe()}
    return SelectivityResult(records, strategies, components, kl_matrix, accuracy_drop, settings)


def _at_magnitudes(probe: KLProbe, make: Callable[[int, float], object], magnitudes: dict[int, float | None],
                   top: Tensor, baseline: Tensor, in_strategy: Tensor | None):
    """Figures of one intervention family (``make(sign, magnitude)``) at the given magnitude per sign (None: that
    sign is left out; ``in_strategy``: the held-out examples of the component's strategy, None without one), and
    the (KL, correctness) of the sign with the larger coefficient selectivity (None if no sign was measured)."""
    figures, runs = {}, {}
    for sign, suffix in ((1, "_plus"), (-1, "_minus")):
        m = magnitudes[sign]
        figures["magnitude" + suffix] = m
        if m is None:
            figures.update({key + suffix: None for key in ("top_kl", "baseline_kl", "selectivity", "strategy_selectivity")})
            continue
        kl, correct = runs[sign] = probe.run(make(sign, m))
        figures["top_kl" + suffix] = float(kl[top].mean())
        figures["baseline_kl" + suffix] = float(kl[baseline].mean())
        figures["selectivity" + suffix] = mean_ratio(kl[top], kl[baseline])
        figures["strategy_selectivity" + suffix] = _strategy_ratio(kl, in_strategy)
    best = max((1, -1), key=lambda s: _order(figures["selectivity" + ("_plus" if s == 1 else "_minus")]))
    figures["sign"] = best if best in runs else None
    figures["selectivity"] = _best(figures["selectivity_plus"], figures["selectivity_minus"])
    figures["strategy_selectivity"] = _best(figures["strategy_selectivity_plus"], figures["strategy_selectivity_minus"])
    return figures, runs.get(best)


def _strategy_ratio(kl: Tensor, mask: Tensor | None) -> float | None:
    if mask is None or not mask.any() or mask.all():
        return None
    return mean_ratio(kl[mask], kl[~mask])


def _divided(ratio: float | None, trace_ratio: float | None) -> float | None:
    """A selectivity over the trace ratio of its two sets (None when either is missing or not finite)."""
    if ratio is None or trace_ratio is None or not math.isfinite(trace_ratio) or trace_ratio <= 0:
        return None
    return ratio / trace_ratio


def _order(x: float | None) -> float:
    return -math.inf if x is None or math.isnan(x) else x


def _best(a: float | None, b: float | None) -> float | None:
    if _order(a) == -math.inf and _order(b) == -math.inf:
        return None
    return a if _order(a) >= _order(b) else b
