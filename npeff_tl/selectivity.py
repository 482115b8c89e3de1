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
  larger coefficient selectivity).

Controls get the same procedure at the same magnitudes: a random direction over the whole space, and one on the
component's support. D-NPEFF components use the Fisher-weighted perturbation (``dnpeff_direction``); its sign
pattern comes from the top training examples and its mixing weight is chosen on training examples (the one
whose calibrated perturbation is most selective there), so nothing about the held-out examples shapes it.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from .adapters import ModelAdapter, as_adapter
from .decomp import Decomposition
from .examples import LabeledExamples
from .interventions import (
    dnpeff_direction,
    kl_rows,
    lrm_direction,
    perturb,
    random_direction,
    sign_pattern,
    target_log_probs,
)
from .store import atomic_directory, load_json, load_tensors, save_json, save_tensors, versions

logger = logging.getLogger(__name__)

CONTROLS = ("random", "random_support")
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
        n_top_train: top training examples per component: they pick its strategy and, for D-NPEFF, its sign
            pattern and mixing weight.
        mix_grid: D-NPEFF mixing weights tried (see ``dnpeff_direction``).
        fisher_floor: floor of the unit-norm dataset Fisher in the D-NPEFF perturbation.
        max_abs_cos: LRM-NPEFF semi-orthogonalisation (``lrm_direction``); None for none.
        controls: which controls to run, from ("random", "random_support").
        rtol: relative tolerance on the KL target.
        max_search_steps: KL evaluations allowed per magnitude search.
        max_relative_magnitude: the largest step searched, relative to the norm of the space's parameters; a sign
            whose KL target needs more is left out (its figures are None).
        batch_size: examples per forward pass.
        seed: seeds the baselines and the control directions.
    """

    n_top: int = 20
    n_baseline: int = 200
    kl_targets: tuple[float, ...] = (0.5, 0.1)
    reverse_kl: bool = False
    n_top_train: int = 20
    mix_grid: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    fisher_floor: float = 1e-6
    max_abs_cos: float | None = None
    controls: tuple[str, ...] = CONTROLS
    rtol: float = 0.05
    max_search_steps: int = 40
    max_relative_magnitude: float = 1.0
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        for name in ("n_top", "n_baseline", "n_top_train", "max_search_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.kl_targets or min(self.kl_targets) <= 0:
            raise ValueError(f"kl_targets must be positive KL values in nats, got {self.kl_targets}")
        if not self.mix_grid or not all(0 < m < 1 for m in self.mix_grid):
            raise ValueError(f"every mix in mix_grid must be in (0, 1), got {self.mix_grid}")
        unknown = set(self.controls) - set(CONTROLS)
        if unknown:
            raise ValueError(f"unknown controls {sorted(unknown)}; choose from {CONTROLS}")
        if self.max_relative_magnitude <= 0:
            raise ValueError(f"max_relative_magnitude must be > 0, got {self.max_relative_magnitude}")
        if not 0 < self.rtol < 1:
            raise ValueError(f"rtol must be in (0, 1), got {self.rtol}")


def calibrate_magnitude(
    mean_kl: Callable[[float], float], target: float, start: float, rtol: float = 0.05, max_steps: int = 40,
    limit: float = math.inf,
) -> tuple[float, float, bool]:
    """A magnitude m <= ``limit`` with mean_kl(m) within ``rtol`` of ``target``: steps of x4 from ``start`` until
    the target is bracketed, then geometric bisection (KL is continuous in m, so a bracket holds a solution).
    Returns (m, mean_kl(m), reached); when the target is not reached, the closest magnitude seen."""
    low, high, m = 0.0, math.inf, min(start, limit)
    best = (math.inf, start, math.nan)
    for _ in range(max_steps):
        kl = mean_kl(m)
        miss = abs(kl / target - 1)
        if miss < best[0]:
            best = (miss, m, kl)
        if miss <= rtol:
            return m, kl, True
        if kl < target:
            if m >= limit:
                break
            low = m
        else:
            high = m
        m = min(m * 4, limit) if high == math.inf else (high / 4 if low == 0 else math.sqrt(low * high))
    return best[1], best[2], False


class _Probe:
    """A set of examples with their original predictive distributions; KL and correctness under interventions."""

    def __init__(self, model: ModelAdapter, space, labeled: LabeledExamples, config: SelectivityConfig):
        self.model, self.space, self.labeled, self.config = model, space, labeled, config
        self.original = target_log_probs(model, labeled.examples, config.batch_size)
        self.answers = labeled.answers if labeled.answers is not None else self.original.argmax(-1)
        self.correct = (self.original.argmax(-1) == self.answers).double()

    def run(self, intervention, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(KL per example, 1.0 where the answer is still the top prediction) for examples ``index`` (all if None)."""
        index = torch.arange(len(self.labeled)) if index is None else index
        with intervention:
            changed = target_log_probs(self.model, self.labeled.examples.subset(index), self.config.batch_size)
        original = self.original[index]
        kl = kl_rows(original, changed) if self.config.reverse_kl else kl_rows(changed, original)
        return kl, (changed.argmax(-1) == self.answers[index]).double()


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the (at most) k largest positive scores, largest first."""
    top = scores.topk(min(k, len(scores)))
    return top.indices[top.values > 0]


def _draw_baseline(n: int, exclude: Tensor, size: int, seed: int) -> Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[exclude] = False
    rest = torch.nonzero(keep).flatten()
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))
    return rest[order[:size]].sort().values


def _ratio(a: Tensor, b: Tensor) -> float:
    top, base = float(a.mean()), float(b.mean())
    return top / base if base > 0 else (math.inf if top > 0 else math.nan)


@dataclass
class SelectivityResult:
    """Per (method, component, KL target) records, and per method the component x strategy matrices.

    ``records`` rows have: method ("dnpeff" / "lrm_npeff" / a control), component, kl_target, strategy, and per
    sign (suffix ``_plus`` / ``_minus``) magnitude, top_kl, baseline_kl, selectivity, strategy_selectivity,
    calibrated; then selectivity and strategy_selectivity (the larger over the signs), sign (of the larger
    coefficient selectivity) and, for D-NPEFF, mix.
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
        """Per method: median coefficient and strategy selectivity over components, at ``kl_target`` (default:
        the first target). None where nothing was measured."""
        kl_target = self.settings["kl_targets"][0] if kl_target is None else kl_target
        out = {}
        for method in self.methods:
            rows = [r for r in self.records if r["method"] == method and r["kl_target"] == kl_target]
            out[method] = {key: _median([r[key] for r in rows]) for key in ("selectivity", "strategy_selectivity")}
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


