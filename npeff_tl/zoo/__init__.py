"""The zoo: small HookedTransformers with examples whose mechanisms are labelled.

Three kinds of entry. Task models (``tasks-2l``, ``tasks-3l``) are trained on synthetic tasks whose per-example
strategy is known by construction. Field models (``pycode-4l``) are language models trained on real text, the
source of Python's standard library, with next-token examples from held-out files labelled by rules on the
text (``field_data.py``). Pretrained entries (``smollm2-135m``) are real language models whose weights come
from a package on the package registry, prepared once into a local cache (``pretrained.py``), studied on the
same kind of field examples in their own tokenisation.

``model, data = npeff_tl.zoo.load(NAME)`` gives a model (weights shipped in the package; no downloads) and a
``datasets.DatasetDict`` with splits "train" and "test" and columns ``tokens``, ``target_pos``, ``answer``,
``strategy``, ``strategies`` and ``text``: the token at ``target_pos + 1`` of the text, the one the model
predicts at ``target_pos``, is ``answer``. ``npeff_tl.zoo.list()`` names the entries; each trained entry has a
JSON card (config, seeds, accuracy, training command) and ``python -m npeff_tl.zoo.train NAME`` regenerates it.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from pathlib import Path

import torch

from .field import FieldEntry
from .pretrained import SMOLLM2_135M, PretrainedEntry
from .tasks import TASKS, VOCAB, generate
from .tokenizer import load_tokenizer

MODELS_DIR = Path(__file__).parent / "models"


@dataclass(frozen=True)
class ZooEntry:
    """How a zoo model is built and trained (its card adds what training measured)."""

    name: str
    n_layers: int
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    tasks: tuple[str, ...] = tuple(TASKS)
    seed: int = 0
    data_seed: int = 0
    table_seed: int = 0
    steps: int = 3000
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.01
    n_ctx: int = 16
    demo: tuple[str, ...] = ("data.per_task=64",)  # npeff-tl demo's settings for this entry (--set style)
    label_free_settings: tuple[str, ...] = ()  # NPEFF settings chosen for it without labels (docs/settings.md)

    def config(self, device: str | torch.device = "cpu") -> dict:
        """The model's HookedTransformerConfig settings."""
        return dict(n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
                    d_head=self.d_model // self.n_heads, d_mlp=self.d_mlp, d_vocab=len(VOCAB), n_ctx=self.n_ctx,
                    act_fn="gelu", normalization_type="LN", device=str(device), seed=self.seed, model_name=self.name)

    def build_model(self, device: str | torch.device = "cpu"):
        """An untrained model of this entry with the zoo tokenizer attached."""
        from ..tl_models import build_model

        return build_model(self.config(device), tokenizer=load_tokenizer())

    def dataset(self, n_train: int, n_test: int):
        """``n_train`` / ``n_test`` examples per task, deterministic in the entry's seeds; test prompts never
        repeat a train prompt."""
        return _task_dataset(self, n_train, n_test)


ENTRIES: dict[str, ZooEntry | FieldEntry | PretrainedEntry] = {
    e.name: e
    for e in [
        # NPEFF settings chosen on the train split without labels (split-half stability, both methods; docs/settings.md)
        ZooEntry("tasks-2l", n_layers=2, label_free_settings=(
            "pefs.classes=top_k", "pefs.k=4", "pefs.nnz=65536",
            'pefs.include=["blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*"]')),
        ZooEntry("tasks-3l", n_layers=3, seed=1, data_seed=1),
        FieldEntry("pycode-4l"),
        SMOLLM2_135M,
    ]
}


def list() -> builtins.list[str]:  # noqa: A001 - mirrors the zoo API, nt.zoo.list()
    """Names of the zoo entries: those with shipped weights, and the pretrained ones (prepared on first use)."""
    return [name for name, e in ENTRIES.items()
            if isinstance(e, PretrainedEntry) or (MODELS_DIR / name / "model.safetensors").exists()]


def entry(name: str) -> ZooEntry | FieldEntry | PretrainedEntry:
    if name not in ENTRIES:
        raise ValueError(f"unknown zoo model {name!r}; available: {builtins.list(ENTRIES)}")
    return ENTRIES[name]


def build_model(name: str, device: str | torch.device = "cpu"):
    """An untrained model of entry ``name`` with its tokenizer attached."""
    e = entry(name)
    if isinstance(e, PretrainedEntry):
        raise ValueError(f"{name} is a pretrained entry: it is loaded (nt.zoo.load_model), not built or trained here")
    return e.build_model(device)


def dataset(name: str, n_train: int = 256, n_test: int = 128):
    """The examples of entry ``name``: ``n_train`` / ``n_test`` per task (task models) or per mechanism
    category (field models), deterministic."""
    return entry(name).dataset(n_train, n_test)


def _task_dataset(e: ZooEntry, n_train: int, n_test: int):
    from datasets import Dataset, DatasetDict

    ids = {word: i for i, word in enumerate(VOCAB)}
    train = generate(builtins.list(e.tasks), n_train, seed=2 * e.data_seed, table_seed=e.table_seed)
    seen = {tuple(row["words"]) for row in train}
    candidates = generate(builtins.list(e.tasks), 2 * n_test + 8, seed=2 * e.data_seed + 1, table_seed=e.table_seed)
    test, per_task = [], dict.fromkeys(e.tasks, 0)
    for row in candidates:
        if tuple(row["words"]) not in seen and per_task[row["strategy"]] < n_test:
            test.append(row)
            per_task[row["strategy"]] += 1

    def columns(rows):
        return {
            "tokens": [[ids[w] for w in row["words"]] for row in rows],
            "target_pos": [len(row["words"]) - 1 for row in rows],
            "answer": [ids[row["answer"]] for row in rows],
            "strategy": [row["strategy"] for row in rows],
            "strategies": [row["strategies"] for row in rows],
            "text": [" ".join(row["words"][1:]) for row in rows],
        }

    return DatasetDict({"train": Dataset.from_dict(columns(train)), "test": Dataset.from_dict(columns(test))})


def load_model(name: str, device: str | torch.device = "cpu", directory: Path | None = None):
    """Zoo entry ``name``'s model with its shipped weights (or those in ``directory``), in eval mode. A pretrained
    entry is prepared first if needed (a one-time fetch from the package registry) and loads as a
    TransformerBridge."""
    from safetensors.torch import load_file

    e = entry(name)
    if isinstance(e, PretrainedEntry):
        if directory is not None:
            raise ValueError(f"{name} is a pretrained entry: it loads from its prepared directory; pass another "
                             "Hugging Face directory as the model name instead")
        return e.load_model(device)
    path = (MODELS_DIR / e.name if directory is None else Path(directory)) / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no weights for zoo model {name!r} at {path}; run `python -m npeff_tl.zoo.train {name}`")
    from ..tl_models import load_state

    model = build_model(name, device)
    load_state(model, load_file(str(path), device=str(device)))
    return model.eval()


def load(name: str, device: str | torch.device = "cpu", n_train: int = 256, n_test: int = 128):
    """(model, data) for zoo entry ``name``: the shipped weights and its examples. ``n_train`` and ``n_test``
    count examples *per task* (task models) or *per label stratum* (field models), so a split holds that many
    times the number of tasks or strata."""
    return load_model(name, device), dataset(name, n_train, n_test)
