"""Tracing: exact patching against a one-node-at-a-time loop and AtP against autograd on single examples, the KL
estimate against a direct computation, a saturated-softmax construction that AtP misses and AtP* recovers, the QK
fix's check of its recomputed attention and its rotary and grouped-query attention, agreement figures, exact
restore, saving, and the errors at the entry; all but the construction and the rotary model also on a
TransformerBridge (the TL4 job)."""

import pytest
import torch

import npeff_tl as nt
from helpers.qk_fix import pattern_gaps
from npeff_tl.interventions.probes import kl_rows
from npeff_tl.tracing import KL, agreement, load_trace, spearman, trace
from npeff_tl.tracing.agreement import ranks
from npeff_tl.tracing.tracer import TraceMethod

NODES = ("attn.hook_z", "hook_mlp_out", "hook_resid_post", "mlp.hook_post")


@pytest.fixture
def ragged():
    """Sequences of different lengths, so targets (the last tokens) sit at different positions."""
    g = torch.Generator().manual_seed(5)
    return nt.Examples.from_tokens([torch.randint(0, 23, (n,), generator=g).tolist() for n in (4, 7, 9)])


@pytest.fixture
def step(model64):
    space = nt.ParamSpace(model64, include=["blocks.*.attn.W_[QKV]", "blocks.*.mlp.W_*"])
    return nt.perturb(model64, nt.random_direction(space, seed=3), space, magnitude=3.0)


def _target_log_probs(model, tokens, target, hooks=()):
    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None, : target + 1], fwd_hooks=list(hooks))
    return logits[0, target].double().log_softmax(-1)


def _units(kind, act):
    """[pos, units, features] of one sequence's activation."""
    return {"attn.hook_z": act, "mlp.hook_post": act[..., None]}.get(kind, act[:, None])


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_exact_patching_matches_patching_one_node_at_a_time(model64, ragged, step, direction):
    """Noising: a node of the perturbed run into the original run, effect KL(patched || original). Denoising: a
    node of the original run into the perturbed run, effect KL(patched || original) - KL(perturbed || original)."""
    from contextlib import nullcontext

    result = trace(model64, step, ragged, method="patching", nodes=NODES, batch_size=2, patch_batch=7,
                   direction=direction, progress=False)
    base_context, source_context = (nullcontext(), step) if direction == "noising" else (step, nullcontext())
    for i in range(len(ragged)):
        tokens, target = ragged.tokens[ragged.seq_index[i]], int(ragged.position[i])
        original = _target_log_probs(model64, tokens, target)
        with base_context:
            base = _target_log_probs(model64, tokens, target)
        with source_context:
            _, cache = model64.run_with_cache(tokens[None, : target + 1])
        for kind in NODES:
            for layer in range(model64.cfg.n_layers):
                hook = f"blocks.{layer}.{kind}"
                source = _units(kind, cache[hook][0])
                for unit in range(source.shape[1]):
                    for position in range(target + 1):
                        def patch(act, hook, unit=unit, position=position):
                            act = act.clone()
                            _units(kind, act[0])[position, unit] = source[position, unit]
                            return act

                        with base_context:
                            patched = _target_log_probs(model64, tokens, target, [(hook, patch)])
                        expected = float(kl_rows(patched[None], original[None])[0] - kl_rows(base[None], original[None])[0])
                        got = result.per_example[kind][i, layer]
                        got = got[unit] if kind in ("attn.hook_z", "mlp.hook_post") else got
                        assert float(got[target - position]) == pytest.approx(expected, rel=1e-9, abs=1e-15)
        offsets = result.per_example["hook_mlp_out"].shape[-1]
        assert result.per_example["hook_mlp_out"][i, :, target + 1:].isnan().all()  # no such positions
        assert offsets == int(ragged.position.max()) + 1
    with step:
        changed = torch.stack([_target_log_probs(model64, ragged.tokens[ragged.seq_index[i]], int(ragged.position[i]))
                               for i in range(len(ragged))])
    originals = torch.stack([_target_log_probs(model64, ragged.tokens[ragged.seq_index[i]], int(ragged.position[i]))
                             for i in range(len(ragged))])
    assert torch.allclose(result.total, kl_rows(changed, originals), rtol=1e-10)
    assert result.settings["direction"] == direction


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_atp_is_gradient_times_change_of_each_node_on_single_examples(model64, ragged, step, direction):
    """Oracle: autograd on one example at a time, at the base run, times the other run's activation minus it (also
    on a TransformerBridge, whose head outputs reach its hooks as reshaped views)."""
    from contextlib import nullcontext

    result = trace(model64, step, ragged, method="atp", metric="logprob", nodes=NODES, direction=direction,
                   progress=False)
    base_context, source_context = (nullcontext(), step) if direction == "noising" else (step, nullcontext())
    for i in range(len(ragged)):
        tokens, target = ragged.tokens[ragged.seq_index[i]][None], int(ragged.position[i])
        answer = _target_log_probs(model64, tokens[0], target).argmax()  # the original answer
        with source_context:
            _, cache = model64.run_with_cache(tokens)
        acts = {}

        def keep(act, hook, name):  # keyed by the name asked for: a bridge's hook.name is its own alias
            acts[name] = act
            return act

        hooks = [(name, lambda act, hook, name=name: keep(act, hook, name))
                 for name in (f"blocks.{layer}.{kind}" for kind in NODES for layer in range(2))]
        with base_context:
            logits = model64.run_with_hooks(tokens, fwd_hooks=hooks)[0, target]
            grads = torch.autograd.grad(logits.log_softmax(-1)[answer], list(acts.values()))
        for (hook, act), grad in zip(acts.items(), grads):
            kind, layer = hook.split(".", 2)[2], int(hook.split(".")[1])
            expected = (_units(kind, grad[0]) * _units(kind, cache[hook][0] - act[0].detach())).sum(-1)  # [pos, unit]
            got = result.per_example[kind][i, layer]
            got = got if kind in ("attn.hook_z", "mlp.hook_post") else got[None]
            for position in range(target + 1):
                assert torch.allclose(got[:, target - position], expected[position], rtol=1e-8, atol=1e-14)


