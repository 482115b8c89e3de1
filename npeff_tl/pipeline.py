"""The pipeline as stages over one run directory: ``pefs`` -> ``fit`` -> ``perturb`` -> ``compare`` -> ``report``.

Each stage reads what earlier stages wrote and writes its own artifacts; a stage that finds its artifacts
reuses them (PEF stores resume shard by shard), so re-running a directory is cheap and an interrupted run
goes on where it stopped. ``run_all`` is the main job (``npeff-tl demo``). Layout of DIR:

    config.json                      the resolved settings (RunConfig)
    timings.json                     each stage's wall time, recorded the first time it runs
    data/examples.json               train/test examples as string tokens, target positions, answers, labels
    pefs/train_{diagonal,lowrank}/   PEF stores of the train split
    {dnpeff,lrm_npeff}/              decompositions
    data/test_fisher_traces.safetensors  the test examples' Fisher traces (normalised selectivity)
    coefficients/{method}.safetensors  train and test coefficients of every dictionary
    selectivity/{method}/            held-out selectivity with controls (perturb), and of the baselines (compare)
    saes/{width}_{hook}/             SAE-Lens SAEs
    comparison/                      comparison.csv / .json
    summary.json, report.html
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from functools import cached_property
from pathlib import Path

import torch

from . import distributed
from .config import RunConfig
from .memory import batch_size_for, estimate_memory, shortfall
from .evaluation.selectivity import FIGURES as SELECTIVITY_FIGURES
from .store import DirectoryLock, load_json, load_tensors, save_json, save_tensors

logger = logging.getLogger(__name__)

STAGES = ("pefs", "fit", "perturb", "compare", "report")
DISTRIBUTED_STAGES = ("pefs", "fit")  # under torch.distributed, every rank takes part; rank 0 alone does the rest
FIGURES = ("ami", "nmi", "purity_at_20", "multi_factor_recall", *(f"median_{f}" for f in SELECTIVITY_FIGURES))
# Which settings each stage's artifacts depend on: a directory refuses other settings for a finished stage.
DEPENDS = {"pefs": ("model", "data", "pefs"), "fit": ("fit",), "perturb": ("perturb",), "compare": ("compare",)}


class Run:
    """One run directory with its settings; the model, data and dictionaries are loaded when first needed."""

    def __init__(self, out: str | Path, config: RunConfig | None = None, progress: bool = True):
        self.out = Path(out)
        self.progress = progress
        self.say = print if progress and distributed.rank() == 0 else logger.info
        self.writes = distributed.rank() == 0  # under torch.distributed, rank 0 alone writes the run's files
        self._pef_settings: dict[str, dict] = {}
        self._pefs: dict = {}
        saved = self.saved_config(out)
        self.timings = load_json(self.out / "timings.json") if (self.out / "timings.json").exists() else {}
        if config is None:
            config = saved or RunConfig()
        elif saved:
            self._check_compatible(saved, config)
        self.config = config
        self.methods(), self.target  # settings that name things are checked before anything is written
        c = config.compare
        if len(c.sae_k) != len(c.sae_widths):
            raise ValueError(f"compare.sae_k {c.sae_k} needs one k per width in compare.sae_widths {c.sae_widths}")
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = DirectoryLock(self.out)
        if self.writes:  # one run per directory (under torch.distributed, rank 0 holds it for all ranks)
            self.lock.acquire()
            save_json(config.to_dict(), self.out / "config.json")

    def close(self) -> None:
        """Release the run directory for other runs."""
        self.lock.release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def saved_config(out: str | Path) -> RunConfig | None:
        """The settings a run directory was made with (None for a new directory)."""
        path = Path(out) / "config.json"
        return RunConfig.from_dict(load_json(path)) if path.exists() else None

    def _check_compatible(self, saved: RunConfig, config: RunConfig) -> None:
        for stage, sections in DEPENDS.items():
            if stage not in self.timings:
                continue
            for section in sections:
                old, new = getattr(saved, section), getattr(config, section)
                changed = [f"{section}.{f.name}: {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
                           for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]
                if changed:
                    raise ValueError(f"{self.out} holds a finished '{stage}' stage made with other settings "
                                     f"({'; '.join(changed)}); use a new --out directory")

    def stage(self, name: str, fn) -> None:
        """Run stage ``name``; its wall time is recorded the first time it runs."""
        start = time.perf_counter()
        fn(self)
        if name not in self.timings and self.writes:
            self.timings[name] = time.perf_counter() - start
            save_json(self.timings, self.out / "timings.json")

    @property
    def model_name(self) -> str:
        from .sources import ZOO_PREFIX

        return self.config.model.name.removeprefix(ZOO_PREFIX)

    @cached_property
    def model(self):
        from .sources import load_model

        return load_model(self.config.model.name, self.config.model.device)

    @cached_property
    def data(self):
        from .sources import load_data

        return load_data(self.config.data, self.model, self.config.model.name)

    @cached_property
    def space(self):
        from .params import ParamSpace

        return ParamSpace(self.model, include=self.config.pefs.include, exclude=self.config.pefs.exclude)

    @cached_property
    def target(self):
        from .targets import Target

        return Target(classes=self.config.pefs.class_rule())

    def methods(self) -> list[str]:
        from .decomp import VARIANTS

        unknown = [m for m in self.config.fit.methods if m not in VARIANTS]
        if unknown:
            raise ValueError(f"fit.methods {unknown} are unknown; choose from {', '.join(VARIANTS)}")
        return list(self.config.fit.methods)

    def pef_settings(self, kind: str) -> dict:
        """compute_pefs's settings for ``kind``: the batch size is picked from pefs.memory_budget_gb if set."""
        if kind in self._pef_settings:
            return self._pef_settings[kind]
        from .pefs.containers import check_nnz
        from .pefs.kinds import pef_kind

        p, examples = self.config.pefs, self.data.train.examples
        pefs_kind = pef_kind(kind)
        size = pefs_kind.choice_size(self.space.size, self.target.classes.max_classes)
        try:  # the API's own check, named as the setting
            nnz = check_nnz(p.nnz, size, pefs_kind.counted)
        except ValueError as error:
            raise ValueError(f"pefs.{error}") from None
        sizes = {"model": self.model, "space": self.space, "target": self.target, "kind": kind, "nnz": nnz,
                 "n_examples": len(examples), "seq_len": int(examples.tokens.shape[1])}
        batch = p.batch_size if p.memory_budget_gb is None else batch_size_for(int(p.memory_budget_gb * 2**30),
                                                                                 **sizes)
        self._pef_settings[kind] = {**sizes, "batch_size": batch}
        return self._pef_settings[kind]

    def pefs(self, kind: str):
        """The train PEFs of ``kind``: computed (or resumed) into the store the first time, then kept."""
        from .pefs import compute_pefs

        if kind not in self._pefs:
            s = self.pef_settings(kind)
            self._pefs[kind] = compute_pefs(
                self.model, self.data.train.examples, self.space, self.target, kind, nnz=s["nnz"],
                batch_size=s["batch_size"], store=self.out / "pefs" / f"train_{kind}", answers=self.data.train.answers,
                progress=self.progress)
        return self._pefs[kind]

    def decomposition(self, method: str):
        from .decomp import load_decomposition

        path = self.out / method
        if not (path / "metadata.json").exists():
            raise FileNotFoundError(f"{path} has no decomposition; run `npeff-tl fit --out {self.out}` first")
        return load_decomposition(path)

    @cached_property
    def npeff_dictionaries(self) -> list:
        from .decomp import VARIANTS
        from .dictionaries import NPEFFDictionary

        return [NPEFFDictionary(self.model, self.decomposition(m), self.data.train, self.target,
                                self.pefs(VARIANTS[m].pefs.name), name=m, seed=self.config.fit.seed)
                for m in self.methods()]

    @cached_property
    def test_traces(self) -> torch.Tensor:
        """tr F_i over the run's space of the test examples, for normalised selectivity; computed once and saved."""
        from .pefs import fisher_traces

        path = self.out / "data" / "test_fisher_traces.safetensors"
        if not path.exists():
            rule = _selectivity_config(self).trace_classes
            save_tensors({"fisher_trace": fisher_traces(self.model, self.data.test.examples, self.space, rule,
                                                        batch_size=self.config.pefs.batch_size)}, path)
        return load_tensors(path)["fisher_trace"]

    def save_coefficients(self, dictionary) -> None:
        path = self.out / "coefficients" / f"{dictionary.name}.safetensors"
        if not path.exists():
            save_tensors({"train": torch.as_tensor(dictionary.train_coefficients).float(),
                          "test": torch.as_tensor(dictionary.coefficients(self.data.test)).float()}, path)

    def coefficients(self, name: str) -> dict[str, torch.Tensor]:
        return load_tensors(self.out / "coefficients" / f"{name}.safetensors")


