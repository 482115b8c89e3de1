"""The pipeline over one run directory: ``Run`` holds the settings and loads the model, data and dictionaries when
first needed; ``run_stages`` runs the stages of ``npeff_tl.stages`` in order; ``run_all`` is the main job
(``npeff-tl demo``). Each stage reads what earlier stages wrote and writes its own artifacts where
``RunLayout`` says; a stage that finds its artifacts reuses them (PEF stores resume shard by shard), so
re-running a directory is cheap and an interrupted run goes on where it stopped.
"""

from __future__ import annotations

import logging
import time
from functools import cached_property
from pathlib import Path

import torch

from . import distributed
from .config import RunConfig, flat_settings
from .layout import RunLayout
from .memory import batch_size_for
from .stages import STAGE_FUNCTIONS, write_summary
from .store import DirectoryLock, load_json, load_tensors, save_json, save_tensors

logger = logging.getLogger(__name__)

STAGES = ("pefs", "fit", "selectivity", "compare", "report")
RENAMED_STAGES = {"perturb": "selectivity"}  # earlier names, still read from timings.json and the command line
DISTRIBUTED_STAGES = ("pefs", "fit")  # under torch.distributed, every rank takes part; rank 0 alone does the rest
# Which settings each stage's artifacts depend on: a directory refuses other settings for a finished stage.
DEPENDS = {"pefs": ("model", "data", "pefs"), "fit": ("fit",), "selectivity": ("selectivity",),
           "compare": ("compare",)}


class Run:
    """One run directory with its settings; the model, data and dictionaries are loaded when first needed."""

    def __init__(self, out: str | Path, config: RunConfig | None = None, progress: bool = True):
        self.out = Path(out)
        self.layout = RunLayout(self.out)
        self.progress = progress
        self.say = print if progress and distributed.rank() == 0 else logger.info
        self.writes = distributed.rank() == 0  # under torch.distributed, rank 0 alone writes the run's files
        self._pef_settings: dict[str, dict] = {}
        self._pefs: dict = {}
        saved = self.saved_config(out)
        timings = load_json(self.layout.timings) if self.layout.timings.exists() else {}
        self.timings = {RENAMED_STAGES.get(stage, stage): seconds for stage, seconds in timings.items()}
        if config is None:
            config = saved or RunConfig()
        elif saved:
            self._check_compatible(saved, config)
        self.config = config
        self.methods(), self.target  # settings that name things are checked before anything is written
        c = config.compare
        if len(c.sae_k) != len(c.sae_widths):
            raise ValueError(f"compare.sae_k {c.sae_k} needs one k per width in compare.sae_widths {c.sae_widths}")
        if any(not 1 <= k <= width for k, width in zip(c.sae_k, c.sae_widths)):
            raise ValueError(f"compare.sae_k {c.sae_k} needs 1 <= k <= width for each width in compare.sae_widths "
                             f"{c.sae_widths}; lower k or widen the SAE")
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = DirectoryLock(self.out)
        if self.writes:  # one run per directory (under torch.distributed, rank 0 holds it for all ranks)
            self.lock.acquire()
            save_json(config.to_dict(), self.layout.config)

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
        path = RunLayout(Path(out)).config
        return RunConfig.from_dict(load_json(path)) if path.exists() else None

    def _check_compatible(self, saved: RunConfig, config: RunConfig) -> None:
        old_values, new_values = flat_settings(saved), flat_settings(config)
        for stage, sections in DEPENDS.items():
            if stage not in self.timings:
                continue
            for section in sections:
                changed = [f"{key}: {old_values[key]!r} -> {new_values[key]!r}" for key in old_values
                           if key.split(".")[0] == section and old_values[key] != new_values[key]]
                if changed:
                    raise ValueError(f"{self.out} holds a finished '{stage}' stage made with other settings "
                                     f"({'; '.join(changed)}); use a new --out directory")

    def stage(self, name: str, fn) -> None:
        """Run stage ``name``; its wall time is recorded the first time it runs."""
        start = time.perf_counter()
        fn(self)
        if name not in self.timings and self.writes:
            self.timings[name] = time.perf_counter() - start
            save_json(self.timings, self.layout.timings)

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
                batch_size=s["batch_size"], store=self.layout.pef_store(kind), answers=self.data.train.answers,
                progress=self.progress)
        return self._pefs[kind]

    def decomposition(self, method: str):
        from .decomp import load_decomposition

        path = self.layout.decomposition(method)
        if not self.layout.has_decomposition(method):
            raise FileNotFoundError(f"{path} has no decomposition; run `npeff-tl fit --out {self.out}` first")
        return load_decomposition(path)

    @cached_property
    def npeff_dictionaries(self) -> list:
        from .decomp import VARIANTS
        from .dictionaries import NPEFFDictionary

        return [NPEFFDictionary(self.model, self.decomposition(m), self.data.train, self.target,
                                self.pefs(VARIANTS[m].pefs.name), name=m, seed=self.config.fit.seed,
                                mix_grid=self.config.selectivity.dnpeff_mixes)
                for m in self.methods()]

    @cached_property
    def test_traces(self) -> torch.Tensor:
        """tr F_i over the run's space of the test examples, for normalised selectivity; computed once and saved."""
        from .pefs import fisher_traces

        path = self.layout.test_traces
        if not path.exists():
            rule = self.config.selectivity.trace_classes
            save_tensors({"fisher_trace": fisher_traces(self.model, self.data.test.examples, self.space, rule,
                                                        batch_size=self.config.pefs.batch_size)}, path)
        return load_tensors(path)["fisher_trace"]

    def save_coefficients(self, dictionary) -> None:
        path = self.layout.coefficients(dictionary.name)
        if not path.exists():
            save_tensors({"train": torch.as_tensor(dictionary.train_coefficients).float(),
                          "test": torch.as_tensor(dictionary.coefficients(self.data.test)).float()}, path)

    def coefficients(self, name: str) -> dict[str, torch.Tensor]:
        return load_tensors(self.layout.coefficients(name))


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
