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

# The defaults below come from the settings study (docs/settings.md): on the language model of real text, the
# MLP weights alone, the threshold class rule and nnz 16,384 gave the purest components.
DEFAULT_SPACE = ("blocks.*.mlp.W_*",)


def _help(text: str) -> dict[str, str]:
    """A setting's one-line description, printed as a comment by ``npeff-tl config``."""
    return {"help": text}


@dataclass
class ModelConfig:
    """``name``: "zoo:NAME" (shipped weights), a local checkpoint directory (``npeff_tl.save_checkpoint``), or a
    TransformerLens model name (``HookedTransformer.from_pretrained``, needs hub access)."""

    name: str = field(default="zoo:tasks-2l", metadata=_help(
        "zoo:NAME (shipped weights), a checkpoint directory (npeff_tl.save_checkpoint) or a TransformerLens "
        "model name"))
    device: str = field(default="cpu", metadata=_help("torch device, e.g. \"cpu\" or \"cuda\""))


@dataclass
class DataConfig:
    """``source``: "zoo" (the zoo model's tasks), a ``datasets`` directory (``save_to_disk``; a DatasetDict with
    train/test splits or one Dataset), or a JSONL file. Rows give ``tokens`` (token ids) or ``prompt`` (text,
    tokenized with the model's tokenizer); optionally ``position`` (the target position; default: the last
    token), ``answer`` (a token id or a one-token string), ``label`` (a ground-truth strategy) and ``factors``
    (the strategies an example needs), for the comparison's metrics. The keys name the columns to read.
    Without a test split, ``test_fraction`` of the rows are held out, drawn with ``seed``."""

    source: str = field(default="zoo", metadata=_help(
        "\"zoo\" (the zoo model's labelled examples), a datasets directory (save_to_disk) or a JSONL file"))
    per_task: int = field(default=64, metadata=_help(
        "zoo only: train and test examples per task (or per stratum of a field model)"))
    tokens: str = field(default="tokens", metadata=_help("column of token ids"))
    prompt: str = field(default="prompt", metadata=_help(
        "column of text, tokenized with the model's tokenizer (when a row has no token ids)"))
    position: str = field(default="position", metadata=_help("column of the target position (default: the last token)"))
    answer: str = field(default="answer", metadata=_help(
        "column of the answer: a token id or a one-token string (default: the model's prediction)"))
    label: str = field(default="label", metadata=_help(
        "column of the ground-truth strategy, for the comparison's metrics (optional)"))
    factors: str = field(default="factors", metadata=_help(
        "column of the list of strategies an example needs, for multi-factor recall (optional)"))
    prepend_bos: bool = field(default=True, metadata=_help("prompts only: prepend the BOS token"))
    test_fraction: float = field(default=0.5, metadata=_help(
        "share of rows held out when the source has no test split"))
    max_examples: int | None = field(default=None, metadata=_help(
        "at most this many examples per split (not set: all)"))
    seed: int = field(default=0, metadata=_help("seeds the train/test split of a source without one"))


@dataclass
class PEFConfig:
    """Parameter space (TL name globs), class rule (``classes``: "top_k" (``k``), "threshold" (``threshold``,
    at most ``k`` classes) or "sampled" (``k`` samples drawn with ``seed``)), sparsity and batch size (or a
    memory budget that picks it: ``npeff_tl.memory``)."""

    include: list[str] = field(default_factory=lambda: list(DEFAULT_SPACE), metadata=_help(
        "parameters the PEFs cover: TransformerLens name globs"))
    exclude: list[str] = field(default_factory=list, metadata=_help("globs removed from include"))
    classes: str = field(default="threshold", metadata=_help(
        "class rule: \"top_k\" (the k likeliest), \"threshold\" (p >= threshold, at most k) or \"sampled\" (k "
        "draws)"))
    k: int = field(default=8, metadata=_help("classes per example for the class rule (the most, for \"threshold\")"))
    threshold: float = field(default=0.05, metadata=_help("probability threshold of the \"threshold\" rule"))
    nnz: int = field(default=16384, metadata=_help(
        "entries kept per example; at most the parameters (classes x parameters for low-rank PEFs)"))
    batch_size: int = field(default=16, metadata=_help("examples per batch (peak memory grows with it)"))
    memory_budget_gb: float | None = field(default=None, metadata=_help(
        "if set: the largest batch size whose memory estimate fits this budget"))
    seed: int = field(default=0, metadata=_help("seeds the \"sampled\" class rule"))

    def class_rule(self):
        """The ``ClassRule`` that ``classes``, ``k``, ``threshold`` and ``seed`` name."""
        from .targets import Sampled, Threshold, TopK

        rules = {"top_k": lambda: TopK(self.k), "threshold": lambda: Threshold(self.threshold, max_k=self.k),
                 "sampled": lambda: Sampled(self.k, seed=self.seed)}
        if self.classes not in rules:
            raise ValueError(f"pefs.classes {self.classes!r} is not a class rule; choose from {', '.join(rules)}")
        return rules[self.classes]()


