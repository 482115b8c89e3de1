"""The field dataset: labelled next-token examples from held-out stdlib files, shipped as a small file.

Every example is a window of ``WINDOW`` tokens from one held-out file (never seen in training) and the token that
follows it; its labels come from the rules of ``code_labels.py`` and describe the text, not the model's
internals. The held-out files are divided by file into a ``train`` split (for fitting dictionaries) and a
``test`` split (for reporting), so no test window shares a file with a train window. Sampling is balanced
per stratum with a seed: one stratum per category (examples with exactly that one label) and one per frequent
pair of categories (examples with exactly those two labels: the multi-factor examples).

The examples are built once (``python -m npeff_tl.zoo.train --field-data``) and shipped, so every machine gets
the same examples whatever its Python version; ``load_field_dataset`` reads them.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections import Counter
from pathlib import Path

import torch

from ..progress import progress_bar
from .code_labels import CATEGORIES, SourceFacts, target_labels

FIELD_DATA_DIR = Path(__file__).parent / "field_data"
WINDOW = 64
PER_STRATUM = 300
N_PAIRS = 3  # the most frequent pairs of categories, each a stratum of its own
SEED = 0
FORMAT = "npeff_tl.field_data"


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


def labelled_targets(text: str, tokenizer, bigram, window: int = WINDOW):
    """(ids, spans, {target index: labels}) of one file: its tokens (the end-of-text token first, as in
    training) and the labels of every target with a full window before it."""
    from .tokenizer import END_OF_TEXT

    encoding = tokenizer.backend_tokenizer.encode(text)
    ids = [tokenizer.convert_tokens_to_ids(END_OF_TEXT), *encoding.ids]
    spans = [(0, 0), *encoding.offsets]
    facts = SourceFacts.of(text)

    @functools.lru_cache(maxsize=None)  # a file repeats its pairs; one tensor call per pair is the cost here
    def prob(a: int, b: int) -> float:
        return float(bigram.prob(torch.tensor([a]), torch.tensor([b]))[0])

    return ids, spans, {t: target_labels(facts, ids, spans, t, window, prob) for t in range(window, len(ids))}


def build_field_data(directory: Path = FIELD_DATA_DIR, progress: bool = True) -> dict:
    """Label every target of the held-out files, sample the strata, and write ``examples.safetensors`` and
    ``examples.json`` to ``directory``. Returns the JSON part."""
    from ..store import save_json, save_tensors
    from .corpus import Corpus
    from .field import token_stream
    from .ngram import Bigram
    from .tokenizer import load_code_tokenizer

    tokenizer = load_code_tokenizer()
    train = Corpus.from_stdlib("train")
    bigram = Bigram.fit(token_stream(tokenizer, train.texts()), len(tokenizer))
    heldout = Corpus.from_stdlib("heldout")
    pools: dict[str, list[tuple]] = {"train": [], "test": []}
    per_file = []
    for path, text in progress_bar(list(zip(heldout.paths, heldout.texts())), desc="label held-out files", enabled=progress):
        ids, _, labels = labelled_targets(text, tokenizer, bigram)
        per_file.append((path, ids, labels))
    splits = file_splits([p for p, _, _ in per_file], [len(ids) for _, ids, _ in per_file])
    for path, ids, labels in per_file:
        for t, found in labels.items():
            pools[splits[path]].append((tuple(sorted(found)), path, t, ids[t - WINDOW: t + 1]))
    pair_counts = Counter(key for pool in pools.values() for key, *_ in pool if len(key) == 2)
    strata = [(c,) for c in CATEGORIES] + [pair for pair, _ in pair_counts.most_common(N_PAIRS)]
    rows = {"train": [], "test": []}
    for split, pool in pools.items():
        rng = random.Random(f"field-data-{SEED}-{split}")
        for stratum in strata:
            members = [row for row in pool if row[0] == stratum]
            if len(members) < PER_STRATUM:
                raise ValueError(f"stratum {'+'.join(stratum)} has {len(members)} {split} examples, fewer than "
                                 f"{PER_STRATUM}")
            rows[split] += rng.sample(members, PER_STRATUM)
        rng.shuffle(rows[split])
    tensors, files = {}, sorted({path for path, *_ in per_file})
    for split, chosen in rows.items():
        tensors[f"{split}.tokens"] = torch.tensor([window for *_, window in chosen], dtype=torch.int16)
        tensors[f"{split}.file"] = torch.tensor([files.index(path) for _, path, _, _ in chosen], dtype=torch.int16)
        tensors[f"{split}.target_index"] = torch.tensor([t for _, _, t, _ in chosen], dtype=torch.int32)
    meta = {
        "format": FORMAT, "format_version": 1, "window": WINDOW, "per_stratum": PER_STRATUM, "seed": SEED,
        "categories": list(CATEGORIES), "strata": ["+".join(s) for s in strata],
        "labels": {split: ["+".join(key) for key, *_ in chosen] for split, chosen in rows.items()},
        "files": files, "file_split": {path: splits[path] for path in files},
        "pool_sizes": {split: dict(Counter("+".join(key) if key else "(none)" for key, *_ in pool).most_common())
                       for split, pool in pools.items()},
        "corpus": heldout.describe(), "bigram_corpus": train.describe(),
        "command": "python -m npeff_tl.zoo.train --field-data",
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, directory / "examples.safetensors")
    save_json(meta, directory / "examples.json")
    return meta


def load_field_dataset(n_train: int, n_test: int, directory: Path = FIELD_DATA_DIR):
    """The shipped examples as a ``DatasetDict`` ("train", "test") in the zoo's columns: the first ``n_train`` /
    ``n_test`` of each stratum (the stored order is a seeded shuffle). ``strategy`` is the stratum ("prose",
    "attribute+induction"), ``strategies`` its categories, ``text`` the window as text."""
    from datasets import Dataset, DatasetDict

    from ..store import FormatError, load_json, load_tensors
    from .tokenizer import load_code_tokenizer

    meta = load_json(directory / "examples.json")
    if meta.get("format") != FORMAT:
        raise FormatError(f"{directory / 'examples.json'} is not a field dataset")
    tensors = load_tensors(directory / "examples.safetensors")
    tokenizer = load_code_tokenizer()
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels, taken = meta["labels"][split], Counter()
        keep = []
        for i, stratum in enumerate(labels):
            if taken[stratum] < n:
                taken[stratum] += 1
                keep.append(i)
        windows = tensors[f"{split}.tokens"][keep].long()
        out[split] = Dataset.from_dict({
            "tokens": windows[:, :-1].tolist(),
            "target_pos": [windows.shape[1] - 2] * len(keep),
            "answer": windows[:, -1].tolist(),
            "strategy": [labels[i] for i in keep],
            "strategies": [labels[i].split("+") for i in keep],
            "text": tokenizer.batch_decode(windows[:, :-1].tolist()),
        })
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
