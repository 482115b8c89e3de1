"""The field datasets: labelled next-token examples from held-out stdlib files, shipped as small files.

Every example is a window of ``WINDOW`` tokens from one held-out file (never seen in training) and the token that
follows it; its labels come from the rules of ``code_labels.py`` and describe the text, not the model's
internals. The held-out files are divided by file into a ``train`` split (for fitting dictionaries) and a
``test`` split (for reporting), so no test window shares a file with a train window. Sampling is balanced
per stratum with a seed: one stratum per category (examples with exactly that one label) and one per frequent
pair of categories (examples with exactly those two labels: the multi-factor examples).

One builder makes the dataset for any tokenizer (``build_field_data``): the texts are the same, their tokens and
so their targets are the tokenizer's. ``pycode-4l``'s dataset (the zoo's code tokenizer, the rules of
``CATEGORIES``) lives in ``field_data/``; a pretrained entry's in ``field_data/<name>/``, made by its recipe in
``FIELD_RECIPES`` (the document separator of the model's pretraining, its rule set, the categories dropped and
why). The examples are built once (``python -m npeff_tl.zoo.train --field-data [NAME]``) and shipped, so every
machine gets the same examples whatever its Python version; ``load_field_dataset`` reads them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..progress import progress_bar
from .code_labels import CATEGORIES, CODE_AND_PROSE_CATEGORIES, INDUCTION_MAX_BIGRAM, PROSE_COPY_MAX_UNIGRAM, \
    SourceFacts, target_labels

FIELD_DATA_DIR = Path(__file__).parent / "field_data"
WINDOW = 64
PER_STRATUM = 300
N_PAIRS = 3  # the most frequent pairs of categories, each a stratum of its own
SEED = 0
FORMAT = "npeff_tl.field_data"
# 1: pycode-4l's dataset, made with the zoo's code tokenizer (implied); 2: records its tokenizer, separator and rules
FORMAT_VERSIONS = (1, 2)
FIELD_COMMAND = "python -m npeff_tl.zoo.train --field-data"
_BLANKS = re.compile(r"[ \t]*")


def file_splits(paths: list[str], token_counts: list[int]) -> dict[str, str]:
    """Held-out file -> "train" / "test": files in the order of their path hash, each to the split with fewer
    tokens so far (two halves of about equal size, fixed by the paths)."""
    order = sorted(range(len(paths)), key=lambda i: hashlib.sha256(paths[i].encode()).hexdigest())
    sizes, out = {"train": 0, "test": 0}, {}
    for i in order:
        split = min(sizes, key=lambda s: (sizes[s], s))
        out[paths[i]] = split
        sizes[split] += token_counts[i]
    return out


def labelled_targets(text: str, tokenizer, bigram, window: int = WINDOW, separator_id: int | None = None,
                     categories: tuple[str, ...] = CATEGORIES):
    """(ids, spans, {target index: labels}) of one file: its tokens (the document separator first, as in
    training: ``separator_id``, by default the code tokenizer's end-of-text token) and the labels under the rule
    set ``categories`` of every target with a full window before it."""
    from .tokenizer import END_OF_TEXT

    if separator_id is None:
        separator_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    encoding = tokenizer.backend_tokenizer.encode(text)
    ids = [separator_id, *encoding.ids]
    spans = [(0, 0), *encoding.offsets]
    facts = SourceFacts.of(text)

    @functools.lru_cache(maxsize=None)  # a file repeats its pairs; one tensor call per pair is the cost here
    def prob(a: int, b: int) -> float:
        return float(bigram.prob(torch.tensor([a]), torch.tensor([b]))[0])

    def unigram(b: int) -> float:
        return float(bigram.unigram[b])

    return ids, spans, {t: target_labels(facts, ids, spans, t, window, prob, categories, unigram)
                        for t in range(window, len(ids))}


def token_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest stored dtype that holds every token id: int16 up to 32,768 tokens (pycode-4l's 4,096),
    int32 above (SmolLM2's 49,152)."""
    return torch.int16 if vocab_size <= 2 ** 15 else torch.int32


def tokenizer_record(tokenizer) -> dict:
    """What a dataset records of the tokenizer it was made with: its vocabulary size, a sha256 of the vocabulary
    (tokens by id; ``load_field_dataset`` checks it), and the sha256 of the ``tokenizer.json`` it was read from
    (``None`` if it was not read from a directory holding one, or was changed since: tokens added)."""
    from tokenizers import Tokenizer

    vocab_sha256 = _vocab_sha256(tokenizer.get_vocab())
    source = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "tokenizer.json"
    file_sha256 = None
    if source.is_file() and _vocab_sha256(Tokenizer.from_file(str(source)).get_vocab(with_added_tokens=True)) \
            == vocab_sha256:
        file_sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
    return {"vocab_size": len(tokenizer), "vocab_sha256": vocab_sha256, "tokenizer_json_sha256": file_sha256}


def _vocab_sha256(vocab: dict[str, int]) -> str:
    tokens = sorted(vocab.items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode()).hexdigest()


def build_field_data(
    directory: Path = FIELD_DATA_DIR,
    progress: bool = True,
    *,
    tokenizer=None,
    separator_id: int | None = None,
    categories: tuple[str, ...] = CATEGORIES,
    bigram=None,
    train_corpus=None,
    heldout_corpus=None,
    per_stratum: int = PER_STRATUM,
    command: str = FIELD_COMMAND,
    record: dict | None = None,
    split_tokenizer=None,
) -> dict:
    """Label every target of the held-out files, sample the strata, and write ``examples.safetensors`` and
    ``examples.json`` to ``directory``. Returns the JSON part.

    Args:
        directory: where the files go.
        tokenizer: a Hugging Face fast tokenizer; ``None`` builds pycode-4l's dataset (the zoo's code tokenizer,
            its end-of-text separator, the format-1 record it shipped with, so that it rebuilds byte for byte).
        separator_id: the token that begins every file, as documents were separated in the model's training
            (required with ``tokenizer``).
        categories: the rule set (``code_labels.CATEGORIES`` or ``CODE_AND_PROSE_CATEGORIES``, less any
            dropped); one stratum per category, plus the ``N_PAIRS`` most frequent pairs.
        bigram: ``ngram.Bigram`` of the training files in the same tokens (the induction and prose-copy rules
            use it); by default fitted here on ``train_corpus``.
        train_corpus, heldout_corpus: ``Corpus`` objects; by default the running Python's stdlib splits.
        per_stratum: examples of each stratum in each split (a stratum with fewer is an error).
        command: the command that rebuilds this dataset, recorded.
        record: further entries for ``examples.json`` (the recipe's decisions: categories dropped and why).
        split_tokenizer: the tokenizer whose token counts balance the division of held-out files into the train and
            test splits (``file_splits``; by default ``tokenizer``). The recipes give the zoo's code tokenizer,
            so that every field dataset divides the files as pycode-4l's does.
    """
    from ..store import save_json, save_tensors
    from .corpus import Corpus
    from .field import token_stream
    from .ngram import Bigram
    from .tokenizer import END_OF_TEXT, load_code_tokenizer

    legacy = tokenizer is None
    if legacy:
        tokenizer = load_code_tokenizer()
        separator_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    elif separator_id is None:
        raise ValueError("give the separator_id: the token that separated documents in the model's training")
    train = Corpus.from_stdlib("train") if train_corpus is None else train_corpus
    heldout = Corpus.from_stdlib("heldout") if heldout_corpus is None else heldout_corpus
    if bigram is None:
        bigram = Bigram.fit(token_stream(tokenizer, train.texts(), separator_id), len(tokenizer))
    pools: dict[str, list[tuple]] = {"train": [], "test": []}
    per_file, targets = [], {c: Counter() for c in categories}
    indentation = Counter()  # (indent / dedent, whether the newline token holds the next line's indentation)
    for path, text in progress_bar(list(zip(heldout.paths, heldout.texts())), desc="label held-out files", enabled=progress):
        ids, spans, labels = labelled_targets(text, tokenizer, bigram, separator_id=separator_id, categories=categories)
        per_file.append((path, ids, labels))
        for t, found in labels.items():
            piece = text[slice(*spans[t])]
            for c in found:
                targets[c][piece] += 1
            for c in found & {"indent", "dedent"}:
                indentation[c, _holds_indentation(text, *spans[t])] += 1
    if split_tokenizer is None:
        counts = [len(ids) for _, ids, _ in per_file]
    else:  # the separator, then the text's tokens: as pycode-4l's dataset counts them
        counts = [1 + len(e.ids) for e in split_tokenizer.backend_tokenizer.encode_batch(heldout.texts())]
    splits = file_splits([p for p, _, _ in per_file], counts)
    for path, ids, labels in per_file:
        for t, found in labels.items():
            pools[splits[path]].append((tuple(sorted(found)), path, t, ids[t - WINDOW: t + 1]))
    pair_counts = Counter(key for pool in pools.values() for key, *_ in pool if len(key) == 2)
    strata = [(c,) for c in categories] + [pair for pair, _ in pair_counts.most_common(N_PAIRS)]
    rows = {"train": [], "test": []}
    for split, pool in pools.items():
        rng = random.Random(f"field-data-{SEED}-{split}")
        for stratum in strata:
            members = [row for row in pool if row[0] == stratum]
            if len(members) < per_stratum:
                raise ValueError(f"stratum {'+'.join(stratum)} has {len(members)} {split} examples, fewer than "
                                 f"{per_stratum}")
            rows[split] += rng.sample(members, per_stratum)
        rng.shuffle(rows[split])
    dtype = token_dtype(len(tokenizer))
    tensors, files = {}, sorted({path for path, *_ in per_file})
    for split, chosen in rows.items():
        tensors[f"{split}.tokens"] = torch.tensor([window for *_, window in chosen], dtype=dtype)
        tensors[f"{split}.file"] = torch.tensor([files.index(path) for _, path, _, _ in chosen], dtype=torch.int16)
        tensors[f"{split}.target_index"] = torch.tensor([t for _, _, t, _ in chosen], dtype=torch.int32)
    meta = {
        "format": FORMAT, "format_version": 1 if legacy else 2, "window": WINDOW, "per_stratum": per_stratum,
        "seed": SEED, "categories": list(categories), "strata": ["+".join(s) for s in strata],
        "labels": {split: ["+".join(key) for key, *_ in chosen] for split, chosen in rows.items()},
        "files": files, "file_split": {path: splits[path] for path in files},
        "pool_sizes": {split: dict(Counter("+".join(key) if key else "(none)" for key, *_ in pool).most_common())
                       for split, pool in pools.items()},
        "corpus": heldout.describe(), "bigram_corpus": train.describe(),
        "command": command,
    }
    if not legacy:
        meta["tokenizer"] = {**tokenizer_record(tokenizer), "token_dtype": str(dtype).removeprefix("torch.")}
        meta["separator"] = {"id": separator_id, "token": tokenizer.convert_ids_to_tokens(separator_id)}
        meta["rules"] = {"induction_max_bigram": INDUCTION_MAX_BIGRAM,
                         "prose_copy_max_unigram": PROSE_COPY_MAX_UNIGRAM}
        meta["target_tokens"] = {c: {"targets": sum(counts.values()), "distinct": len(counts),
                                     "most_common": [list(item) for item in counts.most_common(8)]}
                                 for c, counts in targets.items()}
        for c in ("indent", "dedent"):
            if targets.get(c):
                share = indentation[c, True] / sum(targets[c].values())
                meta["target_tokens"][c]["newline_token_holds_indentation"] = share
        meta.update(record or {})
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, directory / "examples.safetensors")
    save_json(meta, directory / "examples.json")
    return meta