def stage_pefs(run: Run) -> None:
    """Train-split PEFs of every kind the fit needs, and the examples as text for the report."""
    data, space = run.data, run.space
    run.say(f"npeff-tl: {run.model_name}, {len(data.train)} train / {len(data.test)} test examples, "
            f"{space.size:,} parameters -> {run.out}")
    if run.writes:
        save_json(data.display, run.out / "data" / "examples.json")
    from .decomp import VARIANTS

    for method in run.methods():
        kind = VARIANTS[method].pefs.name
        if not (run.out / "pefs" / f"train_{kind}" / "dataset_fisher.safetensors").exists():
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

    for method in run.methods():
        if not (run.out / method / "metadata.json").exists():
            fit, variant = run.config.fit, VARIANTS[method]
            pefs = run.pefs(variant.pefs.name)
            columns = int((torch.bincount(pefs.indices.flatten(), minlength=pefs.space.size) > 0).sum())
            estimate = estimate_memory(method, n_examples=len(pefs), nnz=pefs.nnz, n_columns=columns,
                                       rank=fit.components, classes=getattr(pefs, "max_rank", 1))
            run.say(f"  {method}: {fit.components} components over {columns:,} parameters, about {estimate}")
            _warn_if_short(estimate, f"the {method} fit")
            decomposition = variant.solver(fit.components, seed=fit.seed).fit(pefs, progress=run.progress)
            if run.writes:
                decomposition.save(run.out / method)
        run.say(f"  {method}: {run.config.fit.components} components fitted")


