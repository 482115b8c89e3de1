import pytest
import torch

import npeff_tl.pefs.grads as grads_module
import npeff_tl.pefs.linear_grads as linear_grads_module
from npeff_tl import (
    AnswerLogProb,
    CrossEntropy,
    Examples,
    FunctionObjective,
    ParamSpace,
    as_adapter,
    per_example_grads,
)
from npeff_tl.pefs.grads import batch_grads
from npeff_tl.pefs.linear_grads import single_positions
from npeff_tl.pefs.objectives import ClassLogProbs
from helpers.models import unembed_bias
from helpers.oracles import loop_grads


def test_target_logits_match_full_forward(model64, tokens):
    positions = torch.tensor([[8, 0, 3]] * len(tokens))
    logits = as_adapter(model64).target_logits(tokens, positions)
    full = model64(tokens)
    assert torch.allclose(logits, full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1])), atol=1e-12)


@pytest.mark.hooked
def test_target_logits_skip_the_unembed_module_only_where_no_hook_would_see_it(model64, tokens, monkeypatch):
    """TransformerLens's Unembed copies W_U on every call; unobserved, the same map is applied directly."""
    from transformer_lens.components import Unembed

    positions = torch.tensor([[8, 3]] * len(tokens))
    adapter = as_adapter(model64)
    calls = []
    original = Unembed.forward
    monkeypatch.setattr(Unembed, "forward", lambda self, x: calls.append(1) or original(self, x))
    full = model64(tokens)[:, [8, 3]]
    calls.clear()
    direct = adapter.target_logits(tokens, positions)
    assert calls == []
    assert torch.allclose(direct, full, rtol=1e-12, atol=1e-12)
    with model64.hooks(fwd_hooks=[("unembed.hook_out", lambda logits, hook: logits + 1.0)]):
        hooked = adapter.target_logits(tokens, positions)
    assert calls == [1] and torch.allclose(hooked, direct + 1.0, rtol=1e-12, atol=1e-12)


def test_target_logits_without_layernorm():
    from helpers.models import make_model

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


def _grads(model, examples, space, objective, method):
    return torch.cat([b.grads for b in per_example_grads(model, examples, space, objective, batch_size=4,
                                                         method=method, progress=False)])