def _holds_indentation(text: str, start: int, end: int) -> bool:
    """Whether the token [start, end), which holds a newline, also holds the next line's indentation (all of it,
    or all but the one space the next word's token takes, as GPT-2's pre-tokenisation splits)."""
    newline = text.rfind("\n", start, end)
    return end >= _BLANKS.match(text, newline + 1).end() - 1


@dataclass(frozen=True)
class FieldRecipe:
    """How a pretrained entry's field dataset is made from its tokenizer (``build_recipe``).

    Attributes:
        name: the entry, and the dataset's folder under ``FIELD_DATA_DIR``.
        separator: the token that separated documents in the model's pretraining; it begins every file.
        categories: the rule set, less the dropped categories.
        dropped: category -> why it does not fit this tokenisation (measured).
        decisions: further notes recorded with the dataset (why the kept categories and the separator fit).
        vocab_size: the tokenizer's expected vocabulary size (another tokenizer is refused).
    """

    name: str
    separator: str
    categories: tuple[str, ...]
    vocab_size: int
    dropped: dict[str, str] = field(default_factory=dict)
    decisions: dict[str, str] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return FIELD_DATA_DIR / self.name

    @property
    def command(self) -> str:
        return f"{FIELD_COMMAND} {self.name}  (the prepared entry's tokenizer; or --tokenizer-dir DIR)"