def _selectivity_config(run: Run):
    from .evaluation.selectivity import SelectivityConfig

    p = run.config.perturb
    return SelectivityConfig(n_top=p.n_top, n_baseline=p.n_baseline, kl_targets=tuple(p.kl_targets), seed=p.seed)


def _measure(run: Run, dictionary) -> None:
    """Held-out selectivity of ``dictionary``'s components with the most training mass, saved once. Normalised
    by the test examples' Fisher traces over the run's space, computed once for every dictionary that perturbs
    that space or acts on activations (gradient clustering perturbs a space of its own, and takes its own)."""
    from .dictionaries import ParameterDictionary
    from .evaluation.labels import components_by_mass
    from .evaluation.selectivity import measure_selectivity

    path = run.out / "selectivity" / dictionary.name
    if not (path / "selectivity.json").exists():
        run.save_coefficients(dictionary)
        own_space = isinstance(dictionary, ParameterDictionary) and dictionary.space != run.space
        traces = None if own_space else run.test_traces
        components = sorted(components_by_mass(dictionary.train_coefficients, run.config.perturb.components))
        measure_selectivity(dictionary, run.data.test, components=components,
                            coefficients=run.coefficients(dictionary.name)["test"], fisher_traces=traces,
                            config=_selectivity_config(run), progress=run.progress).save(path)
    if run.writes and not (path / "effects.json").exists():
        _save_effects(run, dictionary, path)


def _save_effects(run: Run, dictionary, path: Path) -> None:
    """The logit effects of the measured components (``npeff_tl.effects``), with the text of every token named."""
    from .effects import logit_effects
    from .evaluation.selectivity import load_selectivity
    from .sources import str_tokens

    effects = [e.to_dict() for e in logit_effects(dictionary, run.data.test, load_selectivity(path),
                                                  run.coefficients(dictionary.name)["test"])]
    ids = sorted({t for e in effects for key in ("promoted", "suppressed", "before", "after") for t, _ in e[key]})
    save_json({"effects": effects, "tokens": dict(zip(map(str, ids), str_tokens(run.model, ids)))},
              path / "effects.json")


def stage_perturb(run: Run) -> None:
    """Perturb along each NPEFF component: held-out coefficient and strategy selectivity with random controls."""
    for dictionary in run.npeff_dictionaries:
        _measure(run, dictionary)
        run.say(f"  {dictionary.name}: selectivity measured")


