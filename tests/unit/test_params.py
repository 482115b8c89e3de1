import pytest
import torch

from npeff_tl import ParamSpace, as_adapter


def test_glob_selection_follows_model_order(model64):
    space = ParamSpace(model64, include=["blocks.*.mlp.W_*", "blocks.1.attn.W_[QKV]"])
    params = as_adapter(model64).named_parameters()
    expected = [n for n in params if n.endswith(("mlp.W_in", "mlp.W_out"))
                or n in ("blocks.1.attn.W_Q", "blocks.1.attn.W_K", "blocks.1.attn.W_V")]
    assert space.names == expected
    assert space.size == sum(p.numel() for n, p in params.items() if n in expected)


def test_exclude(model64):
    space = ParamSpace(model64, include="blocks.0.attn.*", exclude="*.b_*")
    assert space.names == ["blocks.0.attn.W_Q", "blocks.0.attn.W_O", "blocks.0.attn.W_K", "blocks.0.attn.W_V"]


def test_unknown_glob_lists_what_exists(model64):
    with pytest.raises(ValueError, match=r"'blocks\.\*\.mlp\.W_gate' matches no parameter.*blocks\.\*\.mlp\.W_in"):
        ParamSpace(model64, include="blocks.*.mlp.W_gate")


def test_empty_selection_is_an_error(model64):
    with pytest.raises(ValueError, match="selects no parameter"):
        ParamSpace(model64, include="blocks.0.mlp.W_in", exclude="blocks.*.mlp.*")


def test_flat_named_round_trip(model64):
    space = ParamSpace(model64, include=["blocks.*.attn.W_*", "ln_final.*"])
    flat = space.flat_values(model64)
    named = space.to_named(flat)
    params = as_adapter(model64).named_parameters()
    for name, tensor in named.items():
        assert torch.equal(tensor, params[name])  # TL layouts: [n_heads, d_model, d_head] etc.
    assert torch.equal(space.to_flat(named), flat)
    batch = torch.stack([flat, 2 * flat])
    assert torch.equal(space.to_named(batch)["blocks.1.attn.W_O"][1], 2 * params["blocks.1.attn.W_O"])


def test_index_maps_are_inverse(model64):
    space = ParamSpace(model64, include=["blocks.0.attn.W_Q", "blocks.0.attn.b_O", "blocks.1.mlp.W_in"])
    flat = space.flat_values(model64)
    everything = torch.arange(space.size)
    params = as_adapter(model64).named_parameters()
    for i, (name, index) in zip(everything.tolist(), space.locate(everything)):
        assert space.index_of(name, index) == i
        assert flat[i] == params[name][index]
    assert space.param_ids(torch.tensor([0, space.size - 1])).tolist() == [0, 2]


def test_scatter_and_errors(model64):
    space = ParamSpace(model64, include="blocks.0.mlp.W_in")
    dense = space.scatter(torch.tensor([3, 7]), torch.tensor([1.5, -2.0]))
    assert dense.shape == (space.size,) and dense[3] == 1.5 and dense[7] == -2.0 and dense.abs().sum() == 3.5
    with pytest.raises(IndexError, match=r"flat indices must lie in \[0, 512\)"):
        space.scatter(torch.tensor([space.size]), torch.tensor([1.0]))
    with pytest.raises(IndexError, match="out of range"):
        space.index_of("blocks.0.mlp.W_in", (16, 0))
    with pytest.raises(KeyError, match="not in this ParamSpace"):
        space.index_of("blocks.0.mlp.W_out", (0, 0))
    with pytest.raises(ValueError, match="missing"):
        space.to_flat({})


def test_serialised_space_equals_original(model64):
    space = ParamSpace(model64, include="blocks.*.mlp.*")
    again = ParamSpace.from_dict(space.to_dict())
    assert again == space and again.offsets == space.offsets
    assert again != ParamSpace(model64, include="blocks.*.attn.*")


def test_shape_annotations_are_checked_at_run_time(model64):
    """The jaxtyping pytest hook is active: mismatched dimensions fail loudly."""
    from jaxtyping import TypeCheckError

    space = ParamSpace(model64, include="blocks.0.mlp.W_in")
    with pytest.raises(TypeCheckError):
        space.scatter(torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0]))