def test_hook_path_equals_torch_func_on_every_linear_map(model64):
    """The hook trick (captured activations) against its oracle, torch.func, with several positions per sequence."""
    examples = Examples.from_tokens([[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17]],
                                    [[1, 5], [2], [0, 3, 7]])
    maps = as_adapter(model64).linear_maps()
    expected = {f"blocks.{l}.{p}" for l in range(2) for p in
                ["attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "attn.b_Q", "attn.b_K", "attn.b_V", "attn.b_O",
                 "mlp.W_in", "mlp.b_in", "mlp.W_out", "mlp.b_out"]} | {"unembed.W_U", *unembed_bias(model64)}
    assert set(maps) == expected
    space = ParamSpace(model64, include=sorted(expected))
    objective = AnswerLogProb(torch.tensor([3, 1, 4, 1, 5, 9]))
    hooks = _grads(model64, examples, space, objective, "hooks")
    func = _grads(model64, examples, space, objective, "func")
    assert hooks.abs().max() > 0
    assert torch.allclose(hooks, func, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", ["hooks", "func"])
def test_squared_gradients_equal_the_squares_of_the_per_output_gradients(model64, monkeypatch, method):
    """``diagonal=True`` (what D-PEFs use) against squaring and summing the per-output gradients, on every linear
    map, several positions per sequence; on the hook path the last block's maps take the one-position shortcut."""
    examples = Examples.from_tokens([[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17]],
                                    [[1, 5], [2], [0, 3, 7]])
    adapter = as_adapter(model64)
    space = ParamSpace(model64, include=sorted(adapter.linear_maps()))
    objective = ClassLogProbs(torch.tensor([[3, 1, 4], [1, 5, 9], [2, 6, 5], [3, 5, 8], [9, 7, 9], [3, 2, 3]]))
    index = torch.arange(len(examples))
    shortcut = []

    def recorded(dy):
        at = single_positions(dy)
        shortcut.append(at is not None)
        return at

    monkeypatch.setattr(linear_grads_module, "single_positions", recorded)
    def collected(**kwargs):  # each tensor is valid until the next one comes
        pieces, _ = batch_grads(adapter, space, examples, index, objective, objective.aux, method, **kwargs)
        return {name: piece.clone() for name, piece in pieces}

    factors, squares = collected(), collected(diagonal=True)
    assert list(squares) == space.names
    for name in space.names:
        assert squares[name].shape == (len(examples), space.offsets[name][1] - space.offsets[name][0])
        assert torch.allclose(squares[name], factors[name].square().sum(1), rtol=1e-12, atol=1e-300), name
    if method == "hooks":  # the maps of block 1 reach the loss only at the target: one position each
        assert any(shortcut) and not all(shortcut)
        assert (squares["blocks.1.mlp.W_in"] > 0).any()


def test_single_positions_finds_the_one_nonzero_position_or_refuses():
    dy = torch.zeros(2, 3, 5, 1, 4)  # [k, b, pos, head, d_out]
    dy[1, 0, 2, 0, 3] = 1.0
    dy[0, 2, 4, 0, 0] = -2.0
    assert single_positions(dy).tolist() == [2, 0, 4]  # example 1 has no nonzero entry: position 0
    dy[0, 1, 1, 0, 1] = dy[1, 1, 3, 0, 2] = 1.0
    assert single_positions(dy) is None


@pytest.mark.parametrize("frozen", ["all", "some"])
def test_hook_path_works_on_frozen_models_and_restores_them(tokens, frozen):
    from helpers.models import make_model

    model = make_model()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(frozen == "some" and i % 2 == 0)
    flags = [p.requires_grad for p in model.parameters()]
    space = ParamSpace(model, include="blocks.*.mlp.W_*")
    objective = AnswerLogProb(torch.arange(len(tokens)) % 23)
    hooks = _grads(model, tokens, space, objective, "hooks")
    assert torch.allclose(hooks, _grads(model, tokens, space, objective, "func"), rtol=1e-10, atol=1e-14)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(not m._forward_hooks for m in model.modules())  # no hooks left behind

    def failing(logits, aux):
        raise RuntimeError("objective failed")

    with pytest.raises(RuntimeError, match="objective failed"):
        _grads(model, tokens, space, FunctionObjective(failing, torch.zeros(len(tokens), 1)), "hooks")
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.hooked
def test_models_without_linear_maps_fall_back_to_torch_func(tokens):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, d_head=4, n_heads=4, n_key_value_heads=2, d_mlp=32,
                                  d_vocab=23, n_ctx=12, act_fn="silu", gated_mlp=True, normalization_type="RMS",
                                  device="cpu", seed=0, dtype=torch.float64)
    model = HookedTransformer(cfg).eval()
    maps = as_adapter(model).linear_maps()
    assert set(maps) == {"unembed.W_U", "unembed.b_U"}  # grouped-query attention and gated MLPs are not plain maps
    space = ParamSpace(model, include=["blocks.0.mlp.W_*", "blocks.0.attn.*", "unembed.W_U"])
    objective = AnswerLogProb(torch.arange(len(tokens)) % 23)
    slow = loop_grads(model, tokens, torch.arange(len(tokens)), torch.full((len(tokens),), 8), space,
                      lambda lp, ex: lp[ex % 23][None])
    assert torch.allclose(_grads(model, tokens, space, objective, "auto"), slow, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"method='hooks' covers linear maps only, not \['blocks.0.attn"):
        _grads(model, tokens, space, objective, "hooks")


def test_unknown_method_is_a_clear_error(model64, tokens):
    space = ParamSpace(model64, include="blocks.1.mlp.W_in")
    with pytest.raises(ValueError, match=r"method must be one of \('auto', 'hooks', 'func'\), got 'jacrev'"):
        _grads(model64, tokens, space, AnswerLogProb(torch.zeros(10, dtype=torch.long)), "jacrev")
