"""The field model and its dataset: labelling rules on hand-written snippets, the shipped examples, the model's
card reproduced on a slice of held-out text, deterministic training."""

import pytest
import torch

import npeff_tl.zoo as zoo
from npeff_tl.zoo.code_labels import CATEGORIES, CODE_AND_PROSE_CATEGORIES, SourceFacts, target_labels
from npeff_tl.zoo.tokenizer import load_code_tokenizer

SNIPPET = '''class Cache(Base):
    """Keep recent values."""

    def get(self, key, default=0x1F):
        if key in self._store:
            return self._store[key]  # hit
        value = self.compute("a b", [key,
                                     default])
        return value


def helper():
    pass
'''


def _labelled(text, bigram=lambda a, b: 0.0, categories=CATEGORIES, unigram=None):
    """[(token text, labels)] of every target of ``text``, each with the whole text before it as its window."""
    tokenizer = load_code_tokenizer().backend_tokenizer
    encoding = tokenizer.encode(text)
    facts = SourceFacts.of(text)
    return [(text[slice(*encoding.offsets[t])],
             target_labels(facts, encoding.ids, encoding.offsets, t, t, bigram, categories, unigram))
            for t in range(1, len(encoding.ids))]


def _by_category(labelled, categories=CATEGORIES):
    return {c: [piece for piece, labels in labelled if c in labels] for c in categories}


def test_each_category_on_a_hand_written_snippet():
    found = _by_category(_labelled(SNIPPET))
    assert found["indent"] == ["\n   ", "\n       ", "\n           ", "\n   "]  # class, def, if, def bodies
    assert found["dedent"] == ["\n       ", "\n"]  # out of the if block; back to column 0 before "def helper"
    assert found["keyword"] == [" def", " if", " return", " return", "def", " pass"]  # not " in": mid-statement
    assert found["close_bracket"] == ["):", "):", "]", "])"]  # not "():", which opens the bracket it closes
    assert found["close_string"] == ['."""', '",']
    assert found["attribute"] == ["._", "._", "comp"]
    assert found["continuation"] == ["a", "che", "x", "1", "F", "store", "store", "ute", "l", "per"]
    assert found["prose"] == ["K", "ee", "p", " re", "cent", " values", '."""', " h", "it"]  # docstring, comment
    assert found["induction"] == ["._", "store"]  # "self._store" again, with bigram statistics that miss it


def test_induction_needs_a_copy_the_bigram_statistics_miss():
    text = "alpha_beta = 1\nalpha_beta = 2\n"
    assert _by_category(_labelled(text))["induction"] == ["p", "ha", "_", "b", "eta", " ="]  # the second copy
    assert _by_category(_labelled(text, bigram=lambda a, b: 0.5))["induction"] == []  # predictable: no label
    assert _by_category(_labelled(SNIPPET, bigram=lambda a, b: 1.0))["induction"] == []


def test_multi_label_and_unlabelled_targets():
    labelled = _labelled('f("abc")\nf("abc")\n')
    assert [labels for piece, labels in labelled if piece == '")'] == [
        {"close_bracket", "close_string"}, {"close_bracket", "close_string", "induction"}]
    assert labelled[0] == ('("', frozenset())  # opening a call: no mechanism the rules name
    assert _labelled("x = y\n") == [(" =", frozenset()), (" y", frozenset()), ("\n", frozenset())]


PROSE_BRACKETS = '''def area(r):
    """Area of a circle (radius r, in metres).

    See [1] and the note (below).
    """
    # a comment (that goes on
    # to the next line) ends here
    x = f(r)  # call (once)
    # an unmatched one) and [a mismatch)
    # opens (here
    y = g(x)  # closes) there
    return x
'''


def test_prose_close_matches_brackets_within_one_comment_block_or_docstring():
    labelled = _labelled(PROSE_BRACKETS, categories=CODE_AND_PROSE_CATEGORIES, unigram=lambda b: 1.0)
    closers = [(piece, sorted(labels)) for piece, labels in labelled if {"close_bracket", "prose_close"} & labels]
    assert closers == [
        ("):", ["close_bracket"]),  # code: Python's tokenize sees it
        (").", ["prose_close"]), ("]", ["prose_close"]), (").", ["prose_close"]),  # in the docstring
        (")", ["prose_close"]),  # a comment block of two lines is one block
        (")", ["close_bracket"]), (")", ["prose_close"]),  # code, then an inline comment
        (")", ["close_bracket"]),  # g(x)
    ]  # "one)" and "mismatch)" close nothing, nor does "closes)": code before it on its line begins another block
    assert _by_category(_labelled(PROSE_BRACKETS), CODE_AND_PROSE_CATEGORIES)["prose_close"] == []  # pycode-4l's rules


