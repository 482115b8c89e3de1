"""TransformerBridge over Hugging Face models (GPT-2, GPT-NeoX, Llama with grouped-query attention and a gated MLP),
built from configs in float64: parameters under TransformerLens names and layouts, per-example gradients and PEFs
against a loop over the plain Hugging Face model, exact restores, and AtP*'s QK fix on rotary and grouped-query
attention against the Hugging Face attention module."""

import pytest
import torch

import npeff_tl as nt
from helpers.hf_models import VOCAB, bridge_and_plain, tl_layout
from helpers.models import unembed_bias
from helpers.qk_fix import pattern_gaps

ARCHITECTURES = ["gpt2", "neox", "llama"]
# Hugging Face's Llama normalises in float32 even in a float64 model, so its gradients agree to float32 precision.
TOLERANCE = {"gpt2": dict(rtol=1e-8, atol=1e-11), "neox": dict(rtol=1e-8, atol=1e-11),
             "llama": dict(rtol=1e-5, atol=1e-8)}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def models(request, tmp_path_factory):
    bridge, plain = bridge_and_plain(request.param, tmp_path_factory.mktemp("tokenizer"))
    return request.param, bridge, plain


@pytest.fixture(scope="module")
def examples():
    tokens = torch.randint(1, VOCAB, (5, 7), generator=torch.Generator().manual_seed(3))
    return nt.Examples.from_tokens(tokens, [6, 3, 5, 6, 2])


def _loop_grads(architecture, plain, examples, space, class_ids):
    """Per example and class: a forward of the plain Hugging Face model on the sequence alone and one
    autograd.grad, mapped into TL names and layouts by the architecture's own conventions."""
    names, params = zip(*plain.named_parameters())
    rows = []
    for ex, (seq, pos) in enumerate(zip(examples.seq_index.tolist(), examples.position.tolist())):
        log_probs = plain(examples.tokens[seq : seq + 1]).logits[0, pos].log_softmax(-1)
        row = []
        for c in class_ids[ex].tolist():
            grads = torch.autograd.grad(log_probs[c], params, retain_graph=True, allow_unused=True)
            named = {n: g if g is not None else torch.zeros_like(p) for n, g, p in zip(names, grads, params)}
            tl = tl_layout(architecture, plain, named)
            row.append(torch.cat([tl[name].reshape(-1) for name in space.names]))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def test_the_bridge_computes_what_the_plain_model_computes(models, examples):
    _, bridge, plain = models
    tokens = examples.tokens
    assert torch.allclose(bridge(tokens), plain(tokens).logits, atol=1e-10)


def test_parameters_appear_under_transformerlens_names_as_views_of_the_model(models):
    architecture, bridge, plain = models
    adapter = nt.as_adapter(bridge)
    assert isinstance(adapter, nt.adapters.BridgeAdapter)
    params = adapter.named_parameters()
    expected = tl_layout(architecture, plain, dict(plain.named_parameters()))
    for name, value in expected.items():
        assert torch.equal(params[name], value), name  # the same values in the same layout
    assert set(params) - set(expected) <= {"unembed.b_U"}  # the bridge adds a zero unembedding bias
    assert adapter.config_summary()["unmapped"] == []
    if architecture == "gpt2":  # the unembedding is the embedding: one parameter, one name
        assert "unembed.W_U" not in params
    for name in params:
        behind = adapter.parameters_by_name[name].parameter
        assert params[name].untyped_storage().data_ptr() == behind.untyped_storage().data_ptr(), name
    if architecture == "llama":
        assert params["blocks.0.attn.W_K"].shape == (2, 16, 4) and params["blocks.0.attn.W_Q"].shape == (4, 16, 4)
        assert params["blocks.0.mlp.W_gate"].shape == (16, 32)


