"""TransformerBridge over Hugging Face models (GPT-2, GPT-NeoX, Llama with grouped-query attention and a gated MLP),
built from configs in float64: parameters under TransformerLens names and layouts, per-example gradients and PEFs
against a loop over the plain Hugging Face model, and exact restores."""

import pytest
import torch

import npeff_tl as nt
from helpers.hf_models import VOCAB, bridge_and_plain, tl_layout

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
    space = nt.ParamSpace(bridge, include=include, exclude=["unembed.b_U"])
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
