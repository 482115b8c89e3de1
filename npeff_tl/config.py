"""The pipeline's settings: one dataclass per stage, read from a TOML or JSON file and ``--set`` overrides.

A run directory keeps the resolved settings in ``config.json``; later stages read them from there, so
``npeff-tl pefs --config my.toml --out runs/x`` followed by ``npeff-tl fit --out runs/x`` needs the file once.
Unknown sections or keys are errors that name the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .decomp import DNPEFF, LRMNPEFF
from .evaluation.selectivity import SelectivityConfig
from .targets import ClassRule

logger = logging.getLogger(__name__)

# The defaults below come from the settings study (docs/settings.md): on the language model of real text, the
# MLP weights alone, the threshold class rule and nnz 16,384 gave the purest components.
DEFAULT_SPACE = ("blocks.*.mlp.W_*",)


def _help(text: str) -> dict[str, str]:
    """A setting's one-line description, printed as a comment by ``npeff-tl config``."""
    return {"help": text}


@dataclass
class ModelConfig:
    """``name``: "zoo:NAME" (shipped weights), a local checkpoint directory (``npeff_tl.save_checkpoint``), a
    local Hugging Face model directory (``save_pretrained`` of a model and its tokenizer; run through
    TransformerLens's ``TransformerBridge``), or a model name for the hub (``HookedTransformer.from_pretrained``;
    on transformer-lens 4 a Hugging Face name through ``TransformerBridge``)."""

    name: str = field(default="zoo:tasks-2l", metadata=_help(
        "zoo:NAME (shipped weights), a checkpoint directory (npeff_tl.save_checkpoint), a Hugging Face model "
        "directory (run through TransformerBridge) or a model name for the hub"))
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


# Settings of the nested solver tables that the fit section sets for every method alike.
SET_BY_FIT = {"n_components": "fit.n_components", "seed": "fit.seed"}


@dataclass
class FitConfig:
    """The decompositions; each method's solver settings are a table of its own (``[fit.dnpeff]``: ``DNPEFF``,
    ``[fit.lrm_npeff]``: ``LRMNPEFF``), except ``n_components`` and ``seed``, which this section sets for all."""

    methods: list[str] = field(default_factory=lambda: ["dnpeff", "lrm_npeff"], metadata=_help(
        "decompositions to fit: \"dnpeff\" (diagonal PEFs) and/or \"lrm_npeff\" (low-rank PEFs)"))
    n_components: int = field(default=16, metadata=_help("components per decomposition (and per baseline)"))
    seed: int = field(default=0, metadata=_help("seeds the initialisation"))
    dnpeff: DNPEFF = field(default_factory=lambda: DNPEFF(n_components=16), metadata=_help(
        "D-NPEFF solver settings (npeff_tl.DNPEFF)"))
    lrm_npeff: LRMNPEFF = field(default_factory=lambda: LRMNPEFF(n_components=16), metadata=_help(
        "LRM-NPEFF solver settings (npeff_tl.LRMNPEFF)"))

    def solver(self, method: str) -> DNPEFF | LRMNPEFF:
        """``method``'s solver with this section's number of components and seed."""
        return dataclasses.replace(getattr(self, method), n_components=self.n_components, seed=self.seed)