@pytest.mark.parametrize("method", ["hooks", "func"])
def test_per_example_gradients_equal_a_loop_over_the_plain_model(models, examples, method):
    architecture, bridge, plain = models
    adapter = nt.as_adapter(bridge)
    include = sorted(adapter.linear_maps()) if method == "hooks" else "*"
    space = nt.ParamSpace(bridge, include=include, exclude=unembed_bias(bridge))  # the plain model has no b_U
    assert space.size > 1000
    before = {name: (p, p.detach().clone()) for name, p in bridge.state_dict(keep_vars=True).items()}
    logits = bridge(examples.tokens)[examples.seq_index, examples.position]
    class_ids = logits.topk(3, dim=-1).indices
    objective = nt.ClassLogProbs(class_ids)
    fast = torch.cat([b.grads for b in nt.per_example_grads(bridge, examples, space, objective, batch_size=2,
                                                            method=method, progress=False)])
    slow = _loop_grads(architecture, plain, examples, space, class_ids)
    assert fast.shape == slow.shape and slow.abs().max() > 0
    assert torch.allclose(fast, slow, **TOLERANCE[architecture])
    after = bridge.state_dict(keep_vars=True)  # the same parameters with the same values, whichever path ran
    assert all(after[name] is p and torch.equal(p, value) for name, (p, value) in before.items())


def test_diagonal_pefs_equal_the_oracle_fisher(models, examples):
    architecture, bridge, plain = models
    space = nt.ParamSpace(bridge, include=["blocks.*.mlp.*", "blocks.*.attn.W_*"])
    pefs = nt.compute_pefs(bridge, examples, space, nt.Target(classes=nt.TopK(2)), "diagonal", nnz=space.size,
                           progress=False)
    logits = bridge(examples.tokens)[examples.seq_index, examples.position].log_softmax(-1)
    top = logits.topk(2, dim=-1)
    grads = _loop_grads(architecture, plain, examples, space, top.indices)
    expected = torch.einsum("nk,nkp->np", top.values.exp(), grads.square())
    dense = pefs.to_dense().to(expected.dtype)
    assert torch.allclose(dense, expected, rtol=1e-5, atol=1e-7 * float(expected.abs().max()))