def test_grad_drop_is_the_mean_of_estimates_with_each_later_writer_cut_off(ragged):
    """Oracle for GradDrop: per example and residual writer, autograd with that writer's gradient set to zero (a
    tensor hook), the estimate gradient . change with it, and per node the mean of the absolute estimates over the
    writers other than its own (the plain estimate for writers at or before the node)."""
    from helpers.models import make_model

    model = make_model(torch.float64, seed=3, n_layers=3)
    space = nt.ParamSpace(model, include=["blocks.*.attn.W_[QKV]", "blocks.*.mlp.W_*"])
    step = nt.perturb(model, nt.random_direction(space, seed=3), space, magnitude=3.0)
    kinds = ("attn.hook_z", "hook_mlp_out", "hook_resid_post", "mlp.hook_post")
    result = trace(model, step, ragged, method=TraceMethod("grad_drop", grad_drop=True), metric="logprob",
                   nodes=kinds, progress=False)
    writers = [f"blocks.{layer}.{name}" for layer in range(3) for name in ("hook_attn_out", "hook_mlp_out")]
    nodes = [f"blocks.{layer}.{kind}" for kind in kinds for layer in range(3)]
    for i in range(len(ragged)):
        tokens, target = ragged.tokens[ragged.seq_index[i]][None], int(ragged.position[i])
        answer = _target_log_probs(model, tokens[0], target).argmax()
        with step:
            _, cache = model.run_with_cache(tokens)
        estimates = {}  # cut writer (None: none) -> node -> [pos, unit]
        for cut in [None, *writers]:
            acts = {}

            def keep(act, hook, name):
                acts[name] = act
                if name == cut:
                    act.register_hook(torch.zeros_like)
                return act

            hooks = [(name, lambda act, hook, name=name: keep(act, hook, name)) for name in dict.fromkeys(nodes + writers)]
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)[0, target]
            grads = torch.autograd.grad(logits.log_softmax(-1)[answer], [acts[n] for n in nodes], allow_unused=True)
            estimates[cut] = {n: (_units(n.split(".", 2)[2], g[0]) * _units(n.split(".", 2)[2], cache[n][0] - acts[n][0].detach())).sum(-1)
                              for n, g in zip(nodes, grads)}
        for node in nodes:
            kind, layer = node.split(".", 2)[2], int(node.split(".")[1])
            own = 2 * layer + (0 if kind == "attn.hook_z" else 1)
            is_writer = kind != "hook_resid_post"
            terms = [estimates[w if index > own else None][node].abs() for index, w in enumerate(writers)
                     if not (is_writer and index == own)]
            expected = torch.stack(terms).mean(0)  # [pos, unit]
            got = result.per_example[kind][i, layer]
            got = got if kind in ("attn.hook_z", "mlp.hook_post") else got[None]
            for position in range(target + 1):
                assert torch.allclose(got[:, target - position], expected[position], rtol=1e-8, atol=1e-14)
    assert (result.per_example["hook_mlp_out"][:, 0] != 0).any()