def _median(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(torch.tensor(finite, dtype=torch.float64).median()) if finite else None


def measure_selectivity(
    model: nn.Module | ModelAdapter,
    decomposition: Decomposition,
    train: LabeledExamples,
    heldout: LabeledExamples,
    heldout_coefficients: Float[Tensor, "n_heldout r"],
    *,
    dataset_fisher: Float[Tensor, " size"] | None = None,
    components: Sequence[int] | None = None,
    config: SelectivityConfig = SelectivityConfig(),
    progress: bool = True,
) -> SelectivityResult:
    """Coefficient and strategy selectivity of NPEFF components and of the controls (see the module docstring).

    Args:
        train: the examples the decomposition was fitted to, row i of ``decomposition.W`` being example i
            (answers default to the model's predictions; strategies are needed for strategy selectivity).
        heldout: examples not used in the fit, with their coefficients ``heldout_coefficients``
            (``decomposition.fit_coefficients(heldout_pefs)``).
        dataset_fisher: D-NPEFF only: the dataset-level Fisher of the training PEFs (``train_pefs.dataset_fisher``).
        components: which components (default all).
    """
    adapter = as_adapter(model)
    space = decomposition.space
    space.check_model(adapter)
    r = decomposition.n_components
    W_train = decomposition.W.double().cpu()
    W_heldout = torch.as_tensor(heldout_coefficients).double().cpu()
    if len(train) != W_train.shape[0]:
        raise ValueError(f"the decomposition has coefficients for {W_train.shape[0]} training examples but train has "
                         f"{len(train)}; pass the examples its PEFs were computed from, in the same order")
    if tuple(W_heldout.shape) != (len(heldout), r):
        raise ValueError(f"heldout_coefficients must be [{len(heldout)}, {r}] (held-out examples x components), "
                         f"got {tuple(W_heldout.shape)}; use decomposition.fit_coefficients(heldout_pefs)")
    if len(heldout) < config.n_top + config.n_baseline:
        raise ValueError(f"{len(heldout)} held-out examples are too few for a top set of {config.n_top} and a disjoint "
                         f"baseline of {config.n_baseline}; give more held-out examples or lower n_top/n_baseline")
    if decomposition.kind == "diagonal" and dataset_fisher is None:
        raise ValueError("D-NPEFF perturbations need the dataset-level Fisher: pass "
                         "dataset_fisher=train_pefs.dataset_fisher (computed by compute_pefs)")
    components = list(range(r)) if components is None else [int(j) for j in components]
    bad = [j for j in components if not 0 <= j < r]
    if bad:
        raise ValueError(f"components {bad} do not exist; the decomposition has {r} (0..{r - 1})")

    method = "dnpeff" if decomposition.kind == "diagonal" else "lrm_npeff"
    strategies = tuple(dict.fromkeys(heldout.strategies)) if heldout.strategies is not None else ()
    heldout_probe = _Probe(adapter, space, heldout, config)
    train_probe = _Probe(adapter, space, train, config) if decomposition.kind == "diagonal" else None
    theta_norm = float(torch.linalg.vector_norm(space.gather(adapter).double()))
    start, limit = 0.05 * theta_norm, config.max_relative_magnitude * theta_norm

    def search(probe: _Probe, direction: Tensor, sign: int, index: Tensor, target: float) -> tuple[float, float, bool]:
        def mean_kl(m: float) -> float:
            return float(probe.run(perturb(adapter, direction, space, m, sign), index)[0].mean())

        return calibrate_magnitude(mean_kl, target, start, config.rtol, config.max_search_steps, limit)

    records: list[dict] = []
    methods = [method, *config.controls]
    shape = (len(components), len(strategies))
    kl_matrix = {m: torch.full(shape, math.nan, dtype=torch.float64) for m in methods}
    accuracy_drop = {m: torch.full(shape, math.nan, dtype=torch.float64) for m in methods}
    for row, j in enumerate(tqdm(components, desc=f"selectivity ({method})", disable=not progress)):
        top_train = _top(W_train[:, j], config.n_top_train)
        top = _top(W_heldout[:, j], config.n_top)
        if len(top_train) == 0 or len(top) == 0:
            logger.warning("component %d has no examples with positive coefficients; it is left out", j)
            continue
        baseline = _draw_baseline(len(heldout), top, config.n_baseline, config.seed * 100_003 + j)
        strategy = None
        if train.strategies is not None and strategies:
            strategy = Counter(train.strategies[i] for i in top_train.tolist()).most_common(1)[0][0]
        mix = None
        if decomposition.kind == "diagonal":
            signs = sign_pattern(adapter, train.examples.subset(top_train), space,
                                 None if train.answers is None else train.answers[top_train])
            mix, direction = _choose_mix(decomposition, j, dataset_fisher, signs, train_probe, top_train, config, search)
        else:
            direction = lrm_direction(decomposition, j, config.max_abs_cos).double().cpu()
        support = decomposition.full(j).cpu() != 0
        controls = {
            "random": random_direction(space, seed=config.seed * 100_003 + j),
            "random_support": random_direction(space, seed=config.seed * 100_003 + j, support=support),
        }
        for target in config.kl_targets:
            found = {sign: search(heldout_probe, direction, sign, top, target) for sign in (1, -1)}
            magnitudes = {sign: m if reached else None for sign, (m, _, reached) in found.items()}
            if None in magnitudes.values():
                logger.warning("component %d: mean KL %.3g on the top set is out of reach for sign(s) %s within "
                               "a step of %.3g x the parameters' norm; those signs are left out", j, target,
                               [s for s, m in magnitudes.items() if m is None], config.max_relative_magnitude)
            for name, d in [(method, direction)] + [(c, controls[c]) for c in config.controls]:
                record = {"method": name, "component": j, "kl_target": target, "strategy": strategy,
                          "mix": mix if name == method else None}
                figures, best = _at_magnitudes(heldout_probe, d, magnitudes, top, baseline, heldout.strategies, strategy)
                record.update(figures)
                record["calibrated_plus"], record["calibrated_minus"] = (
                    (found[1][2], found[-1][2]) if name == method else (None, None))
                records.append(record)
                if target == config.kl_targets[0] and strategies and best is not None:
                    kl, correct = best
                    for col, s in enumerate(strategies):
                        mask = torch.tensor([x == s for x in heldout.strategies])
                        kl_matrix[name][row, col] = kl[mask].mean()
                        accuracy_drop[name][row, col] = heldout_probe.correct[mask].mean() - correct[mask].mean()
    settings = {**asdict(config), "method": method, "n_heldout": len(heldout), "n_train": len(train)}
    return SelectivityResult(records, strategies, components, kl_matrix, accuracy_drop, settings)


def _at_magnitudes(probe: _Probe, direction: Tensor, magnitudes: dict[int, float | None], top: Tensor,
                   baseline: Tensor, labels: tuple[str, ...] | None, strategy: str | None):
    """Figures of one direction at the given magnitude per sign (None: that sign is left out), and the
    (KL, correctness) of the sign with the larger coefficient selectivity (None if no sign was measured)."""
    figures, runs = {}, {}
    for sign, suffix in ((1, "_plus"), (-1, "_minus")):
        m = magnitudes[sign]
        figures["magnitude" + suffix] = m
        if m is None:
            figures.update({key + suffix: None for key in ("top_kl", "baseline_kl", "selectivity", "strategy_selectivity")})
            continue
        kl, correct = runs[sign] = probe.run(perturb(probe.model, direction, probe.space, m, sign))
        figures["top_kl" + suffix] = float(kl[top].mean())
        figures["baseline_kl" + suffix] = float(kl[baseline].mean())
        figures["selectivity" + suffix] = _ratio(kl[top], kl[baseline])
        figures["strategy_selectivity" + suffix] = _strategy_ratio(kl, labels, strategy)
    best = max((1, -1), key=lambda s: _order(figures["selectivity" + ("_plus" if s == 1 else "_minus")]))
    figures["sign"] = best if best in runs else None
    figures["selectivity"] = _best(figures["selectivity_plus"], figures["selectivity_minus"])
    figures["strategy_selectivity"] = _best(figures["strategy_selectivity_plus"], figures["strategy_selectivity_minus"])
    return figures, runs.get(best)


def _choose_mix(decomposition, j, dataset_fisher, signs, train_probe, top_train, config, search):
    """The mixing weight whose perturbation, calibrated to the first KL target on the top training examples, is
    most selective against a training baseline (the larger over the signs that reach the target); with its
    direction. The first mix when none reaches it."""
    baseline = _draw_baseline(len(train_probe.labeled), top_train, config.n_baseline, config.seed * 100_003 + j)
    best = None
    for mix in config.mix_grid:
        direction = dnpeff_direction(decomposition, j, dataset_fisher, signs, mix, config.fisher_floor)
        if not direction.any():
            continue
        score = -math.inf
        for sign in (1, -1):
            m, _, reached = search(train_probe, direction, sign, top_train, config.kl_targets[0])
            if reached:
                kl, _ = train_probe.run(perturb(train_probe.model, direction, decomposition.space, m, sign),
                                        torch.cat([top_train, baseline]))
                score = max(score, _order(_ratio(kl[: len(top_train)], kl[len(top_train):])))
        if best is None or score > best[0]:
            best = (score, mix, direction)
    if best is None:
        raise ValueError(f"component {j} has no parameter with both a non-zero value and a non-zero sign pattern; "
                         "it cannot be perturbed")
    return best[1], best[2]


def _strategy_ratio(kl: Tensor, labels: tuple[str, ...] | None, strategy: str | None) -> float | None:
    if labels is None or strategy is None:
        return None
    mask = torch.tensor([x == strategy for x in labels])
    if not mask.any() or mask.all():
        return None
    return _ratio(kl[mask], kl[~mask])


def _order(x: float | None) -> float:
    return -math.inf if x is None or math.isnan(x) else x


def _best(a: float | None, b: float | None) -> float | None:
    if _order(a) == -math.inf and _order(b) == -math.inf:
        return None
    return a if _order(a) >= _order(b) else b
