import pytest
import torch

import npeff_tl.pefs.grads as grads_module
from npeff_tl import AnswerLogProb, CrossEntropy, Examples, ParamSpace, as_adapter, per_example_grads
from oracles import loop_grads


def test_target_logits_match_full_forward(model64, tokens):
    positions = torch.tensor([[8, 0, 3]] * len(tokens))
    logits = as_adapter(model64).target_logits(tokens, positions)
    full = model64(tokens)
    assert torch.allclose(logits, full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1])), atol=1e-12)


def test_target_logits_without_layernorm():
    from conftest import make_model

    model = make_model(normalization_type=None)
    toks = torch.randint(0, 23, (3, 5))
    out = as_adapter(model).target_logits(toks, torch.tensor([[4]] * 3))
    assert torch.allclose(out[:, 0], model(toks)[:, 4], atol=1e-12)


def test_grads_equal_single_example_autograd_loop(model64):
    """All parameter kinds (embeddings, LayerNorm, attention, MLP, unembed), several positions per sequence."""
    ragged = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17]]
    examples = Examples.from_tokens(ragged, [[1, 5], [2], [0, 3, 7]])
    space = ParamSpace(model64)  # every parameter
    answers = torch.tensor([3, 1, 4, 1, 5, 9])
    blocks = list(per_example_grads(model64, examples, space, AnswerLogProb(answers), batch_size=4, progress=False))
    assert [(b.start, b.stop) for b in blocks] == [(0, 4), (4, 6)]
    fast = torch.cat([b.grads for b in blocks])
    slow = loop_grads(model64, examples.tokens, examples.seq_index, examples.position, space,
                      lambda lp, ex: lp[answers[ex]][None])
    assert fast.shape == (6, 1, space.size)
    assert torch.allclose(fast, slow, rtol=1e-9, atol=1e-12)
    outputs = torch.cat([b.outputs for b in blocks])[:, 0]
    expected = torch.stack([model64(examples.tokens[s : s + 1])[0, p].log_softmax(-1)[a]
                            for s, p, a in zip(examples.seq_index, examples.position, answers)])
    assert torch.allclose(outputs, expected, atol=1e-12)


def test_cross_entropy_is_negative_answer_log_prob(model64, tokens):
    space = ParamSpace(model64, include="blocks.*.mlp.W_*")
    labels = torch.arange(len(tokens)) % 23
    a = torch.cat([b.grads for b in per_example_grads(model64, tokens, space, AnswerLogProb(labels), progress=False)])
    c = torch.cat([b.grads for b in per_example_grads(model64, tokens, space, CrossEntropy(labels), progress=False)])
    assert torch.allclose(a, -c, atol=1e-14)


def test_stored_grads_resume_without_recomputing(model64, tokens, tmp_path, monkeypatch):
    space = ParamSpace(model64, include="blocks.1.mlp.W_in")
    objective = AnswerLogProb(torch.zeros(len(tokens), dtype=torch.long))
    first = [b.grads for b in per_example_grads(model64, tokens, space, objective, batch_size=3, store=tmp_path / "g",
                                                shard_size=4, progress=False)]

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a finished shard")

    monkeypatch.setattr(grads_module, "batch_grads", fail)
    again = list(per_example_grads(model64, tokens, space, objective, batch_size=3, store=tmp_path / "g", shard_size=4,
                                   progress=False))
    assert [(b.start, b.stop) for b in again] == [(0, 4), (4, 8), (8, 10)]
    assert torch.equal(torch.cat(first), torch.cat([b.grads for b in again]))


def test_objective_rows_must_match_examples(model64, tokens):
    space = ParamSpace(model64, include="blocks.1.mlp.W_in")
    with pytest.raises(ValueError, match="data for 3 examples but there are 10"):
        next(per_example_grads(model64, tokens, space, AnswerLogProb(torch.tensor([1, 2, 3])), progress=False))