def _baselines(run: Run) -> list:
    """The baseline dictionaries: SAEs and k-means at the label-free hook (and, with compare.oracle_hooks, at
    the hook chosen with labels), gradient clustering."""
    from .baselines import ActivationKMeans, GradientClustering, SAEDictionary, evaluate_sae, load_sae, train_sae
    from .baselines.activations import middle_hook, residual_hooks

    c, model, train = run.config.compare, run.model, run.data.train
    hook = c.hook or middle_hook(model)
    oracle = (c.hooks or residual_hooks(model)) if c.oracle_hooks else []
    if oracle and train.labels is None:
        raise ValueError("compare.oracle_hooks chooses a hook with the examples' labels, but they have none; "
                         "turn it off or give labels")

    def sae_at(hook_name: str, width: int, k: int, name: str, evaluate: bool = True):
        path = run.out / "saes" / f"{width}_{hook_name}"
        sae = (load_sae(path) if (path / "cfg.json").exists() else
               train_sae(model, train, hook_name, width, k=k, steps=c.sae_steps, seed=c.seed, out=path, progress=False))
        figures = evaluate_sae(model, sae, run.data.test) if evaluate else None
        return SAEDictionary(model, sae, train, name=name, evaluation=figures)

    out = []
    for width, k in zip(c.sae_widths, c.sae_k):
        out.append(sae_at(hook, width, k, f"sae_{width}"))
        if oracle:
            name = f"sae_{width}_oracle_hook"
            chosen = _with_labels([sae_at(h, width, k, name, evaluate=False) for h in oracle], train)
            out.append(sae_at(chosen.hook_name, width, k, name))  # the chosen one again, with its figures
        for d in out[-2 if oracle else -1:]:
            run.say(f"  {d.name}: TopK k={k} at {d.hook_name}")
    r = run.config.fit.components
    if c.gradient_clustering:
        out.append(GradientClustering(model, train, r, seed=c.seed))
    if c.activation_kmeans:
        out.append(ActivationKMeans(model, train, hook, r, seed=c.seed))
        if oracle:
            out.append(_with_labels([ActivationKMeans(model, train, h, r, seed=c.seed,
                                                      name="activation_kmeans_oracle_hook") for h in oracle], train))
    return out


def _with_labels(candidates: list, train):
    """The candidate (one per hook) with the best AMI against the labels on the train split: an oracle choice."""
    from .evaluation.metrics import train_ami

    return max(candidates, key=train_ami)


def stage_compare(run: Run) -> None:
    """Baselines next to NPEFF on the test split (label metrics, matching, selectivity), and summary.json."""
    from .evaluation.comparison import compare
    from .evaluation.selectivity import load_selectivity

    dictionaries = run.npeff_dictionaries + _baselines(run)
    if not (run.out / "comparison" / "comparison.json").exists():
        for d in dictionaries:
            run.save_coefficients(d)
            if run.config.compare.selectivity or d in run.npeff_dictionaries:
                _measure(run, d)
        measured = {d.name: load_selectivity(run.out / "selectivity" / d.name) for d in dictionaries
                    if (run.out / "selectivity" / d.name / "selectivity.json").exists()}
        compare(dictionaries, run.data.test, measured=measured, out=run.out / "comparison", progress=run.progress)
    run.say("  comparison done")


def stage_report(run: Run) -> None:
    from .report import write_report

    write_report(run.out)
    run.say(f"  report: {run.out / 'report.html'}")


STAGE_FUNCTIONS = {"pefs": stage_pefs, "fit": stage_fit, "perturb": stage_perturb, "compare": stage_compare,
                   "report": stage_report}


def run_stages(run: Run, names: list[str]) -> dict | None:
    """Run the stages ``names`` in order; after ``compare``, write summary.json and return it. Under
    torch.distributed, the PEF and fit stages run on every rank; then the group ends and rank 0 goes on alone."""
    summary = None
    for name in names:
        if name not in DISTRIBUTED_STAGES and distributed.active() and not distributed.leave():
            return None
        run.stage(name, STAGE_FUNCTIONS[name])
        if name == "compare":
            summary = write_summary(run)
    return summary


def run_all(out: str | Path, config: RunConfig | None = None, progress: bool = True) -> dict | None:
    """Every stage into ``out``; returns summary.json's contents (None on ranks other than 0 under
    torch.distributed)."""
    with Run(out, config, progress) as run:
        return run_stages(run, list(STAGES))


def write_summary(run: Run) -> dict:
    """summary.json from the comparison: per method the figures of FIGURES, per control the medians pooled
    over the NPEFF methods' components; ``seconds`` is the sum of the stages' first-run times."""
    from .evaluation.metrics import median_ignoring_missing
    from .evaluation.selectivity import load_selectivity

    rows = {row["method"]: row for row in load_json(run.out / "comparison" / "comparison.json")["rows"]}
    methods = {name: {key: _finite(row.get(key)) for key in FIGURES} for name, row in rows.items() if "/" not in name}
    controls = {}
    for control in ("random", "random_support"):
        records = []
        for name in run.methods():
            result = load_selectivity(run.out / "selectivity" / name)
            first = result.settings["kl_targets"][0]
            records += [r for r in result.records if r["method"] == control and r["kl_target"] == first]
        controls[control] = {f"median_{figure}": _finite(median_ignoring_missing([r.get(figure) for r in records]))
                             for figure in SELECTIVITY_FIGURES}
    summary = {"model": run.model_name, "n_examples": len(run.data.train) + len(run.data.test),
               "seconds": round(sum(t for k, t in run.timings.items() if k != "report"), 1), "methods": methods,
               "controls": controls}
    save_json(summary, run.out / "summary.json")
    return summary


def _finite(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value
