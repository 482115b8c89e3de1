import pytest
import torch

import npeff_tl as nt

from npeff_tl import Candidates, Examples, Sampled, Target, Threshold, TopK


def test_positions_last_negative_and_several_per_sequence():
    ragged = [[5, 6, 7], [1, 2, 3, 4, 9]]
    ex = Examples.from_tokens(ragged)
    assert ex.position.tolist() == [2, 4] and ex.lengths.tolist() == [3, 5]
    assert Examples.from_tokens(ragged, -2).position.tolist() == [1, 3]
    assert Examples.from_tokens(ragged, 0).position.tolist() == [0, 0]
    several = Examples.from_tokens(ragged, [[0, 2], [1, 3, 4]])
    assert several.seq_index.tolist() == [0, 0, 1, 1, 1] and several.position.tolist() == [0, 2, 1, 3, 4]
    assert len(several) == 5


def test_lengths_from_pad_token_and_mask():
    tokens = torch.tensor([[4, 5, 0, 0], [4, 5, 6, 7]])
    assert Examples.from_tokens(tokens, pad_token_id=0).position.tolist() == [1, 3]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert Examples.from_tokens(tokens, attention_mask=mask).position.tolist() == [2, 3]
    with pytest.raises(ValueError, match="not right-padded"):
        Examples.from_tokens(tokens, attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))


def test_bad_positions_are_clear_errors():
    with pytest.raises(ValueError, match="target position 3 is out of range for sequence 0, which has 3 real tokens"):
        Examples.from_tokens([[1, 2, 3]], [3])
    with pytest.raises(ValueError, match="out of range"):
        Examples.from_tokens([[1, 2, 3]], -4)
    with pytest.raises(ValueError, match="got 1 target positions for 2 sequences"):
        Examples.from_tokens([[1, 2], [3, 4]], [1])
    with pytest.raises(ValueError, match="must be 'last'"):
        Target(position="first")


def test_topk_and_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.04, 0.03, 0.03]]))
    top = TopK(2).select(logits, torch.arange(2))
    assert top.class_ids.tolist() == [[0, 1], [0, 1]]
    assert torch.allclose(top.weights, torch.tensor([[0.5, 0.3], [0.9, 0.04]], dtype=torch.float64))
    th = Threshold(0.1, max_k=3).select(logits, torch.arange(2))
    assert th.class_ids.tolist() == [[0, 1, 2], [0, -1, -1]]
    assert th.weights[1, 1:].tolist() == [0.0, 0.0]
    assert Threshold(0.95, max_k=3, min_k=1).select(logits, torch.arange(2)).class_ids[:, 0].tolist() == [0, 0]


def test_candidates_restrict_and_renormalise():
    logits = torch.randn(3, 10, dtype=torch.float64)
    sel = Candidates([7, 2]).select(logits, torch.arange(3))
    assert sel.class_ids.tolist() == [[7, 2]] * 3
    assert torch.allclose(sel.weights.sum(1), torch.ones(3, dtype=torch.float64))
    expected = logits[:, [7, 2]].softmax(-1)
    assert torch.allclose(sel.weights, expected)
    assert torch.allclose(Candidates([7, 2]).log_probs(logits)[:, [7, 2]], expected.log())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Candidates([11]).select(logits, torch.arange(3))


def test_sampled_is_seeded_per_example():
    logits = torch.randn(6, 30, dtype=torch.float64)
    rule = Sampled(8, seed=3)
    whole = rule.select(logits, torch.arange(6))
    part = rule.select(logits[4:], torch.arange(4, 6))
    assert torch.equal(whole.class_ids[4:], part.class_ids) and torch.equal(whole.weights[4:], part.weights)
    assert torch.allclose(whole.weights.sum(1), torch.ones(6, dtype=torch.float64))
    assert not torch.equal(Sampled(8, seed=4).select(logits, torch.arange(6)).class_ids, whole.class_ids)


def test_empty_class_sets_are_rejected():
    with pytest.raises(ValueError, match="at least one token id"):
        Candidates([])
    with pytest.raises(ValueError, match="k >= 1"):
        TopK(0)
    with pytest.raises(ValueError, match="min_k"):
        Threshold(0.1, max_k=4, min_k=0)
    with pytest.raises(ValueError, match="vocabulary has only 4"):
        TopK(5).select(torch.randn(1, 4), torch.arange(1))


def test_rule_is_recorded():
    target = Target(position=[1, 2], classes=Threshold(0.05, max_k=8))
    assert target.to_dict() == {
        "position": "per_example",
        "classes": {"rule": "Threshold", "tau": 0.05, "max_k": 8, "min_k": 1},
    }


