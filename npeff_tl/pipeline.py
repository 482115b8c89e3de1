"""The main job, end to end on a zoo model: PEFs, D-NPEFF and LRM-NPEFF, the baselines (SAEs of two widths,
gradient clustering, activation k-means), the comparison with selectivity and random controls, and
``summary.json``. Every stage writes its artifacts under one directory; a re-run with the same directory reuses
the finished stages (PEF stores resume shard by shard), and ``seconds`` stays the wall time of the run from
scratch (each stage's time is recorded when it first runs).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .comparison import compare, train_ami
from .decomp import DNPEFF, LRMNPEFF, load_decomposition
from .dictionaries import NPEFFDictionary
from .examples import LabeledExamples
from .params import ParamSpace
from .pefs import compute_pefs
from .selectivity import load_selectivity
from .store import load_json, save_json
from .targets import Target, TopK

logger = logging.getLogger(__name__)

FIGURES = ("ami", "nmi", "purity_at_20", "multi_factor_recall", "median_selectivity", "median_strategy_selectivity")


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the main job (defaults finish in a few minutes on 2 CPU cores)."""

    model: str = "tasks-2l"
    per_task: int = 64  # train and test examples per zoo task
    components: int = 16  # NPEFF components, clusters, and the narrower SAE's features
    wide_sae: int = 128  # the wider SAE's features
    nnz: int = 4096
    sae_steps: int = 1000
    selectivity_components: int = 16  # per dictionary, the ones with the largest training mass
    seed: int = 0
    batch_size: int = 16


class _Stages:
    """Per-stage wall times in DIR/timings.json, recorded the first time each stage runs."""

    def __init__(self, out: Path):
        self.path = out / "timings.json"
        self.times = load_json(self.path) if self.path.exists() else {}

    def run(self, name: str, fn):
        start = time.perf_counter()
        result = fn()
        if name not in self.times:
            self.times[name] = time.perf_counter() - start
            save_json(self.times, self.path)
        return result


def run_demo(out: str | Path, config: DemoConfig = DemoConfig(), progress: bool = True) -> dict:
    """Run the main job into ``out``; returns (and writes) the summary."""
    from . import zoo
    from .baselines import ActivationKMeans, GradientClustering, SAEDictionary, evaluate_sae, load_sae, train_sae

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(out)
    say = print if progress else logger.info
    model, data = zoo.load(config.model, n_train=config.per_task, n_test=config.per_task)
    train = LabeledExamples.from_dataset(data["train"])
    test = LabeledExamples.from_dataset(data["test"])
    space = ParamSpace(model, include=["blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*"])
    target = Target("last", TopK(4))
    say(f"npeff-tl demo: zoo {config.model}, {len(train)} train / {len(test)} test examples, "
        f"{space.size:,} parameters, {config.components} components -> {out}")

    dictionaries = []
    for kind, solver, name in (("diagonal", DNPEFF, "dnpeff"), ("lowrank", LRMNPEFF, "lrm_npeff")):
        pefs = stages.run(f"pefs_{kind}", lambda kind=kind: compute_pefs(
            model, train.examples, space, target, kind, nnz=config.nnz, batch_size=config.batch_size,
            store=out / "pefs" / f"train_{kind}", answers=train.answers, progress=progress))

        def fit(kind=kind, solver=solver, name=name, pefs=pefs):
            if (out / name / "metadata.json").exists():
                return load_decomposition(out / name)
            decomposition = solver(config.components, seed=config.seed).fit(pefs, progress=progress)
            decomposition.save(out / name)
            return decomposition

        decomposition = stages.run(name, fit)
        dictionaries.append(NPEFFDictionary(model, decomposition, train, target, pefs, seed=config.seed))
        say(f"  {name}: fitted ({stages.times[name]:.0f} s)")

    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)]
    hooks.append(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")

    for width, k in ((config.components, 4), (config.wide_sae, 8)):
        def saes(width=width, k=k):
            by_hook = {}
            for hook in hooks:
                path = out / "saes" / f"{width}_{hook}"
                sae = (load_sae(path) if (path / "cfg.json").exists() else
                       train_sae(model, train, hook, width, k=k, steps=config.sae_steps, seed=config.seed, out=path,
                                 progress=False))
                by_hook[hook] = SAEDictionary(model, sae, train, name=f"sae_{width}")
            return max(by_hook.values(), key=train_ami)  # the hook is chosen on the train split only

        chosen = stages.run(f"sae_{width}", saes)
        chosen.evaluation = evaluate_sae(model, chosen.sae, test)
        dictionaries.append(chosen)
        say(f"  sae_{width}: TopK k={k} at {chosen.hook_name} ({stages.times[f'sae_{width}']:.0f} s)")

    dictionaries.append(stages.run("gradient_clustering", lambda: GradientClustering(
        model, train, config.components, seed=config.seed)))
    dictionaries.append(stages.run("activation_kmeans", lambda: max(
        (ActivationKMeans(model, train, hook, config.components, seed=config.seed) for hook in hooks),
        key=train_ami)))
    say(f"  gradient clustering and activation k-means ({stages.times['gradient_clustering'] + stages.times['activation_kmeans']:.0f} s)")

    def comparison():
        if not (out / "comparison" / "comparison.json").exists():
            compare(dictionaries, test, selectivity=True, selectivity_components=config.selectivity_components,
                    out=out / "comparison", progress=progress)
        return load_json(out / "comparison" / "comparison.json")["rows"]

    rows = stages.run("comparison", comparison)
    say(f"  comparison with selectivity ({stages.times['comparison']:.0f} s)")
    summary = _summary(out, config, rows, [d.name for d in dictionaries], len(train) + len(test),
                       sum(stages.times.values()))
    save_json(summary, out / "summary.json")
    save_json({"config": asdict(config)}, out / "config.json")
    return summary


def _summary(out: Path, config: DemoConfig, rows: list[dict], names: list[str], n_examples: int,
             seconds: float) -> dict:
    by_name = {row["method"]: row for row in rows}
    methods = {name: {key: _finite(by_name[name].get(key)) for key in FIGURES} for name in names}
    controls = {}
    for control in ("random", "random_support"):  # pooled over the components of both NPEFF methods
        records = []
        for name in ("dnpeff", "lrm_npeff"):
            result = load_selectivity(out / "comparison" / "selectivity" / name)
            first = result.settings["kl_targets"][0]
            records += [r for r in result.records if r["method"] == control and r["kl_target"] == first]
        controls[control] = {key: _median([r[figure] for r in records])
                             for key, figure in (("median_selectivity", "selectivity"),
                                                 ("median_strategy_selectivity", "strategy_selectivity"))}
    return {"model": config.model, "n_examples": n_examples, "seconds": round(seconds, 1), "methods": methods,
            "controls": controls}


def _finite(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def _median(values) -> float | None:
    finite = [v for v in values if _finite(v) is not None]
    return float(torch.tensor(finite, dtype=torch.float64).median()) if finite else None