def test_a_perturbation_restores_the_model_bit_for_bit(models, examples):
    _, bridge, _ = models
    before = {k: v.clone() for k, v in bridge.state_dict().items()}
    space = nt.ParamSpace(bridge, include=["blocks.*.attn.W_*", "blocks.*.mlp.W_*", "embed.W_E"])
    direction = nt.random_direction(space, seed=1)
    clean = bridge(examples.tokens)
    with nt.perturb(bridge, direction, space, magnitude=0.5):
        moved = bridge(examples.tokens)
    assert (moved - clean).abs().max() > 1e-3
    assert all(torch.equal(before[k], v) for k, v in bridge.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"):
        with nt.perturb(bridge, direction, space, magnitude=0.5):
            raise RuntimeError("inside")
    assert all(torch.equal(before[k], v) for k, v in bridge.state_dict().items())
    assert torch.equal(bridge(examples.tokens), clean)


@pytest.mark.sae
def test_an_sae_spliced_at_a_bridge_hook_is_sae_lens_reconstruction(models, examples):
    from npeff_tl.baselines.sae import SAEDictionary, train_sae

    architecture, bridge, _ = models
    hook = "blocks.1.hook_resid_pre"
    train = nt.LabeledExamples(examples, labels=["a", "b", "a", "b", "a"])
    sae = train_sae(bridge, train, hook, d_sae=8, k=2, steps=20, batch_size=16, progress=False).double()
    d = SAEDictionary(bridge, sae, train)
    tokens = examples.tokens
    with torch.no_grad():
        clean = bridge(tokens)
        _, cache = bridge.run_with_cache(tokens, names_filter=[hook])
    features = sae.encode(cache[hook])[examples.seq_index, examples.position]
    assert torch.allclose(d.coefficients(train), features.clamp(min=0).double(), atol=1e-9)
    with torch.no_grad(), d.intervention(0, 0.0):
        assert torch.allclose(bridge(tokens), clean, atol=1e-10)  # the error term keeps the output
    j = int(d.coefficients(train).sum(0).argmax())

    def remove_feature(x, hook):  # SAE-Lens's own encode and decoder row
        return x - sae.encode(x)[..., j:j + 1] * sae.W_dec[j]

    with torch.no_grad(), d.intervention(j, 1.0, sign=1):
        ablated = bridge(tokens)
    with torch.no_grad(), bridge.hooks(fwd_hooks=[(hook, remove_feature)]):
        expected = bridge(tokens)
    # the two ways of removing the feature differ by rounding, which Llama's float32 normalisation (see TOLERANCE)
    # can round apart by a float32 ulp of the logits
    atol = 1e-7 if architecture == "llama" else 1e-9
    assert torch.allclose(ablated, expected, atol=atol) and float((ablated - clean).abs().max()) > 1e-6
    assert torch.equal(bridge(tokens), clean)


def test_the_pipeline_runs_on_a_hugging_face_model_directory(tmp_path, capsys):
    """`npeff-tl run` with model.name = a save_pretrained directory (model and tokenizer): loaded through the bridge.
    Without SAE-Lens (transformer-lens 4), the SAE row is left out with a warning and the rest runs."""
    import json

    from helpers.hf_models import hf_model, tokenizer
    from npeff_tl.baselines.sae import sae_lens_available
    from npeff_tl.cli import main

    directory = tmp_path / "gpt2-tiny"
    hf_model("gpt2", dtype=torch.float32).save_pretrained(directory)
    tokenizer(directory)
    generator = torch.Generator().manual_seed(0)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(120):
            words = " ".join(f"w{int(t)}" for t in torch.randint(1, VOCAB - 1, (5,), generator=generator))
            f.write(json.dumps({"prompt": words, "label": ["even", "odd"][i % 2]}) + "\n")
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--quiet", "--set", f"model.name={directory}",
                 "--set", f"data.source={tmp_path / 'prompts.jsonl'}", "--set", "fit.n_components=3",
                 "--set", "pefs.nnz=256", "--set", "selectivity.n_top=5", "--set", "selectivity.n_baseline=40",
                 "--set", "selectivity.n_measured=2", "--set", "compare.sae_widths=[8]", "--set", "compare.sae_k=[2]",
                 "--set", "compare.sae_steps=30"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sae = ["sae_8"] if sae_lens_available() else []
    assert set(summary["methods"]) == {"dnpeff", "lrm_npeff", *sae, "gradient_clustering", "activation_kmeans"}
    assert sae or "SAE baselines left out: SAE-Lens is not installed here" in capsys.readouterr().err
    assert (out / "report.html").is_file()
    pefs = nt.load_pefs(out / "pefs" / "train_diagonal")
    assert pefs.metadata["model"]["class"] == "TransformerBridge"
    assert pefs.space.names[0].startswith("blocks.0.mlp.W_")  # the default space, under TransformerLens names
    # circuits are traced on a bridge too, with AtP* on GPT-2's attention (this random model's components reach
    # no KL target, so there is no calibrated intervention to trace: see test_attribution_patching_... for traces)
    traces = json.loads((out / "selectivity" / "dnpeff" / "traces" / "index.json").read_text())
    assert traces["method"] == "atp*"


def test_pefs_record_the_compatibility_mode_and_refuse_to_mix(tmp_path, examples):
    """Compatibility mode folds LayerNorms and centres weights: another parametrisation, another Fisher."""
    space_of = lambda model: nt.ParamSpace(model, include="blocks.*.mlp.W_in")  # noqa: E731
    plain, _ = bridge_and_plain("gpt2", tmp_path / "a")
    folded, _ = bridge_and_plain("gpt2", tmp_path / "b")
    folded.enable_compatibility_mode(disable_warnings=True)
    target = nt.Target(classes=nt.TopK(2))
    first, second = (nt.compute_pefs(m, examples, space_of(m), target, "diagonal", nnz=64, progress=False)
                     for m in (plain, folded))
    assert first.metadata["model"]["compatibility_mode"] is False
    assert second.metadata["model"]["compatibility_mode"] is True
    with pytest.raises(ValueError, match="differ in model"):
        type(first).concatenate([first, second])


@pytest.mark.hooked
def test_gpt2_pefs_equal_hookedtransformers_on_the_same_weights(tmp_path, examples):
    """Where the parametrisations match (every block weight, bias and LayerNorm, the positional embedding, the
    final LayerNorm; not W_E, which the Hugging Face model ties to the unembedding and HookedTransformer does
    not), the bridge's PEFs are HookedTransformer's."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    bridge, plain = bridge_and_plain("gpt2", tmp_path)
    c = plain.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
                                  d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
                                  normalization_type="LN", eps=c.layer_norm_epsilon, device="cpu", dtype=torch.float64)
    hooked = HookedTransformer(cfg).eval()
    hooked.load_state_dict(convert_gpt2_weights(plain, cfg), strict=False)
    assert torch.allclose(hooked(examples.tokens), bridge(examples.tokens), atol=1e-10)
    include = ["blocks.*", "pos_embed.W_pos", "ln_final.*"]
    target = nt.Target(classes=nt.TopK(3))
    pefs = [nt.compute_pefs(m, examples, nt.ParamSpace(m, include=include), target, "diagonal",
                            nnz=nt.ParamSpace(m, include=include).size, progress=False) for m in (hooked, bridge)]
    assert pefs[0].space == pefs[1].space
    assert torch.allclose(pefs[0].to_dense(), pefs[1].to_dense(), rtol=1e-6, atol=1e-12)


def test_component_readouts_cover_grouped_query_heads_and_gated_neurons(models, examples):
    architecture, bridge, _ = models
    space = nt.ParamSpace(bridge, include=["blocks.*.attn.W_*", "blocks.*.mlp.W_*"])
    pefs = nt.compute_pefs(bridge, examples, space, nt.Target(classes=nt.TopK(2)), "diagonal", nnz=256,
                           progress=False)
    readout = nt.DNPEFF(2, max_iter=20, tol=0.0).fit(pefs, progress=False).component(0).readout()
    n_heads = bridge.cfg.n_heads
    assert readout.heads.shape == (2, n_heads)
    attention = sum(share for name, share in readout.tensors.items() if ".attn." in name)
    mlp = sum(share for name, share in readout.tensors.items() if ".mlp." in name)
    assert float(readout.heads.sum()) == pytest.approx(attention, rel=1e-9)  # every head tensor, K/V shared out
    assert float(readout.neurons.sum()) == pytest.approx(mlp, rel=1e-9)     # W_gate, W_in and W_out


def test_the_adapters_hooks_run_like_transformerlens_hooks_on_a_bridge(models, examples):
    """``adapter.hooks`` puts every hook behind one filter: hooks on one point run in the given order on each
    other's outputs (as ``model.hooks`` with one entry per hook does), names resolve as the bridge's, unknown
    names are refused, and nothing stays behind."""
    from npeff_tl.adapters import as_adapter

    _, bridge, _ = models
    tokens = examples.tokens
    hooks = [("blocks.0.hook_resid_post", lambda act, hook: act * 2),
             ("blocks.0.hook_resid_post", lambda act, hook: act + 1),
             ("blocks.0.hook_mlp_out", lambda act, hook: None)]
    with torch.no_grad():
        with bridge.hooks(fwd_hooks=hooks):
            expected = bridge(tokens)
        with as_adapter(bridge).hooks(hooks):
            got = bridge(tokens)
        plain = bridge(tokens)
    assert torch.equal(got, expected) and not torch.equal(got, plain)
    with pytest.raises(ValueError, match="no hooks named \\['blocks.0.hook_nothing'\\]"):
        as_adapter(bridge).hooks([("blocks.0.hook_nothing", lambda act, hook: None)])


def _mlp_step(bridge):
    space = nt.ParamSpace(bridge, include=["blocks.*.mlp.W_*"])
    return nt.perturb(bridge, nt.random_direction(space, seed=3), space, magnitude=3.0)


def test_attribution_patching_ranks_nodes_like_exact_patching_on_a_bridge(models, examples):
    """AtP and AtP* on every architecture: AtP*'s QK fix covers GPT-2's attention, GPT-NeoX's partial rotary
    embedding and Llama's rotary embedding with grouped-query attention."""
    _, bridge, _ = models
    step = _mlp_step(bridge)
    exact = nt.trace(bridge, step, examples, method="patching", progress=False)
    for method in ["atp", "atp*"]:
        figures = nt.tracing.agreement(exact, nt.trace(bridge, step, examples, method=method, progress=False))
        assert figures["spearman"] > 0.9 and figures["recall"] >= 0.8, (method, figures)


def test_the_qk_fix_recomputes_the_bridges_own_attention_pattern(models, examples, monkeypatch):
    """With the rotary embedding (partial on GPT-NeoX) and Llama's key/value heads shared by query heads, the QK
    fix's recomputed pattern is the bridge's own up to rounding (Hugging Face's softmax runs in float32), far below
    the check's tolerance (without the rotary embedding, or with another key head per query head, it refuses)."""
    _, bridge, _ = models
    gaps = pattern_gaps(monkeypatch)
    nt.trace(bridge, _mlp_step(bridge), examples, method="atp*", progress=False)
    assert len(gaps) == bridge.cfg.n_layers - 1 and max(gaps) < 1e-6, gaps


def test_the_qk_fix_takes_the_rotary_embedding_the_model_applied(tmp_path, examples, monkeypatch):
    """YaRN scaling (other frequencies, and an attention factor on cos and sin) with a rope_theta that the bridge's
    config does not carry: the QK fix takes the cos and sin its attention got, so the pattern is still its own."""
    import copy

    from transformers import AutoModelForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    from helpers.hf_models import HUB_NAMES, hf_config, tokenizer

    config = hf_config("llama")
    config.rope_parameters = dict(rope_type="yarn", rope_theta=100.0, factor=4.0, original_max_position_embeddings=4)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config).double().eval()
    assert plain.model.rotary_emb.attention_scaling > 1.1
    bridge = TransformerBridge.boot_transformers(HUB_NAMES["llama"], hf_model=copy.deepcopy(plain),
                                                 tokenizer=tokenizer(tmp_path), device="cpu", dtype=torch.float64)
    gaps = pattern_gaps(monkeypatch)
    nt.trace(bridge, _mlp_step(bridge), examples, method="atp*", progress=False)
    assert gaps and max(gaps) < 1e-6, gaps


