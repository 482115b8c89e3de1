"""Where a run directory keeps each artifact: one object, so the stages, the report and the CLI agree on paths.

    config.json                      the resolved settings (RunConfig)
    timings.json                     each stage's wall time, recorded the first time it runs
    data/examples.json               train/test examples as string tokens, target positions, answers, labels
    data/test_fisher_traces.safetensors  the test examples' Fisher traces (normalised selectivity)
    pefs/train_{diagonal,lowrank}/   PEF stores of the train split
    {dnpeff,lrm_npeff}/              decompositions
    coefficients/{name}.safetensors  train and test coefficients of every dictionary
    selectivity/{name}/              held-out selectivity with controls, logit effects, and traces/ (circuits)
    saes/{width}_{hook}/             SAE-Lens SAEs
    comparison/                      comparison.csv / .json
    summary.json, report.html
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def examples(self) -> Path:
        return self.root / "data" / "examples.json"

    @property
    def test_traces(self) -> Path:
        return self.root / "data" / "test_fisher_traces.safetensors"

    def pef_store(self, kind: str) -> Path:
        return self.root / "pefs" / f"train_{kind}"

    def decomposition(self, method: str) -> Path:
        return self.root / method

    def coefficients(self, name: str) -> Path:
        return self.root / "coefficients" / f"{name}.safetensors"

    def selectivity(self, name: str) -> Path:
        return self.root / "selectivity" / name

    def effects(self, name: str) -> Path:
        return self.selectivity(name) / "effects.json"

    def traces(self, name: str) -> Path:
        """One saved trace per measured component (``{j}/``) and ``index.json``, written last."""
        return self.selectivity(name) / "traces"

    def sae(self, width: int, hook: str) -> Path:
        return self.root / "saes" / f"{width}_{hook}"

    @property
    def comparison(self) -> Path:
        return self.root / "comparison"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    # ------------------------------------------------------------------------------ what is finished
    def has_pefs(self, kind: str) -> bool:
        return (self.pef_store(kind) / "dataset_fisher.safetensors").exists()  # written last

    def has_decomposition(self, method: str) -> bool:
        return (self.decomposition(method) / "metadata.json").exists()

    def has_selectivity(self, name: str) -> bool:
        return (self.selectivity(name) / "selectivity.json").exists()

    def has_effects(self, name: str) -> bool:
        return self.effects(name).exists()

    def has_traces(self, name: str) -> bool:
        return (self.traces(name) / "index.json").exists()

    def has_comparison(self) -> bool:
        return (self.comparison / "comparison.json").exists()

    def measured(self) -> list[str]:
        """Names of the dictionaries whose selectivity is on disk."""
        return sorted(p.parent.name for p in (self.root / "selectivity").glob("*/selectivity.json"))

    def with_coefficients(self) -> list[str]:
        """Names of the dictionaries whose coefficients are on disk."""
        return sorted(p.stem for p in (self.root / "coefficients").glob("*.safetensors"))