def test_the_kl_estimate_is_the_kl_of_the_changed_logits():
    """For both bases (the original run when noising, the perturbed run when denoising): the estimate is
    KL(base with the linearised classes' logits moved || original) - KL(base || original), computed directly."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, generator=g, dtype=torch.float64) * 3
    original, perturbed = logits.log_softmax(-1), (logits + torch.randn(3, 11, generator=g)).log_softmax(-1)
    metric = KL(classes=3)
    for base in (original, perturbed):
        state = metric.state(original, perturbed, base)
        assert (state.classes[:, 0] == original.argmax(-1)).all() and len(set(state.classes[0].tolist())) == 4
        delta = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)  # 5 nodes
        changed = base.expand(5, 3, 11).scatter_add(2, state.classes.expand(5, 3, 4), delta).log_softmax(-1)
        expected = (kl_rows(changed.reshape(15, 11), original.repeat(5, 1)).reshape(5, 3)
                    - kl_rows(base, original))
        assert torch.allclose(metric.estimate(delta, state), expected, rtol=1e-10, atol=1e-14)
        zero = metric.estimate(torch.zeros(3, 4, dtype=torch.float64), state)
        assert torch.allclose(zero, torch.zeros(3, dtype=torch.float64), atol=1e-14)


@pytest.mark.hooked  # the construction is tuned to this HookedTransformer's weights (a bridge's differ)
def test_a_saturated_attention_that_atp_misses_and_atp_star_recovers():
    """Layer 1's head 0 attends (almost) only to one position; the perturbation moves position 1's residual stream
    so that the head attends there instead. The gradient through the saturated softmax is ~0, so AtP sees almost
    nothing at that node, while patching it changes the prediction; the QK fix recomputes the softmax."""
    from helpers.models import make_model

    model = make_model(torch.float64, seed=3)
    with torch.no_grad():
        model.blocks[1].attn.W_Q.mul_(40)
    tokens = torch.randint(0, 23, (4, 7), generator=torch.Generator().manual_seed(2))
    _, cache = model.run_with_cache(tokens)
    query = cache["blocks.1.attn.hook_q"][:, -1, 0].mean(0)
    direction = model.blocks[1].attn.W_K[0] @ query
    direction = direction - direction.mean()
    push = 8 * direction / direction.norm() * cache["blocks.0.hook_resid_post"].norm(dim=-1).mean()

    def move(act, hook):
        act = act.clone()
        act[:, 1] += push
        return act

    shift = nt.HookIntervention(model, [("blocks.0.hook_resid_post", move)])
    pattern = cache["blocks.1.attn.hook_pattern"][:, 0, -1]
    saturated = (pattern.max(-1).values > 0.999) & (pattern.argmax(-1) != 1)
    assert saturated.sum() >= 2  # the construction holds for these examples
    node = lambda method: trace(model, shift, tokens, method=method, progress=False  # noqa: E731
                                ).per_example["hook_resid_post"][saturated, 0, 5]  # position 1 = offset 5
    exact, atp, qk, star = node("patching"), node("atp"), node(TraceMethod("qk", qk_fix=True)), node("atp*")
    assert (exact > 0.01).all()
    assert (atp < 1e-6 * exact).all()  # AtP's false negative
    assert ((qk > exact / 3) & (qk < 3 * exact)).all()  # the QK fix recovers the effect
    assert (star > exact / 5).all()  # and AtP* keeps it (GradDrop averages in passes without that path)


def test_the_qk_fix_vanishes_to_second_order_for_small_perturbations(model64, ragged):
    """The QK fix replaces a first-order term by its exact-softmax version: their difference shrinks 100x when the
    step shrinks 10x (second order), and it leaves the last layer's nodes alone (they feed no later head)."""
    space = nt.ParamSpace(model64, include=["blocks.*.attn.W_[QKV]", "blocks.*.mlp.W_*"])
    direction = nt.random_direction(space, seed=3)
    gaps = []
    for magnitude in (3e-2, 3e-3):
        step = nt.perturb(model64, direction, space, magnitude=magnitude)
        plain = trace(model64, step, ragged, method="atp", metric="logprob", progress=False)
        fixed = trace(model64, step, ragged, method=TraceMethod("qk", qk_fix=True), metric="logprob", progress=False)
        gaps.append(max(float((plain.per_example[k] - fixed.per_example[k]).nan_to_num().abs().max())
                        for k in plain.per_example))
        for kind in ("attn.hook_z", "hook_mlp_out"):
            assert torch.equal(plain.per_example[kind][:, -1].nan_to_num(), fixed.per_example[kind][:, -1].nan_to_num())
    assert gaps[1] > 0 and 50 < gaps[0] / gaps[1] < 200