@dataclass(frozen=True)
class SelectivitySettings(SelectivityConfig):
    """Held-out selectivity of the NPEFF components (and of the baselines that can intervene), with random
    controls: ``SelectivityConfig``'s settings, and how many components per method to measure.

    Attributes:
        n_measured: components measured per method: those with the most training mass.
        circuit_method: how the NPEFF components' circuits are traced for the report (``npeff_tl.trace``):
            "atp*", "atp", "patching" (exact, slow), or "" for none. "atp*" becomes "atp" on models whose attention
            its QK fix does not cover (ALiBi, soft-capping...), and the run says so.
        dnpeff_mixes: the mixing weights D-NPEFF's perturbation chooses from on the training examples (two
            magnitude searches and one selectivity pass per value and component: most of a D-NPEFF component's
            measuring time); one value is used as given, with no choice to make.
    """

    n_measured: int = 16
    circuit_method: str = "atp*"
    dnpeff_mixes: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)

    def __post_init__(self):
        super().__post_init__()
        if self.n_measured < 1:
            raise ValueError(f"n_measured must be >= 1, got {self.n_measured}")
        if not self.dnpeff_mixes or not all(0 < m < 1 for m in self.dnpeff_mixes):
            raise ValueError(f"dnpeff_mixes must be one or more weights in (0, 1), got {list(self.dnpeff_mixes)}")
        from .tracing import METHODS

        if self.circuit_method not in ("", *METHODS):
            raise ValueError(f"circuit_method must be one of {['', *METHODS]} ('' for no circuits), got "
                             f"{self.circuit_method!r}")


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
    gradient_include: list[str] = field(default_factory=list, metadata=_help(
        "parameters gradient clustering takes gradients of, TL name globs (empty: every parameter but LayerNorm and "
        "embeddings; pefs.include's globs give it NPEFF's parameters)"))
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
    selectivity: SelectivitySettings = field(default_factory=SelectivitySettings)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain values (what config.json holds and ``from_dict`` reads back)."""
        return {f.name: _values(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        config = cls()
        for section, entries in values.items():
            _set_section(config, section, entries)
        return config

    def with_overrides(self, overrides: list[str]) -> RunConfig:
        """Apply ``section.key=value`` overrides (``section.table.key=value`` in a nested table; values parsed as
        JSON, else taken as strings)."""
        config = RunConfig.from_dict(self.to_dict())
        for item in overrides:
            key, sep, raw = item.partition("=")
            section, *names = parts = key.strip().split(".")
            if not sep or not names or not all(parts):
                raise ValueError(f"--set {item!r}: write section.key=value, e.g. --set pefs.nnz=2048")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            for name in reversed(names):
                value = {name: value}
            _set_section(config, section, value)
        return config


# Earlier names of sections and keys, still read (config.json of older run directories, old scripts).
RENAMED_SECTIONS = {"perturb": "selectivity"}
RENAMED_KEYS = {"fit.components": "n_components", "selectivity.components": "n_measured"}


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
    if section in RENAMED_SECTIONS:
        logger.warning("config section %r is now called %r", section, RENAMED_SECTIONS[section])
        section = RENAMED_SECTIONS[section]
    if section not in _sections():
        raise ValueError(f"unknown config section {section!r}; the sections are {', '.join(_sections())}")
    setattr(config, section, _updated(getattr(config, section), section, entries))


def _updated(settings: Any, path: str, entries: Any) -> Any:
    """A copy of the dataclass ``settings`` with ``entries`` set, each checked against the key's type; nested
    tables are dataclasses too. The copy is made by ``dataclasses.replace``, so the class's own checks run."""
    if not isinstance(entries, dict):
        raise ValueError(f"config section {path!r} must be a table of keys, got {entries!r}")
    known = {f.name: f for f in dataclasses.fields(settings)}
    changes = {}
    for key, value in entries.items():
        if f"{path}.{key}" in RENAMED_KEYS:
            logger.warning("config key %s.%s is now called %s.%s", path, key, path, RENAMED_KEYS[f"{path}.{key}"])
            key = RENAMED_KEYS[f"{path}.{key}"]
        name = f"{path}.{key}"
        if "." in path and key in SET_BY_FIT:
            raise ValueError(f"config key {name} is set by {SET_BY_FIT[key]} for every method; set that instead")
        if key not in known:
            raise ValueError(f"unknown config key {name}; {path} has {', '.join(_keys(settings, '.' in path))}")
        current = getattr(settings, key)
        if isinstance(current, ClassRule):
            if not isinstance(value, dict):
                raise ValueError(f"config key {name} must be a class rule table, e.g. {current.to_dict()}")
            try:
                changes[key] = ClassRule.from_dict(value)
            except ValueError as error:
                raise ValueError(f"config key {name}: {error}") from None
        elif dataclasses.is_dataclass(current):
            changes[key] = _updated(current, name, value)
        else:
            changes[key] = _checked(name, current, value, known[key].type)
    try:
        return dataclasses.replace(settings, **changes)
    except ValueError as error:
        raise ValueError(f"config {path}: {error}") from None


