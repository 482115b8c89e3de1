"""The zoo: offline loading, accuracy thresholds, deterministic data, labels checked by independent solvers."""

import pytest
import torch

import npeff_tl.zoo as zoo
from npeff_tl.zoo.tasks import VOCAB, bigram_table
from npeff_tl.zoo.train import accuracy

ENTRIES = ["tasks-2l", "tasks-3l"]


@pytest.fixture(scope="module", params=ENTRIES)
def loaded(request):
    return request.param, *zoo.load(request.param)


def test_the_zoo_lists_its_entries():
    assert set(ENTRIES) <= set(zoo.list())
    with pytest.raises(ValueError, match=r"unknown zoo model 'gpt2'; available: \['tasks-2l'"):
        zoo.load("gpt2")


def test_load_gives_a_model_and_the_data_format(loaded):
    from datasets import DatasetDict
    from transformer_lens import HookedTransformer

    name, model, data = loaded
    assert isinstance(model, HookedTransformer) and isinstance(data, DatasetDict)
    assert set(data) == {"train", "test"}
    for split in data.values():
        assert set(split.column_names) == {"tokens", "target_pos", "answer", "strategy", "strategies", "text"}
        row = split[0]
        assert row["target_pos"] == len(row["tokens"]) - 1 and row["tokens"][0] == VOCAB.index("<bos>")
        assert all(len(s) == (2 if t == "succ_max" else 1) for s, t in zip(split["strategies"], split["strategy"]))
    assert len(set(data["train"]["strategy"])) == 7


def test_accuracy_meets_the_thresholds(loaded):
    name, model, data = loaded
    multi = {row["strategy"] for row in data["test"] if len(row["strategies"]) == 2}
    for strategy, acc in accuracy(model, data["test"]).items():
        assert acc >= (0.80 if strategy in multi else 0.95), f"{name}: {strategy} test accuracy {acc:.3f}"


def test_generation_is_deterministic_and_test_is_disjoint_from_train():
    a, b = zoo.dataset("tasks-2l"), zoo.dataset("tasks-2l")
    assert a["train"]["tokens"] == b["train"]["tokens"] and a["test"]["tokens"] == b["test"]["tokens"]
    assert zoo.dataset("tasks-3l")["train"]["tokens"] != a["train"]["tokens"]  # another data seed
    assert not {tuple(t) for t in a["test"]["tokens"]} & {tuple(t) for t in a["train"]["tokens"]}


def _solve(words, table):
    """An independent solver: reads the prompt as a person would."""
    if words[-1] == "=":
        markers = [w for w in words if w.isupper()]
        xs = [int(w) for w in words if w.isdigit()]
        value = {"FIRST": xs[0], "MAX": max(xs), "MIN": min(xs)}.get(markers[-1], xs[-1])
        return str((value + 1) % 16 if markers[0] == "SUCC" else value)
    *context, last = words
    earlier = [i for i, w in enumerate(context) if w == last]
    return context[earlier[0] + 1] if earlier else table[last]


@pytest.mark.parametrize("name", ENTRIES)
def test_labels_are_right_by_an_independent_solver(name):
    table = bigram_table(zoo.entry(name).table_seed)
    assert sorted(table) == sorted(table.values()) and all(k != v for k, v in table.items())
    data = zoo.dataset(name)
    for split in data.values():
        for row in split:
            words = row["text"].split()
            assert VOCAB[row["answer"]] == _solve(words, table), row


def test_tokenizer_round_trips_and_renders_tokens(loaded):
    name, model, data = loaded
    for row in data["test"].select(range(20)):
        assert model.to_tokens(row["text"])[0].tolist() == row["tokens"]  # TL prepends <bos>, as for any model
        assert model.tokenizer.decode(row["tokens"]) == "<bos> " + row["text"]
        assert model.to_str_tokens(torch.tensor(row["tokens"])) == ["<bos>"] + row["text"].split()


def _bag_of_tokens_accuracy(data, a, b, steps=500):
    """Logistic regression on token counts telling strategy a from b: trained on train, scored on test."""

    def features(split):
        rows = [r for r in split if r["strategy"] in (a, b)]
        x = torch.zeros(len(rows), len(VOCAB))
        for i, r in enumerate(rows):
            x[i].index_add_(0, torch.tensor(r["tokens"]), torch.ones(len(r["tokens"])))
        return x, torch.tensor([float(r["strategy"] == a) for r in rows])

    (x, y), (x_test, y_test) = features(data["train"]), features(data["test"])
    w = torch.zeros(len(VOCAB), requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + bias, y) + 1e-3 * w.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((x_test @ w + bias > 0).float() == y_test).float().mean().item()


def test_same_surface_pair_cannot_be_told_apart_from_a_bag_of_tokens():
    data = zoo.dataset("tasks-2l", n_train=512, n_test=256)
    assert _bag_of_tokens_accuracy(data, "induction", "bigram") <= 0.60
    assert _bag_of_tokens_accuracy(data, "max", "min") >= 0.95  # the classifier works where the bag differs


def test_training_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from npeff_tl.zoo.train import train

    cards = [train("tasks-2l", out=tmp_path / str(i), progress=False, steps=3) for i in range(2)]
    a, b = (load_file(str(tmp_path / str(i) / "model.safetensors")) for i in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cards[0]["training"]["final_loss"] == cards[1]["training"]["final_loss"]
    assert cards[0]["command"] == "python -m npeff_tl.zoo.train tasks-2l"
