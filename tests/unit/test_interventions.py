"""Interventions: exact restore, composition with TL hooks and each other, KL against a direct computation."""

import copy

import pytest
import torch

import npeff_tl as nt
from npeff_tl.interventions import accuracy


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def space(model64):
    return nt.ParamSpace(model64, include=["blocks.*.attn.W_[QKV]", "blocks.*.mlp.W_in"])


def test_leaving_restores_the_model_bit_for_bit_also_after_an_exception(model64, space):
    before = _state(model64)
    step = nt.perturb(model64, nt.random_direction(space, seed=1), space, magnitude=0.7)
    with step:
        assert not _same(before, _state(model64))
    assert _same(before, _state(model64))
    with pytest.raises(KeyError):
        with step:  # reusable
            raise KeyError("boom")
    assert _same(before, _state(model64))


def test_the_step_is_theta_plus_sign_magnitude_unit_direction(model64, space):
    direction = nt.random_direction(space, seed=2)
    theta = space.flat_values(model64)
    with nt.perturb(model64, direction, space, magnitude=0.5, sign=-1):
        moved = space.flat_values(model64)
    expected = theta - 0.5 * direction.vector.double() / direction.vector.double().norm()
    assert torch.allclose(moved, expected.to(moved.dtype), atol=1e-12)


def test_zero_magnitude_gives_zero_kl_and_kl_grows_with_magnitude(model64, tokens, space):
    direction = nt.random_direction(space, seed=3)
    assert torch.equal(nt.kl_divergence(model64, tokens, nt.perturb(model64, direction, space, 0.0)),
                       torch.zeros(len(tokens), dtype=torch.float64))
    kls = [float(nt.kl_divergence(model64, tokens, nt.perturb(model64, direction, space, m)).mean())
           for m in (0.05, 0.2, 0.8)]
    assert 0 < kls[0] < kls[1] < kls[2]


def test_kl_matches_a_direct_computation_in_both_directions(model64, tokens, space):
    step = nt.perturb(model64, nt.random_direction(space, seed=4), space, magnitude=0.5)
    original = model64(tokens)[:, -1].double().log_softmax(-1)
    perturbed_model = copy.deepcopy(model64)
    with torch.no_grad():
        for name, delta in step.deltas.items():
            nt.as_adapter(perturbed_model).named_parameters()[name].add_(delta)  # TL-layout views of the model
    changed = perturbed_model(tokens)[:, -1].double().log_softmax(-1)
    forward = (changed.exp() * (changed - original)).sum(-1)
    backward = (original.exp() * (original - changed)).sum(-1)
    assert torch.allclose(nt.kl_divergence(model64, tokens, step, batch_size=3), forward, atol=1e-12)
    assert torch.allclose(nt.kl_divergence(model64, tokens, step, reverse=True), backward, atol=1e-12)


def test_interventions_compose_with_each_other_and_with_tl_hooks(model64, tokens, space):
    a = nt.perturb(model64, nt.random_direction(space, seed=5), space, 0.3)
    b = nt.perturb(model64, nt.random_direction(space, seed=6), space, 0.4)
    both = nt.ParameterPerturbation(model64, {k: a.deltas[k] + b.deltas[k] for k in a.deltas})

    def halve(resid, hook):
        return resid * 0.5

    hooks = [("blocks.0.hook_resid_post", halve)]
    before = _state(model64)
    with model64.hooks(fwd_hooks=hooks), a, b:
        nested = model64(tokens)
    with both, model64.hooks(fwd_hooks=hooks):
        summed = model64(tokens)
    assert torch.allclose(nested, summed, atol=1e-12)
    with a:
        plain = model64(tokens)
    assert not torch.allclose(nested, plain)  # the hook acted
    assert _same(before, _state(model64))
    with a, pytest.raises(RuntimeError, match="cannot be nested inside itself"):
        with a:
            pass
    assert _same(before, _state(model64))


def test_lrm_directions_and_controls():
    from helpers.planted import planted_lowrank

    factors, _, _ = planted_lowrank(0, n=60)
    pefs = nt.LowRankPEFs.from_dense([u.float() for u in factors])
    dec = nt.LRMNPEFF(n_components=4, n_iters_g_only=5, n_iters_joint=20).fit(pefs, progress=False)
    d = nt.lrm_direction(dec, 1)
    assert d.shape == (dec.space.size,) and float(d.norm()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(d[dec.kept_columns], dec.G[1] / dec.G[1].norm(), atol=1e-6)
    semi = nt.lrm_direction(dec, 1, max_abs_cos=1.0).double()
    G = dec.G.double() / dec.G.double().norm(dim=1, keepdim=True)
    assert abs(float(semi[dec.kept_columns] @ G[3])) < 1e-6  # rejected from the last component it was rejected from
    support = dec.kept_columns[:10]
    control = nt.random_direction(dec.space, seed=0, support=support)
    assert set(control.vector.nonzero().flatten().tolist()) <= set(support.tolist())
    with pytest.raises(ValueError, match="needs an LRM-NPEFF decomposition"):
        nt.lrm_direction(nt.DNPEFF(n_components=2, max_iter=3).fit(
            nt.DiagonalPEFs.from_dense(torch.stack([u.square().sum(0) for u in factors]).float()), progress=False), 0)


def test_accuracy_counts_top_predictions(model64, tokens):
    answers = model64(tokens)[:, -1].argmax(-1)
    answers[0] = (answers[0] + 1) % 23
    assert accuracy(model64, tokens, answers).tolist() == [0.0] + [1.0] * (len(tokens) - 1)


def test_bad_steps_are_clear_errors(model64, space):
    with pytest.raises(ValueError, match=r"no parameters named \['blocks.9.mlp.W_in'\]"):
        nt.ParameterPerturbation(model64, {"blocks.9.mlp.W_in": torch.zeros(3)})
    with pytest.raises(ValueError, match="the step for blocks.0.mlp.W_in has shape"):
        nt.ParameterPerturbation(model64, {"blocks.0.mlp.W_in": torch.zeros(3)})
    with pytest.raises(ValueError, match="the direction is zero"):
        nt.perturb(model64, torch.zeros(space.size), space, 1.0)


def test_a_direction_is_refused_for_another_space_of_the_same_size(model64):
    a = nt.ParamSpace(model64, include=["blocks.0.attn.W_Q"])
    b = nt.ParamSpace(model64, include=["blocks.0.attn.W_K"])
    assert a.size == b.size and a != b
    direction = nt.random_direction(a, seed=0)
    with pytest.raises(ValueError, match="built for another parameter space"):
        nt.perturb(model64, direction, b, 0.1)
    with pytest.raises(ValueError, match="the direction has shape"):
        nt.perturb(model64, torch.ones(a.size + 1), a, 0.1)
    theta = a.flat_values(model64).clone()
    with nt.perturb(model64, direction, a, 0.1):  # its own space: applied
        assert not torch.equal(a.flat_values(model64), theta)
    assert torch.equal(a.flat_values(model64), theta)
