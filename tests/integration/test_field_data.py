"""Field datasets for any tokenizer (``field_data.py``): the builder on a tiny hand-written corpus with the zoo's
code tokenizer widened past int16, pycode-4l's shipped dataset unchanged, and the shipped smollm2-135m dataset
read without its tokenizer (CI does not have it)."""

import hashlib
import json

import pytest
import torch

import npeff_tl.zoo as zoo
from npeff_tl.store import load_tensors
from npeff_tl.zoo.code_labels import CODE_AND_PROSE_CATEGORIES
from npeff_tl.zoo.corpus import Corpus
from npeff_tl.zoo.field_data import (FIELD_DATA_DIR, FIELD_RECIPES, WINDOW, build_field_data, build_recipe,
                                     load_field_dataset, token_dtype)
from npeff_tl.zoo.tokenizer import load_code_tokenizer

SMOLLM2_DIR = FIELD_DATA_DIR / "smollm2-135m"

MODULE = '''"""Helpers for the {name} cache (see the notes below).

The {name} cache keeps recent values; a stale {name} entry is dropped (once).
"""
import os


class {Name}Cache(Base):
    """Keep recent {name} values (and more)."""

    def get(self, key, default=None):
        # look the key up (fast path
        # first), then fall back <|mark|>
        if key in self._store:
            return self._store[key]
        value = self.compute("{name}", [key, default])  # <|mark|>
        return value

    def put(self, key, value):
        # store it (the {name} entry <|mark|>
        # wins)
        self._store[key] = value
        if len(self._store) > self.limit:
            self._store.popitem()
        return value


def helper_{index}(path):
    """Join the {name} path (a string) with the cache folder <|mark|>."""
    return os.path.join(path, "{name}")
'''
NAMES = ["socket", "header", "buffer", "message"]
OTHER = '''"""Another module, for the bigram statistics: they must not predict the modules' own repeats."""

import sys


def main(argv):
    for arg in argv:
        print(arg)
    return 0
'''


def _widened_code_tokenizer():
    """The zoo's code tokenizer with 30,000 unused tokens added, then a marker that the corpus uses and a document
    separator: their ids (34,096 and 34,097) do not fit int16."""
    tokenizer = load_code_tokenizer()
    tokenizer.add_tokens([f"<|unused{i}|>" for i in range(30000)] + ["<|mark|>", "<|doc|>"])
    return tokenizer


def _corpus(root, split, names):
    paths = []
    for index, name in enumerate(names):
        (root / f"{name}.py").write_text(MODULE.format(name=name, Name=name.title(), index=index))
        paths.append(f"{name}.py")
    return Corpus(root, split, tuple(paths))