@dataclass
class FitConfig:
    methods: list[str] = field(default_factory=lambda: ["dnpeff", "lrm_npeff"], metadata=_help(
        "decompositions to fit: \"dnpeff\" (diagonal PEFs) and/or \"lrm_npeff\" (low-rank PEFs)"))
    components: int = field(default=16, metadata=_help("components per decomposition (and per baseline)"))
    seed: int = field(default=0, metadata=_help("seeds the initialisation"))


@dataclass
class PerturbConfig:
    """Held-out selectivity of the NPEFF components, with random controls (``SelectivityConfig``)."""

    n_top: int = field(default=20, metadata=_help(
        "held-out examples with the largest coefficients per component (the top set)"))
    n_baseline: int = field(default=200, metadata=_help(
        "other held-out examples per component (the baseline set); n_top + n_baseline must not exceed the "
        "test split"))
    kl_targets: list[float] = field(default_factory=lambda: [0.5, 0.1], metadata=_help(
        "mean KL (nats) on the top set that a perturbation is scaled to"))
    components: int = field(default=16, metadata=_help(
        "components measured per method: those with the most training mass"))
    seed: int = field(default=0, metadata=_help("seeds the baseline sets and the random-direction controls"))


@dataclass
class CompareConfig:
    """Baselines next to NPEFF: TopK SAEs (one per width), gradient clustering, activation k-means; the comparison
    on the test split, with selectivity where a dictionary can intervene. SAEs and k-means look at ``hook``,
    chosen without labels (default: the residual stream entering the middle block). With ``oracle_hooks``, each
    also gets a row ``<name>_oracle_hook`` whose hook is chosen among ``hooks`` by train-split AMI against the
    labels: an advantage NPEFF never gets, reported as such."""

    sae_widths: list[int] = field(default_factory=lambda: [16, 128], metadata=_help(
        "SAE widths (features), one SAE each"))
    sae_k: list[int] = field(default_factory=lambda: [4, 8], metadata=_help("TopK k of each SAE width"))
    sae_steps: int = field(default=1000, metadata=_help("SAE training steps"))
    hook: str = field(default="", metadata=_help(
        "hook the SAEs and k-means read (empty: the residual stream entering the middle block)"))
    oracle_hooks: bool = field(default=False, metadata=_help(
        "also rows whose hook is chosen with the labels (an oracle advantage)"))
    hooks: list[str] = field(default_factory=list, metadata=_help(
        "candidate hooks for oracle_hooks (empty: every hook_resid_pre and the last hook_resid_post)"))
    gradient_clustering: bool = field(default=True, metadata=_help("include gradient clustering"))
    activation_kmeans: bool = field(default=True, metadata=_help("include activation k-means"))
    selectivity: bool = field(default=True, metadata=_help(
        "measure the baselines' selectivity where they can intervene"))
    seed: int = field(default=0, metadata=_help("seeds the baselines"))


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
    """The settings as a TOML file that ``load_config`` reads back, each after a comment saying what it means
    (None values become comments)."""
    lines = []
    for section in dataclasses.fields(config):
        lines.append(f"[{section.name}]")
        values = getattr(config, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            lines.append(f"# {f.metadata.get('help', '')}")
            lines.append(f"# {f.name} =  (not set)" if value is None else f"{f.name} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)
