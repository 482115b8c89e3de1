"""Component views: top examples, pseudo-Fishers in TL layouts, and the per tensor / head / neuron readout."""

import pytest
import torch

import npeff_tl as nt


def _decomposition(model, kind="diagonal"):
    space = nt.ParamSpace(model, include=["blocks.*.attn.W_Q", "blocks.*.mlp.W_in", "blocks.*.mlp.W_out"])
    named = {name: torch.zeros(space.shapes[name], dtype=torch.float64) for name in space.names}
    named["blocks.0.attn.W_Q"][1] = 1.0  # head 1 of layer 0: 16 x 8 = 128 entries
    named["blocks.1.mlp.W_in"][:, 5] = 1.0  # neuron 5 of layer 1: 16 entries in, 16 out
    named["blocks.1.mlp.W_out"][5] = 1.0
    first = space.to_flat(named)
    second = torch.rand(space.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W = torch.tensor([[0.1, 2.0], [3.0, 0.5], [0.2, 0.1], [1.0, 1.0]], dtype=torch.float64)
    return nt.Decomposition(kind=kind, W=W, components=torch.stack([first, second]),
                            kept_columns=torch.arange(space.size), space=space)


def test_readout_puts_the_mass_where_it_is(model64):
    readout = _decomposition(model64).component(0).readout()
    assert readout.tensors["blocks.0.attn.W_Q"] == pytest.approx(128 / 160)
    assert readout.tensors["blocks.1.mlp.W_in"] == pytest.approx(16 / 160)
    assert readout.tensors["blocks.0.mlp.W_out"] == 0.0
    expected_heads = torch.zeros(2, 2, dtype=torch.float64)
    expected_heads[0, 1] = 0.8
    assert torch.allclose(readout.heads, expected_heads)
    expected_neurons = torch.zeros(2, 32, dtype=torch.float64)
    expected_neurons[1, 5] = 0.2
    assert torch.allclose(readout.neurons, expected_neurons)


def test_lowrank_mass_is_the_squared_direction(model64):
    dec = _decomposition(model64, kind="lowrank")
    component = dec.component(1)
    g = component.direction()
    fisher = component.pseudo_fisher()
    assert all(torch.equal(fisher[name], g[name].square()) for name in g)
    shares = component.readout().tensors
    total = float(dec.components[1].square().sum())
    assert shares["blocks.1.mlp.W_out"] == pytest.approx(float(g["blocks.1.mlp.W_out"].square().sum()) / total)
    with pytest.raises(ValueError, match="D-NPEFF components are diagonals"):
        _decomposition(model64).component(0).direction()


def test_top_examples_absolute_and_relative(model64):
    dec = _decomposition(model64)
    indices, values = dec.component(0).top_examples(2)
    assert indices.tolist() == [1, 3] and values.tolist() == [3.0, 1.0]
    indices, values = dec.component(0).top_examples(2, relative=True)  # shares of each example's total
    assert indices.tolist() == [1, 2] and values[0] == pytest.approx(3.0 / 3.5)
    with pytest.raises(IndexError, match="component 2 does not exist; there are 2"):
        dec.component(2)


def test_readout_under_grouped_query_attention_keeps_each_key_value_group_whole():
    """4 query heads share 2 key/value heads (heads 0-1 use group 0, 2-3 group 1, as the model repeats k/v)."""
    space = nt.ParamSpace.from_shapes({"blocks.0.attn.W_Q": (4, 8, 2), "blocks.0.attn.W_K": (2, 8, 2),
                                       "blocks.0.mlp.W_gate": (8, 6), "blocks.0.mlp.W_in": (8, 6)})
    named = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in space.shapes.items()}
    named["blocks.0.attn.W_Q"][2] = 1.0  # 16 entries of query head 2 (group 1; group 0 if groups interleaved)
    named["blocks.0.attn.W_K"][0] = 2.0  # 32 mass on key head 0 (group 0, query heads 0 and 1)
    named["blocks.0.mlp.W_gate"][:, 4] = 1.0  # 8 on neuron 4 through its gate
    dec = nt.Decomposition(kind="diagonal", W=torch.ones(1, 1, dtype=torch.float64),
                           components=space.to_flat(named)[None], kept_columns=torch.arange(space.size), space=space)
    readout = dec.component(0).readout()
    total = 16 + 32 + 8
    torch.testing.assert_close(readout.groups, torch.tensor([[32 / total, 16 / total]], dtype=torch.float64))
    torch.testing.assert_close(readout.heads, torch.tensor([[16, 16, 16, 0]], dtype=torch.float64) / total)
    assert readout.neurons[0, 4] == pytest.approx(8 / total) and float(readout.neurons.sum()) == pytest.approx(8 / total)


def test_readout_without_grouping_has_no_group_columns(model64):
    assert _decomposition(model64).component(0).readout().groups.shape == (2, 0)
