"""Where a run's model and examples come from: the zoo, a local model directory (``checkpoints``: ours or a
Hugging Face one) or a model name for the hub; the zoo's tasks, a ``datasets`` directory or a JSONL file.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoints import load_checkpoint
from .config import DataConfig
from .examples import Examples, LabeledExamples

ZOO_PREFIX = "zoo:"


def load_model(name: str, device: str = "cpu") -> nn.Module:
    """The model ``name`` ("zoo:NAME", a checkpoint or Hugging Face model directory, or a model name for the hub),
    in eval mode on ``device``."""
    from . import zoo

    if name.startswith(ZOO_PREFIX):
        return zoo.load_model(name.removeprefix(ZOO_PREFIX), device)
    if Path(name).exists():
        return load_checkpoint(Path(name), device)
    return _from_pretrained(name, device)


def _from_pretrained(name: str, device: str) -> nn.Module:
    """A TransformerLens model name as a HookedTransformer (transformer-lens < 4); any other name (every name on
    transformer-lens 4, which has no HookedTransformer) as a Hugging Face model through TransformerBridge."""
    from .adapters.hooked import hooked_transformer_class

    if (hooked := hooked_transformer_class()) is None:
        return _bridge_from_hub(name, device)
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:  # not one of HookedTransformer's models: a Hugging Face name, through the bridge
        return _bridge_from_hub(name, device)
    try:
        with warnings.catch_warnings():  # TL 3.9 steers new code to TransformerBridge; HookedTransformer is ours
            warnings.simplefilter("ignore", DeprecationWarning)
            return hooked.from_pretrained(name, device=device).eval()
    except OSError as error:
        raise OSError(f"could not load {name!r} from the model hub ({str(error).splitlines()[0]}); without hub "
                      "access, save the model once with npeff_tl.save_checkpoint and pass its directory") from None


def _bridge_from_hub(name: str, device: str) -> nn.Module:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        return TransformerBridge.boot_transformers(name, device=device).eval()
    except OSError as error:
        raise OSError(f"could not load {name!r}: not a zoo model (zoo:NAME), not an existing model directory, and "
                      f"the model hub did not give it ({str(error).splitlines()[0]}); without hub access, "
                      "save_pretrained the model and its tokenizer to a directory and pass that") from None


@dataclass
class RunData:
    """The train and test examples, and per split how to show each example (its tokens as strings)."""

    train: LabeledExamples
    test: LabeledExamples
    display: dict[str, list[dict]]


def load_data(config: DataConfig, model: nn.Module, model_name: str) -> RunData:
    """Train/test examples from ``config.source`` (see ``DataConfig``), tokenized for ``model``."""
    splits = _zoo_splits(config, model_name) if config.source == "zoo" else _splits(config)
    out = {}
    for split, rows in splits.items():
        if config.max_examples is not None:
            rows = rows[: config.max_examples]
        if not rows:
            raise ValueError(f"the {split} split of {config.source} has no rows")
        out[split] = _examples(rows, config, model)
    display = {split: rows for split, (_, rows) in out.items()}
    return RunData(out["train"][0], out["test"][0], display)


def _zoo_splits(config: DataConfig, model_name: str) -> dict[str, list[tuple[str, dict]]]:
    from . import zoo

    if not model_name.startswith(ZOO_PREFIX):
        raise ValueError(f"data.source 'zoo' needs a zoo model (zoo:NAME), not {model_name!r}; give a datasets "
                         "directory or a JSONL file as data.source")
    data = zoo.dataset(model_name.removeprefix(ZOO_PREFIX), n_train=config.per_task, n_test=config.per_task)
    columns = {config.tokens: "tokens", config.position: "target_pos", config.answer: "answer",
               config.label: "strategy", config.factors: "strategies"}
    return {split: [(f"zoo {split} split, row {i}", {key: row[zoo_key] for key, zoo_key in columns.items()})
                    for i, row in enumerate(data[split])] for split in ("train", "test")}


def _splits(config: DataConfig) -> dict[str, list[tuple[str, dict]]]:
    path = Path(config.source)
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist (give a datasets directory, a JSONL file, or "
                                "'zoo')")
    if path.is_dir():
        from datasets import Dataset, DatasetDict, load_from_disk

        try:
            data = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"{path} is not a datasets directory written by save_to_disk ({error})") from None
        if isinstance(data, DatasetDict):
            if "train" not in data or "test" not in data:
                raise ValueError(f"{path} has splits {list(data)}; name them 'train' and 'test'")
            return {split: [(f"{path} ({split} split), row {i}", row) for i, row in enumerate(data[split].to_list())]
                    for split in ("train", "test")}
        rows = [(f"{path}, row {i}", row)
                for i, row in enumerate(data.to_list() if isinstance(data, Dataset) else list(data))]
    else:
        rows = _read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} holds no rows; give at least two (one per split)")
    order = list(range(len(rows)))
    random.Random(config.seed).shuffle(order)
    n_test = round(config.test_fraction * len(rows))
    if not 0 < n_test < len(rows):
        raise ValueError(f"data.test_fraction {config.test_fraction} of {len(rows)} rows leaves an empty split")
    return {"train": [rows[i] for i in sorted(order[n_test:])], "test": [rows[i] for i in sorted(order[:n_test])]}


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(origin "path:line", row) per non-blank line."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not a JSON object ({error.msg} (column {error.colno}))") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number} is not a JSON object")
        rows.append((f"{path}:{number}", row))
    return rows


def _examples(rows: list[tuple[str, dict]], config: DataConfig, model: nn.Module) -> tuple[LabeledExamples, list]:
    """The examples of one split; every error names the row by its origin (file and line, or row index)."""
    tokenizer = getattr(model, "tokenizer", None)
    d_vocab = int(model.cfg.d_vocab)
    tokens, positions, answers, display = [], [], [], []
    for where, row in rows:
        if config.tokens in row:
            ids = [int(t) for t in row[config.tokens]]
        elif config.prompt in row:
            if tokenizer is None:
                raise ValueError(f"{where} gives a prompt but the model has no tokenizer; give token ids in a "
                                 f"{config.tokens!r} column")
            ids = model.to_tokens(row[config.prompt], prepend_bos=config.prepend_bos)[0].tolist()
        else:
            raise ValueError(f"{where} has neither {config.tokens!r} (token ids) nor {config.prompt!r} "
                             f"(text); its keys are {sorted(row)}")
        if not ids:
            raise ValueError(f"{where} has no tokens")
        outside = [t for t in ids if not 0 <= t < d_vocab]
        if outside:
            raise ValueError(f"{where} has token id {outside[0]} outside the model's vocabulary of {d_vocab} "
                             "(ids 0..{}); tokenize with the model's own tokenizer".format(d_vocab - 1))
        position = int(row.get(config.position, len(ids) - 1))
        if not -len(ids) <= position < len(ids):
            raise ValueError(f"{where} has {config.position}={position} outside its {len(ids)} tokens")
        position %= len(ids)
        answer = row.get(config.answer)
        if isinstance(answer, str):
            answer = _single_token(model, answer, where)
        if answer is not None and not 0 <= int(answer) < d_vocab:
            raise ValueError(f"{where} has {config.answer}={answer} outside the model's vocabulary of {d_vocab}")
        tokens.append(ids)
        positions.append(position)
        answers.append(answer)
        display.append({"tokens": str_tokens(model, ids), "position": position,
                        "answer": None if answer is None else str_tokens(model, [answer])[0],
                        "label": row.get(config.label)})
    has_answers = all(a is not None for a in answers)
    labels = [row.get(config.label) for _, row in rows]
    factors = [row.get(config.factors) for _, row in rows]
    examples = LabeledExamples(
        Examples.from_tokens(tokens, positions), torch.tensor(answers) if has_answers else None,
        labels if all(x is not None for x in labels) else None,
        factors if all(x is not None for x in factors) else None,
    )
    return examples, display


def _single_token(model: nn.Module, text: str, where: str) -> int:
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(f"{where} gives its answer as text but the model has no tokenizer; give a token id")
    ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        raise ValueError(f"{where}: the answer {text!r} is {len(ids)} tokens; give one token (or its id)")
    return ids[0]


def str_tokens(model: nn.Module, ids: list[int]) -> list[str]:
    """Each token id as text (its id, for a model without a tokenizer)."""
    if getattr(model, "tokenizer", None) is None:
        return [str(t) for t in ids]
    return [str(s) for s in model.to_str_tokens(torch.tensor(ids), prepend_bos=False)]