def test_the_qk_fix_is_the_exact_softmax_change_of_rotary_grouped_query_attention(tmp_path, examples):
    """Oracle: the Hugging Face attention module's own forward (eager, with its rotary embedding and repeat_kv) on
    the patched input. For the residual stream after layer 0 at each position of each example, the QK fix (AtP with
    it minus AtP without, log-probability metric) is, over layer 1's heads, G . (A_q - A) + G . (A_k - A) -
    Gq . dq - Gk . dk: A_q is the module's pattern with the queries computed from the patched input and the keys
    from the original one, A_k the other way round, dq and dk the changes of q_proj's and k_proj's outputs, and G,
    Gq, Gk the answer log-probability's gradients at the bridge's hook_pattern, hook_q and hook_k (before the
    rotary embedding, as AtP's first-order terms)."""
    from npeff_tl.tracing.tracer import TraceMethod

    bridge, plain = bridge_and_plain("llama", tmp_path)  # the step below moves MLP weights, not layer 1's attention
    plain.set_attn_implementation("eager")  # the module returns its pattern
    with torch.no_grad():  # sharp attention in layer 1, where the softmax is far from its linearisation
        for model in (plain, bridge.original_model):
            model.model.layers[1].self_attn.q_proj.weight.mul_(60)
    layer, cfg = plain.model.layers[1], plain.config
    step = _mlp_step(bridge)
    traced = {method: nt.trace(bridge, step, examples, method=method, metric="logprob", nodes=("hook_resid_post",),
                               progress=False).per_example["hook_resid_post"][:, 0]  # [n, offset], layer 0
              for method in ("atp", TraceMethod("qk", qk_fix=True))}
    got = traced[TraceMethod("qk", qk_fix=True)] - traced["atp"]
    names = ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_q", "blocks.1.attn.hook_k"]

    def keep(act, hook, name):
        acts[name] = act
        return act

    def pattern(hidden, rotary, mask, held=None, held_input=None):
        """The module's pattern [head, query, key] on ``hidden``, with its ``held`` projection (if any) computed from
        ``held_input`` instead."""
        hold = lambda m, args, out: torch.nn.functional.linear(held_input, m.weight)  # noqa: E731
        handle = getattr(layer.self_attn, held).register_forward_hook(hold) if held else None
        try:
            return layer.self_attn(hidden, position_embeddings=rotary, attention_mask=mask)[1][0]
        finally:
            if handle:
                handle.remove()

    checked = 0
    for i, (seq, target) in enumerate(zip(examples.seq_index.tolist(), examples.position.tolist())):
        tokens, acts = examples.tokens[seq: seq + 1, : target + 1], {}
        with step, torch.no_grad():
            _, cache = bridge.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_post"])
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[(name, lambda act, hook, name=name: keep(act, hook, name))
                                                          for name in names])[0, target]
        G, Gq, Gk = (g[0] for g in torch.autograd.grad(logits.log_softmax(-1)[logits.argmax()],
                                                       [acts[name] for name in names[1:]]))
        with torch.no_grad():
            x = acts[names[0]].detach()
            h = layer.input_layernorm(x)
            rotary = plain.model.rotary_emb(h, torch.arange(target + 1)[None])
            mask = torch.full((target + 1, target + 1), -torch.inf, dtype=x.dtype).triu(1)[None, None]
            A = pattern(h, rotary, mask)
            for position in range(target + 1):
                moved = x.clone()
                moved[0, position] = cache["blocks.0.hook_resid_post"][0, position]
                h2 = layer.input_layernorm(moved)
                dq, dk = ((getattr(layer.self_attn, proj)(h2) - getattr(layer.self_attn, proj)(h))[0]
                          .reshape(target + 1, heads, -1) for proj, heads in
                          (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)))
                A_q, A_k = (pattern(h2, rotary, mask, held, h) for held in ("k_proj", "q_proj"))
                expected = float((G * (A_q - A)).sum() + (G * (A_k - A)).sum() - (Gq * dq).sum() - (Gk * dk).sum())
                # Hugging Face's softmax runs in float32: its rounding, ~1e-9 here, bounds the agreement
                assert float(got[i, target - position]) == pytest.approx(expected, rel=1e-4, abs=1e-8), (i, position)
                checked += abs(expected) > 1e-5
    assert checked >= 10  # the corrections are far above that rounding