SMOLLM2_135M_RECIPE = FieldRecipe(
    name="smollm2-135m",
    separator="<|endoftext|>",
    categories=CODE_AND_PROSE_CATEGORIES,
    vocab_size=49152,
    dropped={},
    decisions={
        "file split": "as pycode-4l's: the held-out files are balanced between the splits by their token counts "
                      "under the zoo's code tokenizer, so each file is in the same split in both datasets",
        "held-out files": "held out from pycode-4l's training only: SmolLM2 was pretrained on public code, which "
                          "may hold these very files, so its figures on them measure recall as well as prediction",
        "separator": "<|endoftext|> (id 0), the base release's bos and eos token, which separated the documents of "
                     "SmolLM2's pretraining; the instruct tokenizer's config names <|im_start|> (id 1) bos and "
                     "<|im_end|> (id 2) eos, but its chat template shows that they open and close chat turns",
        "indent/dedent": "kept: SmolLM2's byte-level BPE pre-tokenises like GPT-2's, so the newline token carries "
                         "the next line's indentation (less the space the next word takes), as in pycode-4l: "
                         "'\\n    return x' is ['\\n   ', ' return', ' x']; measured on every indent/dedent target "
                         "(target_tokens.<indent|dedent>.newline_token_holds_indentation)",
        "continuation": "kept: names split into fewer, longer pieces than with pycode-4l's 4,096 tokens (39,426 "
                        "targets against 48,301) and numbers into single digits (4,187 of the 39,426 are digits), "
                        "but every target still continues a name or number already begun, and the pools stay far "
                        "above per_stratum",
        "attribute, keyword, close_bracket, close_string, induction, prose": "kept: the same kinds of target tokens "
                        "as in pycode-4l (target_tokens), with pools far above per_stratum",
        "prose_close, prose_copy": "new: English mechanisms in comments and docstrings; they replace the label prose "
                                   "on their targets, so each is a stratum of its own (code_labels)",
    },
)
FIELD_RECIPES = {recipe.name: recipe for recipe in (SMOLLM2_135M_RECIPE,)}