def _build(root, out, tokenizer):
    (root / "other.py").write_text(OTHER)
    return build_field_data(out, progress=False, tokenizer=tokenizer,
                            separator_id=tokenizer.convert_tokens_to_ids("<|doc|>"),
                            categories=CODE_AND_PROSE_CATEGORIES, train_corpus=Corpus(root, "train", ("other.py",)),
                            heldout_corpus=_corpus(root, "heldout", NAMES), per_stratum=2, command="(the tests)",
                            record={"dropped": {}})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A field dataset built from four hand-written held-out modules (two per split), with the bigram statistics
    of another, at 2 examples per stratum."""
    root = tmp_path_factory.mktemp("corpus")
    tokenizer = _widened_code_tokenizer()
    return tokenizer, root / "dataset", _build(root, root / "dataset", tokenizer)


def test_the_builder_makes_a_dataset_for_another_tokenizer_and_rule_set(tiny):
    tokenizer, out, meta = tiny
    assert meta["format_version"] == 2 and meta["categories"] == list(CODE_AND_PROSE_CATEGORIES)
    assert meta["strata"][:len(CODE_AND_PROSE_CATEGORIES)] == list(CODE_AND_PROSE_CATEGORIES)
    assert len(meta["strata"]) == len(CODE_AND_PROSE_CATEGORIES) + 3
    assert meta["tokenizer"]["vocab_size"] == len(tokenizer) == 34098 and meta["tokenizer"]["token_dtype"] == "int32"
    assert meta["tokenizer"]["tokenizer_json_sha256"] is None  # widened in memory: not the file it was read from
    assert meta["separator"] == {"id": 34097, "token": "<|doc|>"} and meta["dropped"] == {}
    for split in ("train", "test"):
        assert sorted(meta["labels"][split]) == sorted(meta["strata"] * 2)
        for stratum in meta["strata"]:
            assert meta["pool_sizes"][split][stratum] >= 2
    assert {meta["file_split"][f] for f in meta["files"]} == {"train", "test"}
    assert meta["target_tokens"]["indent"]["newline_token_holds_indentation"] == 1.0
    assert meta["target_tokens"]["prose_close"]["targets"] > 0 and meta["target_tokens"]["prose_copy"]["targets"] > 0
    assert _build(out.parent, out.parent / "again", tokenizer) == meta  # deterministic
    assert (out.parent / "again" / "examples.safetensors").read_bytes() == (out / "examples.safetensors").read_bytes()


def test_token_ids_beyond_int16_are_stored_as_int32_and_read_back(tiny):
    tokenizer, out, meta = tiny
    tensors = load_tensors(out / "examples.safetensors")
    mark, separator = tokenizer.convert_tokens_to_ids(["<|mark|>", "<|doc|>"])
    windows = tensors["test.tokens"]
    assert windows.dtype == torch.int32 and windows.shape == (2 * len(meta["strata"]), WINDOW + 1)
    assert (windows == mark).any(1).sum() >= len(windows) // 2  # ids that int16 would wrap
    starts = tensors["test.target_index"] == WINDOW  # a window from a file's beginning opens with the separator
    assert torch.equal(windows[:, 0] == separator, starts)
    data = load_field_dataset(2, 2, out, tokenizer)
    assert data["test"]["tokens"] == windows[:, :-1].tolist() and data["test"]["answer"] == windows[:, -1].tolist()
    assert ["<|mark|>" in text for text in data["test"]["text"]] == (windows[:, :-1] == mark).any(1).tolist()
    assert data["train"]["strategy"] == meta["labels"]["train"]
    assert token_dtype(4096) == torch.int16 and token_dtype(2 ** 15) == torch.int16
    assert token_dtype(2 ** 15 + 1) == token_dtype(49152) == torch.int32


def test_loading_checks_the_tokenizer_and_works_without_it(tiny):
    tokenizer, out, _ = tiny
    plain = load_field_dataset(1, 1, out)
    assert "text" not in plain["train"].column_names and len(plain["train"]) == len(plain["test"]) == 14
    with pytest.raises(ValueError, match="is not the one the field dataset"):
        load_field_dataset(1, 1, out, load_code_tokenizer())  # the same tokens, less the 30,002 added


def test_the_builder_refuses_what_it_cannot_do(tmp_path):
    tokenizer = load_code_tokenizer()
    heldout = _corpus(tmp_path, "heldout", NAMES[:2])
    with pytest.raises(ValueError, match="separator_id"):
        build_field_data(tmp_path / "out", progress=False, tokenizer=tokenizer, heldout_corpus=heldout,
                         train_corpus=heldout)
    with pytest.raises(ValueError, match="fewer than 1000"):
        build_field_data(tmp_path / "out", progress=False, tokenizer=tokenizer, separator_id=0,
                         heldout_corpus=heldout, train_corpus=heldout, per_stratum=1000)
    with pytest.raises(ValueError, match="has 49152 tokens; this one has 4096"):
        build_recipe("smollm2-135m", tokenizer, directory=tmp_path / "out")


# pycode-4l's dataset as zoo.load gave it before the builder took other tokenizers (300 per stratum, both splits),
# and the sha256 of its shipped files: neither may change.
PYCODE_ROWS_SHA256 = "7d8d1187b9628064a47e40c12eb79baab5e1b70f36ff75ad0f4e789ae2dd600a"
PYCODE_FILES_SHA256 = {"examples.json": "12d0da60026fddd56e4cc2d8d830f9e352af7997237adb5a30dee3d58eeb881e",
                       "examples.safetensors": "0dcba7f6f4b3823db4d8f72dc5115fbf0e1d964d4fe5a29e87c2917c992e59a9"}


def test_pycode_4l_dataset_is_unchanged():
    for name, sha in PYCODE_FILES_SHA256.items():
        assert hashlib.sha256((FIELD_DATA_DIR / name).read_bytes()).hexdigest() == sha, name
    data = zoo.dataset("pycode-4l", n_train=300, n_test=300)
    rows = json.dumps({split: data[split].to_dict() for split in ("train", "test")}, sort_keys=True)
    assert hashlib.sha256(rows.encode()).hexdigest() == PYCODE_ROWS_SHA256
    assert load_tensors(FIELD_DATA_DIR / "examples.safetensors")["train.tokens"].dtype == torch.int16


def test_the_shipped_smollm2_dataset_reads_without_its_tokenizer():
    meta = json.loads((SMOLLM2_DIR / "examples.json").read_text())
    recipe = FIELD_RECIPES["smollm2-135m"]
    assert meta["format_version"] == 2 and meta["categories"] == list(recipe.categories)
    assert meta["tokenizer"]["vocab_size"] == recipe.vocab_size == 49152
    assert meta["tokenizer"]["token_dtype"] == "int32" and len(meta["tokenizer"]["tokenizer_json_sha256"]) == 64
    assert meta["separator"] == {"id": 0, "token": "<|endoftext|>"}
    assert meta["dropped"] == recipe.dropped and meta["command"] == recipe.command
    assert set(meta["strata"][:len(recipe.categories)]) == set(recipe.categories) >= {"prose_close", "prose_copy"}
    pycode = json.loads((FIELD_DATA_DIR / "examples.json").read_text())
    assert meta["file_split"] == pycode["file_split"]  # each held-out file in the same split as in pycode-4l's
    tensors = load_tensors(SMOLLM2_DIR / "examples.safetensors")
    for split in ("train", "test"):
        windows, files = tensors[f"{split}.tokens"], tensors[f"{split}.file"].tolist()
        assert windows.dtype == torch.int32 and windows.shape == (300 * len(meta["strata"]), WINDOW + 1)
        assert 0 <= int(windows.min()) and int(windows.max()) < 49152
        assert int(windows.max()) >= 2 ** 15  # ids that int16 would have wrapped
        assert {s: meta["labels"][split].count(s) for s in meta["strata"]} == dict.fromkeys(meta["strata"], 300)
        assert all(meta["pool_sizes"][split][s] >= 300 for s in meta["strata"])
        assert {meta["file_split"][meta["files"][f]] for f in files} == {split}  # splits by file
        starts = tensors[f"{split}.target_index"] == WINDOW
        assert torch.equal(windows[:, 0] == 0, starts)  # <|endoftext|> begins each file, and only there
    data = load_field_dataset(5, 3, SMOLLM2_DIR)
    assert "text" not in data["train"].column_names
    assert len(data["train"]) == 5 * len(meta["strata"]) and len(data["test"]) == 3 * len(meta["strata"])
    assert all(len(t) == WINDOW and p == WINDOW - 1 for t, p in zip(data["test"]["tokens"], data["test"]["target_pos"]))
    assert data["test"]["strategies"][0] == data["test"]["strategy"][0].split("+")
    with pytest.raises(ValueError, match="is not the one the field dataset"):
        load_field_dataset(1, 1, SMOLLM2_DIR, load_code_tokenizer())


def _smollm2_prepared():
    from npeff_tl.zoo.pretrained import SMOLLM2_135M

    return SMOLLM2_135M.is_prepared()


@pytest.mark.skipif(not _smollm2_prepared(), reason="smollm2-135m is not prepared here (./run.sh prepare smollm2-135m)")
def test_the_shipped_smollm2_dataset_is_what_its_recipe_makes_with_the_prepared_tokenizer(tmp_path):
    from safetensors.torch import load_file

    from npeff_tl.zoo.pretrained import SMOLLM2_135M

    tokenizer = SMOLLM2_135M.tokenizer(progress=False)
    data = load_field_dataset(2, 2, SMOLLM2_DIR, tokenizer)
    retokenised = tokenizer(data["test"]["text"][0], add_special_tokens=False)["input_ids"]
    assert retokenised[-8:] == data["test"]["tokens"][0][-8:]  # the text decodes the window (its start may merge)
    shipped = json.loads((SMOLLM2_DIR / "examples.json").read_text())
    here = {key: Corpus.from_stdlib(split).fingerprint() for key, split in (("corpus", "heldout"),
                                                                            ("bigram_corpus", "train"))}
    if any(shipped[key]["sha256"] != sha for key, sha in here.items()):
        pytest.skip(f"the shipped examples come from Python {shipped['corpus']['python']}'s standard library")
    built = build_recipe("smollm2-135m", tokenizer, directory=tmp_path, progress=False)
    for meta in (built, shipped):  # the file's bytes may differ with the transformers version that wrote it
        del meta["tokenizer"]["tokenizer_json_sha256"]
    assert built == shipped
    a, b = load_file(str(tmp_path / "examples.safetensors")), load_file(str(SMOLLM2_DIR / "examples.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