def test_unknown_hook_names_are_refused_on_a_bridge(models):
    """A bridge ignores hooks at names it does not have; npeff_tl checks them against its hook dict first."""
    from npeff_tl.baselines.activations import check_hook

    _, bridge, _ = models
    with pytest.raises(ValueError, match="unknown hook names"):
        nt.HookIntervention(bridge, [("blocks.0.hook_resid_prez", lambda x, hook: x)])
    with pytest.raises(ValueError, match="unknown hook 'blocks.0.attn.hook_zz'"):
        check_hook(bridge, "blocks.0.attn.hook_zz")
    check_hook(bridge, "blocks.0.attn.hook_z")  # a TransformerLens alias the bridge knows
    names = nt.as_adapter(bridge).config_summary()["hf_names"]
    assert names["blocks.0.mlp.W_out"].endswith(("mlp.c_proj.weight", "mlp.dense_4h_to_h.weight", "mlp.down_proj.weight"))


def test_target_logits_unembed_only_the_targets_and_equal_the_full_forward(models):
    _, bridge, _ = models
    adapter = nt.as_adapter(bridge)
    tokens = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))
    positions = torch.tensor([[6, 2], [3, 3], [0, 5]])
    full = bridge(tokens)
    expected = full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))
    seen = []
    handle = bridge.unembed.hook_out.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    try:
        assert torch.allclose(adapter.target_logits(tokens, positions), expected, rtol=0, atol=1e-12)
    finally:
        handle.remove()
    assert seen == [(3, 2, VOCAB)]  # the unembedding saw the six targets, not all 21 positions
    assert torch.equal(bridge(tokens), full)  # and the model is as it was