PROSE_QUOTES = '''def say(word):
    """Say "hi" or ``x`` or `y`; don't mind it's ``z` or "open.
    """
    # a "quoted" word
    # and "on two
    # lines"
    x = "not (prose)"  # "here
    # and" "not here
    return x  # closed"
'''


def test_prose_close_pairs_double_quotes_and_backquote_runs_but_not_apostrophes():
    labelled = _labelled(PROSE_QUOTES, lambda a, b: 1.0, CODE_AND_PROSE_CATEGORIES, lambda b: 1.0)  # no induction
    closers = [(piece, sorted(labels)) for piece, labels in labelled
               if {"close_bracket", "close_string", "prose_close"} & labels]
    assert closers == [
        ("):", ["close_bracket"]),
        ('"', ["prose_close"]), ("``", ["prose_close"]), ("`", ["prose_close"]),  # "hi", ``x``, `y`
        (' """', ["close_string", "prose"]),  # not the apostrophes, ``z` (runs of two lengths), "open
        ('"', ["prose_close"]), ('"', ["prose_close"]),  # "quoted"; "on two / lines" in one comment block
        (')"', ["close_string"]),  # a string literal, not prose: Python's tokenize closes it
        ('"', ["prose_close"]),  # "here / and" across the block; "not here / closed" in another block
    ]


def test_prose_close_needs_its_opener_inside_the_window():
    text = "# see (the note\n# below) here\n"
    encoding = load_code_tokenizer().backend_tokenizer.encode(text)
    facts, target = SourceFacts.of(text), next(t for t, (a, b) in enumerate(encoding.offsets) if text[a:b] == ")")
    opener = next(t for t, (a, b) in enumerate(encoding.offsets) if "(" in text[a:b])

    def labels(window):
        return target_labels(facts, encoding.ids, encoding.offsets, target, window, lambda a, b: 0.0,
                             CODE_AND_PROSE_CATEGORIES, lambda b: 1.0)

    assert labels(target - opener) == {"prose_close"}
    assert labels(target - opener - 1) == {"prose"}  # the bracket it closes is before the window


PROSE_WORDS = '''def send(sock, data):
    """Write data to the socket, or to a `socket` in a websocket.

    A closed socket raises; the header goes first.
    """
    # sockets, then the header again
    sock.send(data)  # a socket here
'''


def _rare(*words):
    """A unigram model under which only ``words`` (single tokens) are rare."""
    ids = {load_code_tokenizer().backend_tokenizer.encode(w).ids[0] for w in words}
    return lambda b: 0.0 if b in ids else 1.0


def test_prose_copy_is_a_rare_prose_word_copied_without_its_predecessor():
    rare = _rare(" socket", " header", " data", "socket")
    labelled = _labelled(PROSE_WORDS, categories=CODE_AND_PROSE_CATEGORIES, unigram=rare)
    found = [(piece, labels) for piece, labels in labelled if labels & {"prose_copy", "induction"}]
    assert found == [
        (" socket", {"prose_copy"}),  # "A closed socket": the docstring said "the socket"
        (' """', {"close_string", "induction", "prose"}),
        (" socket", {"prose_copy"}),  # the comment's "sockets" begins with the token
        (" header", {"induction", "prose"}),  # "the header" again: induction's copy, not prose_copy
        (" socket", {"prose_copy"}),  # in an inline comment
    ]
    # not: "data" in the docstring (its earlier occurrence is code), "socket" inside "websocket" (not a word's start),
    # the first occurrences, and frequent words (" the")
    assert _by_category(_labelled(PROSE_WORDS, categories=CODE_AND_PROSE_CATEGORIES, unigram=lambda b: 1.0),
                        CODE_AND_PROSE_CATEGORIES)["prose_copy"] == []  # frequent words explain themselves
    assert _by_category(_labelled(PROSE_WORDS, lambda a, b: 1.0, CODE_AND_PROSE_CATEGORIES, rare),
                        CODE_AND_PROSE_CATEGORIES)["prose_copy"] == []  # so does the current token
    assert _by_category(_labelled(PROSE_WORDS, unigram=rare), CODE_AND_PROSE_CATEGORIES)["prose_copy"] == []