@pytest.fixture
def rotary_gqa():
    """A HookedTransformer with a partial rotary embedding (4 of 8 features) and 4 query heads sharing 2 key/value
    heads."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer(HookedTransformerConfig(
        n_layers=2, d_model=16, d_head=8, n_heads=4, n_key_value_heads=2, rotary_dim=4, d_mlp=32, d_vocab=23,
        n_ctx=12, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", seed=0,
        dtype=torch.float64, device="cpu")).eval()


@pytest.mark.hooked
def test_runs_trace_with_plain_atp_where_the_qk_fix_does_not_apply(model64, rotary_gqa):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from npeff_tl.tracing.tracer import method_for

    alibi = HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=23, n_ctx=12, act_fn="gelu",
        positional_embedding_type="alibi", attn_scores_soft_cap=30.0, device="cpu"))
    assert method_for(alibi, "atp*") == ("atp", "AtP*'s QK fix does not cover alibi positions, attention soft-capping")
    assert method_for(alibi, "patching") == ("patching", None)
    assert method_for(model64, "atp*") == ("atp*", None)
    assert method_for(rotary_gqa, "atp*") == ("atp*", None)


@pytest.mark.hooked
def test_the_qk_fix_covers_rotary_grouped_query_attention_on_a_hookedtransformer(rotary_gqa, ragged, monkeypatch):
    """The QK fix rotates its queries and keys with the model's own tables and lets each query head read its key
    head: its recomputed pattern is the model's own to float64 rounding, and AtP* ranks nodes like patching."""
    gaps = pattern_gaps(monkeypatch)
    space = nt.ParamSpace(rotary_gqa, include=["blocks.*.attn.W_[QKV]", "blocks.*.mlp.W_*"])
    step = nt.perturb(rotary_gqa, nt.random_direction(space, seed=3), space, magnitude=3.0)
    exact = trace(rotary_gqa, step, ragged, method="patching", progress=False)
    figures = agreement(exact, trace(rotary_gqa, step, ragged, method="atp*", progress=False))
    assert gaps and max(gaps) < 1e-12, gaps
    assert figures["spearman"] > 0.9 and figures["recall"] >= 0.8, figures


@pytest.mark.hooked
def test_the_qk_fix_is_the_same_whatever_its_chunks_of_earlier_nodes(ragged, monkeypatch):
    """The QK fix takes every earlier layer's nodes in chunks of (layer, unit) pairs: one pair per chunk, chunks
    that split a layer's heads and chunks that span layers give the same estimates (3 layers: two later layers
    with one and two earlier ones)."""
    import npeff_tl.tracing.attribution as attribution
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(
        n_layers=3, d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=23, n_ctx=12, act_fn="gelu", seed=1,
        dtype=torch.float64, device="cpu")).eval()
    space = nt.ParamSpace(model, include=["blocks.*.attn.W_[QKV]", "blocks.*.mlp.W_*"])
    step = nt.perturb(model, nt.random_direction(space, seed=3), space, magnitude=3.0)
    method = TraceMethod("qk", qk_fix=True)
    whole = trace(model, step, ragged, method=method, progress=False)
    b, seq, heads = len(ragged), ragged.tokens.shape[1], model.cfg.n_heads
    assert attribution.QK_CHUNK // (b * seq * heads * seq) >= 3 * heads  # the default: all earlier heads at once
    for units_per_chunk in (1, 3, 6):
        monkeypatch.setattr(attribution, "QK_CHUNK", units_per_chunk * b * seq * heads * seq)
        chunked = trace(model, step, ragged, method=method, progress=False)
        for kind in whole.per_example:
            assert torch.allclose(chunked.per_example[kind], whole.per_example[kind], atol=1e-12, equal_nan=True)
    pairs = [(layer, unit) for chunk in attribution._layer_unit_chunks(3, 4, 3) for layer, start, stop in chunk
             for unit in range(start, stop)]
    assert pairs == [(layer, unit) for layer in range(3) for unit in range(4)]
    assert [len(chunk) for chunk in attribution._layer_unit_chunks(3, 4, 3)] == [1, 2, 2, 1]