def test_top_k_with_tail_estimates_the_whole_distribution_without_bias():
    from npeff_tl import TopKWithTail

    probs = torch.tensor([[0.6, 0.2, 0.1, 0.05, 0.03, 0.02], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    logits = probs.log()
    selection = TopKWithTail(2, 4, seed=0).select(logits, torch.arange(2))
    assert selection.class_ids[0, :2].tolist() == [0, 1]
    assert torch.allclose(selection.weights[:, :2], probs.topk(2).values)  # the head exactly
    assert torch.allclose(selection.weights[0, 2:].sum(), torch.tensor(0.2, dtype=torch.float64))  # the tail's mass
    assert set(selection.class_ids[0, 2:].tolist()) - {-1} <= {2, 3, 4, 5}  # tail draws never repeat the head
    assert float(selection.weights[1, 2:].sum()) == 0 and (selection.class_ids[1, 2:] == -1).all()  # no tail
    # unbiased: over many seeds, sum_c w_c f(c) averages to E_p[f] for any f
    f = torch.tensor([3.0, -1.0, 7.0, 2.0, 11.0, -5.0], dtype=torch.float64)
    estimates = []
    for seed in range(400):
        s = TopKWithTail(2, 4, seed=seed).select(logits[:1], torch.arange(1))
        estimates.append(float((s.weights * torch.where(s.class_ids >= 0, f[s.class_ids.clamp(min=0)], 0.0)).sum()))
    assert sum(estimates) / len(estimates) == pytest.approx(float(probs[0] @ f), rel=0.02)
    with pytest.raises(ValueError, match="tail_samples >= 1"):
        TopKWithTail(2, 0)


def test_token_ids_outside_the_vocabulary_are_refused_where_they_enter_the_api(model64):
    space = nt.ParamSpace(model64, include=["blocks.0.attn.W_Q"])
    bad = [[1, 2, 3], [1, model64.cfg.d_vocab]]
    with pytest.raises(ValueError, match=f"token id {model64.cfg.d_vocab} .sequence 1, position 1.*outside the model's "
                                         "vocabulary"):
        nt.compute_pefs(model64, bad, space, progress=False)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        nt.KLProbe(model64, nt.Examples.from_tokens(bad))
    with pytest.raises(ValueError, match="answer -3 .example 1. is not a token id"):
        nt.compute_pefs(model64, [[1, 2], [3, 4]], space, answers=torch.tensor([1, -3]), progress=False)


def test_sampled_classes_follow_the_example_not_its_place_in_the_call(model64):
    space = nt.ParamSpace(model64, include=["blocks.0.attn.W_Q"])
    tokens = torch.randint(0, 23, (6, 7), generator=torch.Generator().manual_seed(5))
    target = Target(classes=Sampled(4, seed=1))
    whole = nt.compute_pefs(model64, tokens, space, target, "lowrank", nnz=16, progress=False)
    alone = nt.compute_pefs(model64, tokens[[3]], space, target, "lowrank", nnz=16, progress=False)
    subset = nt.compute_pefs(model64, Examples.from_tokens(tokens).subset([5, 3]), space, target, "lowrank", nnz=16,
                             progress=False)
    for other, row in ((alone, 0), (subset, 1)):
        assert torch.equal(other.per_example["class_ids"][row], whole.per_example["class_ids"][3])
        assert torch.allclose(other.values[row], whole.values[3], rtol=1e-10, atol=1e-14)  # batch rounding
    keys = Examples.from_tokens(tokens).identity(range(6))
    assert len(set(keys.tolist())) == 6 and (keys >= 0).all()


def test_examples_print_briefly_and_padded_bidirectional_models_are_refused():
    from helpers.models import make_model

    examples = Examples.from_tokens(torch.randint(0, 20, (300, 50)))
    assert repr(examples) == "Examples(300 examples in 300 sequences of up to 50 tokens)"
    labeled = nt.LabeledExamples(examples, labels=["a", "b"] * 150)
    assert repr(labeled) == "LabeledExamples(300 examples, 2 labels; with labels)"
    model = make_model()
    model.cfg.attention_dir = "bidirectional"
    space = nt.ParamSpace(model, include=["blocks.0.attn.W_Q"])
    with pytest.raises(ValueError, match="padded to different lengths, and the model attends in both directions"):
        nt.compute_pefs(model, [[1, 2, 3], [1, 2]], space, nnz=4, progress=False)
    assert len(nt.compute_pefs(model, [[1, 2, 3], [3, 2, 1]], space, nnz=4, progress=False)) == 2