def _checked(name: str, default: Any, value: Any, annotation: str) -> Any:
    """``value`` if it has the type the key expects (ints are accepted for floats, lists for tuples)."""
    optional = "None" in str(annotation)
    if value is None and optional:
        return None
    names = str(annotation)
    expected = type(default) if default is not None else (
        float if "float" in names else int if "int" in names else str)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (list, tuple) and isinstance(value, (list, tuple)):
        return expected(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"config key {name} must be {expected.__name__}, got {value!r}")
    return value


def _keys(settings: Any, nested: bool) -> list[str]:
    """The keys a file may set in this table (a nested solver table leaves out what the fit section sets)."""
    return [f.name for f in dataclasses.fields(settings) if not (nested and f.name in SET_BY_FIT)]


def _values(settings: Any, nested: bool = False) -> dict[str, Any]:
    """``settings`` as plain values: nested tables as dicts, class rules as ``ClassRule.to_dict``, tuples as lists."""
    out = {}
    for key in _keys(settings, nested):
        value = getattr(settings, key)
        if isinstance(value, ClassRule):
            value = value.to_dict()
        elif dataclasses.is_dataclass(value):
            value = _values(value, nested=True)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def flat_settings(config: RunConfig) -> dict[str, Any]:
    """Every setting as {"section.key": value} (``"fit.dnpeff.tol"`` in a nested table), values as ``to_dict``
    writes them."""
    def walk(settings: Any, path: str):
        for key, value in _values(settings, "." in path).items():
            current = getattr(settings, key)
            if dataclasses.is_dataclass(current) and not isinstance(current, ClassRule):
                yield from walk(current, f"{path}.{key}")
            else:
                yield f"{path}.{key}", value

    return dict(item for section in dataclasses.fields(config) for item in walk(getattr(config, section.name),
                                                                                 section.name))


def _help_texts(settings: Any) -> dict[str, str]:
    """Each key's one-line description: the field's ``help`` metadata, else the class docstring's Attributes."""
    texts = {}
    for cls in reversed(type(settings).__mro__):
        lines = (cls.__doc__ or "").partition("Attributes:")[2].splitlines()
        for line in lines:
            key, colon, text = line.strip().partition(": ")
            if colon and key.isidentifier() and len(line) - len(line.lstrip()) <= 8:
                texts[key] = text
            elif texts and line.strip():
                texts[list(texts)[-1]] += " " + line.strip()
    texts = {key: text.replace("``", "").rstrip(".") for key, text in texts.items()}
    texts.update({f.name: f.metadata["help"] for f in dataclasses.fields(settings) if "help" in f.metadata})
    return texts


def to_toml(config: RunConfig) -> str:
    """The settings as a TOML file that ``load_config`` reads back, each after a comment saying what it means
    (None values become comments)."""
    lines: list[str] = []

    def table(path: str, settings: Any) -> None:
        texts, nested = _help_texts(settings), []
        lines.append(f"[{path}]")
        for key, value in _values(settings, "." in path).items():
            if isinstance(value, dict) and not isinstance(getattr(settings, key), ClassRule):
                nested.append(key)
                continue
            lines.append(f"# {texts.get(key, '')}")
            lines.append(f"# {key} =  (not set)" if value is None else f"{key} = {_toml_value(value)}")
        lines.append("")
        for key in nested:
            table(f"{path}.{key}", getattr(settings, key))

    for section in dataclasses.fields(config):
        table(section.name, getattr(config, section.name))
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)