def build_recipe(name: str, tokenizer, directory: Path | None = None, progress: bool = True) -> dict:
    """Build pretrained entry ``name``'s field dataset with ``tokenizer`` (the model's) into its folder under
    ``FIELD_DATA_DIR`` (or ``directory``). Returns the JSON part."""
    if name not in FIELD_RECIPES:
        raise ValueError(f"no field dataset recipe {name!r}; known: {sorted(FIELD_RECIPES)}")
    recipe = FIELD_RECIPES[name]
    if len(tokenizer) != recipe.vocab_size:
        raise ValueError(f"{name}'s tokenizer has {recipe.vocab_size} tokens; this one has {len(tokenizer)}")
    separator_id = tokenizer.convert_tokens_to_ids(recipe.separator)
    if separator_id is None or tokenizer.convert_ids_to_tokens(separator_id) != recipe.separator:
        raise ValueError(f"the tokenizer has no token {recipe.separator!r}")
    from .tokenizer import load_code_tokenizer

    return build_field_data(
        recipe.directory if directory is None else Path(directory), progress, tokenizer=tokenizer,
        separator_id=separator_id, categories=recipe.categories, command=recipe.command,
        record={"dropped": recipe.dropped, "decisions": recipe.decisions}, split_tokenizer=load_code_tokenizer())