def test_prose_mechanisms_replace_the_prose_label_only_in_their_rule_set():
    rare = _rare(" socket", " header", " data", "socket")
    with_prose = _labelled(PROSE_WORDS + PROSE_BRACKETS, categories=CODE_AND_PROSE_CATEGORIES, unigram=rare)
    code_only = _labelled(PROSE_WORDS + PROSE_BRACKETS, unigram=rare)
    assert [p for p, _ in with_prose] == [p for p, _ in code_only]
    for (_, new), (_, old) in zip(with_prose, code_only):
        if new & {"prose_close", "prose_copy"}:
            assert "prose" in old and new - {"prose_close", "prose_copy"} == old - {"prose"}
        else:
            assert new == old
    with pytest.raises(ValueError, match="needs unigram_prob"):
        _labelled("x = 1\n", categories=CODE_AND_PROSE_CATEGORIES)
    with pytest.raises(ValueError, match="no rule for categories"):
        _labelled("x = 1\n", categories=("prose", "sarcasm"))


def test_a_window_too_short_is_refused():
    with pytest.raises(ValueError, match="needs 5 tokens before it"):
        target_labels(SourceFacts.of("x = 1\n"), [0, 1, 2], [(0, 1), (1, 2), (2, 3)], 2, 5, lambda a, b: 0.0)
    with pytest.raises(ValueError, match="cannot tokenize"):
        SourceFacts.of('x = """never closed\n')


@pytest.fixture(scope="module")
def field():
    return zoo.load("pycode-4l", n_train=20, n_test=20), zoo.entry("pycode-4l")


def test_the_field_model_loads_offline_and_reproduces_its_card(field):
    import json

    from npeff_tl.zoo.field import check_loss

    (model, data), entry = field
    card = json.loads((zoo.MODELS_DIR / "pycode-4l" / "card.json").read_text())
    assert model.cfg.n_layers == entry.n_layers and model.cfg.d_vocab == card["config"]["d_vocab"] == 4096
    assert check_loss(model) == pytest.approx(card["check"]["loss"], rel=1e-5)
    losses = card["heldout_loss_per_token"]
    assert losses["model"] < losses["bigram"] - 1.0 < losses["unigram"] - 1.0  # clearly better than a bigram model
    assert model.to_str_tokens("def f():", prepend_bos=False) == ["def", " f", "():"]


def test_the_field_dataset_has_the_zoo_shape_and_is_balanced(field):
    (_, data), _ = field
    for split in data.values():
        assert set(split.column_names) == {"tokens", "target_pos", "answer", "strategy", "strategies", "text"}
        counts = {s: split["strategy"].count(s) for s in set(split["strategy"])}
        assert set(counts.values()) == {20} and len(counts) == len(CATEGORIES) + 3
        assert all(len(t) == 64 and p == 63 for t, p in zip(split["tokens"], split["target_pos"]))
        assert all(s.split("+") == list(f) for s, f in zip(split["strategy"], split["strategies"]))
    assert not {tuple(t) for t in data["train"]["tokens"]} & {tuple(t) for t in data["test"]["tokens"]}
    again = zoo.dataset("pycode-4l", n_train=20, n_test=20)
    assert again["train"]["tokens"] == data["train"]["tokens"] and again["test"]["answer"] == data["test"]["answer"]


def test_the_shipped_dataset_is_what_its_builder_makes(tmp_path):
    import json

    from safetensors.torch import load_file

    from npeff_tl.zoo.corpus import Corpus
    from npeff_tl.zoo.field_data import FIELD_DATA_DIR, build_field_data

    shipped = json.loads((FIELD_DATA_DIR / "examples.json").read_text())
    here = {key: Corpus.from_stdlib(split).fingerprint() for key, split in (("corpus", "heldout"),
                                                                            ("bigram_corpus", "train"))}
    if any(shipped[key]["sha256"] != sha for key, sha in here.items()):
        pytest.skip(f"the shipped examples come from Python {shipped['corpus']['python']}'s standard library; "
                    "this Python's differs, so rebuilding them here gives other examples by design")
    built = build_field_data(tmp_path, progress=False)
    assert built == shipped
    a, b = load_file(str(tmp_path / "examples.safetensors")), load_file(str(FIELD_DATA_DIR / "examples.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_repeats_bit_for_bit():
    import dataclasses

    from npeff_tl.zoo.field import fit

    stream = torch.randint(0, 4096, (2000,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    entry = dataclasses.replace(zoo.entry("pycode-4l"), steps=2, batch_size=4)
    (a, first), (b, second) = fit(entry, stream, progress=False), fit(entry, stream, progress=False)
    assert first["final_train_loss"] == second["final_train_loss"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()  # settings restored