def test_the_qk_fix_refuses_attention_it_does_not_reproduce(model64, ragged, step, monkeypatch):
    import npeff_tl.tracing.attribution as attribution

    monkeypatch.setattr(attribution, "_scale", lambda model, attn: 2 * model.cfg.d_head ** 0.5)
    with pytest.raises(ValueError, match="recomputes layer 1's attention pattern .* away from the model's own"):
        trace(model64, step, ragged, method="atp*", progress=False)


def test_atp_star_ranks_nodes_like_patching_on_a_random_perturbation(model64, ragged, step):
    exact = trace(model64, step, ragged, method="patching", progress=False)
    star = trace(model64, step, ragged, method="atp*", progress=False)
    figures = agreement(exact, star)
    assert figures["spearman"] > 0.8 and figures["recall"] >= 0.8
    assert star.method == "atp*" and star.metric == "kl" and torch.equal(star.total, exact.total)


def test_spearman_and_ranks_against_the_textbook_formula():
    assert ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(30, generator=g), torch.randn(30, generator=g)
    d = ranks(a) - ranks(b)
    assert spearman(a, b) == pytest.approx(1 - 6 * float(d.square().sum()) / (30 * (30**2 - 1)), rel=1e-12)
    assert spearman(a, a.exp()) == pytest.approx(1.0)


def test_tracing_restores_the_model_and_its_hooks_and_results_round_trip(model64, ragged, step, tmp_path):
    before = {k: v.clone() for k, v in model64.state_dict().items()}
    result = trace(model64, step, ragged, method="atp*", nodes=NODES, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model64.state_dict().items())
    assert not any(h.fwd_hooks or h.bwd_hooks for h in model64.hook_dict.values())
    loaded = load_trace(result.save(tmp_path / "trace"))
    assert loaded.method == result.method and loaded.settings == result.settings
    assert all(torch.equal(loaded.per_example[k], v, ) or torch.allclose(loaded.per_example[k], v, equal_nan=True)
               for k, v in result.per_example.items())
    top = result.top_nodes(3)
    assert [row["effect"] for row in top] == sorted((row["effect"] for row in top), key=abs, reverse=True)
    assert top[0]["node"].startswith("blocks.") and result.heatmap().shape == (2, int(ragged.position.max()) + 1)


def test_bad_input_is_a_clear_error(model64, ragged, step):
    space = nt.ParamSpace(model64, include=["blocks.0.mlp.W_in"])
    with pytest.raises(ValueError, match="method must be one of"):
        trace(model64, step, ragged, method="atp**")
    with pytest.raises(ValueError, match="metric must be"):
        trace(model64, step, ragged, metric="l2")
    with pytest.raises(ValueError, match="unknown node kinds"):
        trace(model64, step, ragged, nodes=("hook_z",))
    with pytest.raises(ValueError, match="needs magnitude"):
        trace(model64, nt.random_direction(space), ragged)
    with pytest.raises(TypeError, match="ParameterDirection"):
        trace(model64, torch.ones(space.size), ragged)
    with pytest.raises(ValueError, match="applies to a ParameterDirection only"):
        trace(model64, step, ragged, magnitude=1.0)
    with pytest.raises(TypeError, match="HookedTransformer or TransformerBridge"):
        trace(torch.nn.Linear(2, 2), step, ragged)
    with pytest.raises(ValueError, match="direction must be one of"):
        trace(model64, step, ragged, direction="backwards")
    with pytest.raises(ValueError, match="classes must be"):
        trace(model64, step, ragged, classes=0)