def load_field_dataset(n_train: int, n_test: int, directory: Path = FIELD_DATA_DIR, tokenizer=None):
    """The shipped examples as a ``DatasetDict`` ("train", "test") in the zoo's columns: the first ``n_train`` /
    ``n_test`` of each stratum (the stored order is a seeded shuffle). ``strategy`` is the stratum ("prose",
    "attribute+induction"), ``strategies`` its categories, ``text`` the window as text.

    ``tokenizer`` decodes ``text``: pycode-4l's dataset (format 1) takes the shipped code tokenizer when it is
    ``None``; a dataset that records its tokenizer (format 2) refuses another one (by the vocabulary's sha256)
    and, without one, has no ``text`` column (the token columns need none).
    """
    from datasets import Dataset, DatasetDict

    from ..store import FormatError, load_json, load_tensors
    from .tokenizer import load_code_tokenizer

    directory = Path(directory)
    meta = load_json(directory / "examples.json")
    if meta.get("format") != FORMAT or meta.get("format_version") not in FORMAT_VERSIONS:
        raise FormatError(f"{directory / 'examples.json'} is not a field dataset this version of npeff_tl reads")
    tensors = load_tensors(directory / "examples.safetensors")
    if "tokenizer" not in meta and tokenizer is None:
        tokenizer = load_code_tokenizer()
    elif "tokenizer" in meta and tokenizer is not None:
        expected, got = meta["tokenizer"], tokenizer_record(tokenizer)
        if (got["vocab_size"], got["vocab_sha256"]) != (expected["vocab_size"], expected["vocab_sha256"]):
            raise ValueError(f"the tokenizer given ({got['vocab_size']} tokens) is not the one the field dataset in "
                             f"{directory} was made with ({expected['vocab_size']} tokens, vocabulary sha256 "
                             f"{expected['vocab_sha256'][:12]}...)")
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels, taken = meta["labels"][split], Counter()
        keep = []
        for i, stratum in enumerate(labels):
            if taken[stratum] < n:
                taken[stratum] += 1
                keep.append(i)
        windows = tensors[f"{split}.tokens"][keep].long()
        columns = {
            "tokens": windows[:, :-1].tolist(),
            "target_pos": [windows.shape[1] - 2] * len(keep),
            "answer": windows[:, -1].tolist(),
            "strategy": [labels[i] for i in keep],
            "strategies": [labels[i].split("+") for i in keep],
        }
        if tokenizer is not None:
            columns["text"] = tokenizer.batch_decode(windows[:, :-1].tolist())
        out[split] = Dataset.from_dict(columns)
    return DatasetDict(out)


def stratum_figures(model, split, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Per stratum of a field split: the model's top-1 accuracy on the answer and its mean loss (nats)."""
    from ..examples import Examples
    from ..interventions import target_log_probs

    examples = Examples.from_tokens(split["tokens"], split["target_pos"])
    log_probs = target_log_probs(model, examples, batch_size=batch_size)
    answers = torch.tensor(split["answer"])
    loss = -log_probs.gather(1, answers[:, None])[:, 0]
    hits = (log_probs.argmax(1) == answers).double()
    strata = split["strategy"]
    out = {}
    for stratum in dict.fromkeys(strata):
        mask = torch.tensor([s == stratum for s in strata])
        out[stratum] = {"accuracy": float(hits[mask].mean()), "loss": float(loss[mask].double().mean()),
                        "examples": int(mask.sum())}
    return out
