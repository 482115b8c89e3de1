"""The pipeline's settings: one dataclass per stage, read from a TOML or JSON file and ``--set`` overrides.

A run directory keeps the resolved settings in ``config.json``; later stages read them from there, so
``npeff-tl pefs --config my.toml --out runs/x`` followed by ``npeff-tl fit --out runs/x`` needs the file once.
Unknown sections or keys are errors that name the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SPACE = ("blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*")


@dataclass
class ModelConfig:
    """``name``: "zoo:NAME" (shipped weights), a local checkpoint directory (``npeff_tl.save_checkpoint``), or a
    TransformerLens model name (``HookedTransformer.from_pretrained``, needs hub access)."""

    name: str = "zoo:tasks-2l"
    device: str = "cpu"


@dataclass
class DataConfig:
    """``source``: "zoo" (the zoo model's tasks), a ``datasets`` directory (``save_to_disk``; a DatasetDict with
    train/test splits or one Dataset), or a JSONL file. Rows give ``tokens`` (token ids) or ``prompt`` (text,
    tokenized with the model's tokenizer); optionally ``position`` (the target position; default: the last
    token), ``answer`` (a token id or a one-token string), ``label`` (a ground-truth strategy) and ``factors``
    (the strategies an example needs), for the comparison's metrics. The keys name the columns to read.
    Without a test split, ``test_fraction`` of the rows are held out, drawn with ``seed``."""

    source: str = "zoo"
    per_task: int = 64  # zoo only: train and test examples per task
    tokens: str = "tokens"
    prompt: str = "prompt"
    position: str = "position"
    answer: str = "answer"
    label: str = "label"
    factors: str = "factors"
    prepend_bos: bool = True  # prompts only
    test_fraction: float = 0.5
    max_examples: int | None = None  # per split
    seed: int = 0


@dataclass
class PEFConfig:
    """Parameter space (TL name globs), class rule (``classes``: "top_k" (``k``), "threshold" (``threshold``,
    at most ``k`` classes) or "sampled" (``k`` samples drawn with ``seed``)), sparsity and batch size (or a
    memory budget that picks it: ``npeff_tl.memory``)."""

    include: list[str] = field(default_factory=lambda: list(DEFAULT_SPACE))
    exclude: list[str] = field(default_factory=list)
    classes: str = "top_k"
    k: int = 4
    threshold: float = 0.05
    nnz: int = 4096
    batch_size: int = 16
    memory_budget_gb: float | None = None  # if set: the largest batch size whose memory estimate fits
    seed: int = 0


@dataclass
class FitConfig:
    methods: list[str] = field(default_factory=lambda: ["dnpeff", "lrm_npeff"])
    components: int = 16
    seed: int = 0


@dataclass
class PerturbConfig:
    """Held-out selectivity of the NPEFF components, with random controls (``SelectivityConfig``)."""

    n_top: int = 20
    n_baseline: int = 200
    kl_targets: list[float] = field(default_factory=lambda: [0.5, 0.1])
    components: int = 16  # per method, those with the largest training mass
    seed: int = 0


@dataclass
class CompareConfig:
    """Baselines next to NPEFF: TopK SAEs (one per width), gradient clustering, activation k-means; the comparison
    on the test split, with selectivity where a dictionary can intervene. SAEs and k-means look at ``hook``,
    chosen without labels (default: the residual stream entering the middle block). With ``oracle_hooks``, each
    also gets a row ``<name>_oracle_hook`` whose hook is chosen among ``hooks`` by train-split AMI against the
    labels: an advantage NPEFF never gets, reported as such."""

    sae_widths: list[int] = field(default_factory=lambda: [16, 128])
    sae_k: list[int] = field(default_factory=lambda: [4, 8])
    sae_steps: int = 1000
    hook: str = ""  # default: blocks.{n_layers // 2}.hook_resid_pre
    oracle_hooks: bool = False
    hooks: list[str] = field(default_factory=list)  # oracle candidates; default: every hook_resid_pre, last resid_post
    gradient_clustering: bool = True
    activation_kmeans: bool = True
    selectivity: bool = True
    seed: int = 0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pefs: PEFConfig = field(default_factory=PEFConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        config = cls()
        for section, entries in values.items():
            _set_section(config, section, entries)
        return config

    def with_overrides(self, overrides: list[str]) -> RunConfig:
        """Apply ``section.key=value`` overrides (values parsed as JSON, else taken as strings)."""
        config = RunConfig.from_dict(self.to_dict())
        for item in overrides:
            key, sep, raw = item.partition("=")
            section, dot, name = key.strip().partition(".")
            if not sep or not dot:
                raise ValueError(f"--set {item!r}: write section.key=value, e.g. --set pefs.nnz=2048")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            _set_section(config, section, {name: value})
        return config


def load_config(path: str | Path) -> RunConfig:
    """A ``RunConfig`` from a TOML (``.toml``) or JSON file; sections and keys not given keep their defaults."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: "
                         f"{error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a table of sections ({', '.join(_sections())})")
    return RunConfig.from_dict(values)


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]


def _set_section(config: RunConfig, section: str, entries: Any) -> None:
    if section not in _sections():
        raise ValueError(f"unknown config section {section!r}; the sections are {', '.join(_sections())}")
    if not isinstance(entries, dict):
        raise ValueError(f"config section {section!r} must be a table of keys, got {entries!r}")
    target = getattr(config, section)
    known = {f.name: f for f in dataclasses.fields(target)}
    for key, value in entries.items():
        if key not in known:
            raise ValueError(f"unknown config key {section}.{key}; {section} has {', '.join(known)}")
        setattr(target, key, _checked(f"{section}.{key}", getattr(target, key), value, known[key].type))


def _checked(name: str, default: Any, value: Any, annotation: str) -> Any:
    """``value`` if it has the type the key expects (ints are accepted for floats)."""
    optional = "None" in str(annotation)
    if value is None and optional:
        return None
    names = str(annotation)
    expected = type(default) if default is not None else (
        float if "float" in names else int if "int" in names else str)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list and isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"config key {name} must be {expected.__name__}, got {value!r}")
    return value


def to_toml(config: RunConfig) -> str:
    """The settings as a TOML file that ``load_config`` reads back (None values become comments)."""
    lines = []
    for section, entries in config.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in entries.items():
            lines.append(f"# {key} =  (not set)" if value is None else f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)
