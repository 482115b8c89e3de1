"""LRM-NPEFF on planted truth and its contracts: loss identity, gradient, monotone steps, expansion, resume."""

import warnings

import pytest
import torch

from npeff_tl import DNPEFF, LRMNPEFF, ConvergenceWarning, LowRankPEFs, matched_cosines
from npeff_tl.decomp import prepare
from npeff_tl.decomp.lrm import LRMFit
from helpers.planted import killed_after_checkpoint, planted_lowrank


def _pefs(factors):
    return LowRankPEFs.from_dense([u.float() for u in factors])


def _full(dec, m):
    G = torch.zeros(dec.n_components, m, dtype=torch.float64)
    G[:, dec.kept_columns] = dec.G.double()
    return G


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_recovers_planted_components(seed, noise):
    factors, W_true, G_true = planted_lowrank(seed, noise=noise)
    pefs = _pefs(factors)
    assert len(set(pefs.ranks.tolist())) == 3  # examples of ranks 1, 2 and 3
    dec = LRMNPEFF(n_components=G_true.shape[0], n_iters_g_only=50, n_iters_joint=1500, seed=seed).fit(
        pefs, progress=False)
    rows, cols, cos = matched_cosines(G_true, _full(dec, G_true.shape[1]))
    assert cos.min() >= (0.99 if noise == 0 else 0.95), cos
    if noise == 0:  # coefficients of the normalised PEFs, up to each component's scale
        for j, k in zip(rows.tolist(), cols.tolist()):
            corr = torch.corrcoef(torch.stack([W_true[:, j] / pefs.norms, dec.W[:, k].double()]))[0, 1]
            assert corr >= 0.95, (j, corr)


def _dense_loss(matrix, W, G):
    """sum_i ||F_i - sum_j W_ij g_j g_j^T||_F^2 with explicit m x m matrices."""
    A = matrix.to_dense().double()
    total = 0.0
    for i in range(matrix.n_examples):
        U = A[matrix.row_example == i]
        F_hat = (G.T * W[i]) @ G
        total = total + (U.T @ U - F_hat).square().sum()
    return total


def _small_problem(seed=0):
    factors, _, _ = planted_lowrank(seed, r=4, n=12, m=120, size=20, shared=5, noise=0.1)
    pefs = LowRankPEFs.from_dense([u for u in factors])  # float64
    matrix = prepare(pefs, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    W = torch.rand(matrix.n_examples, 4, generator=g, dtype=torch.float64)
    G = torch.randn(4, matrix.n_columns, generator=g, dtype=torch.float64) * 0.3
    return pefs, matrix, W, G


def test_loss_identity_and_gradient_match_the_dense_computation():
    _, matrix, W, G = _small_problem()
    fit = LRMFit(LRMNPEFF(n_components=4, orthogonal_strength=0.3), matrix, W.clone(), G.clone(), n_free=4)
    dense = _dense_loss(matrix, W, G)
    assert fit.loss == pytest.approx(float(dense), rel=1e-10)
    G_var = G.clone().requires_grad_(True)
    s = 2 / 4
    objective = _dense_loss(matrix, W, G_var) / matrix.n_examples + 0.3 * (G_var @ G_var.T - s * torch.eye(4)).square().sum()
    (autograd,) = torch.autograd.grad(objective, G_var)
    assert torch.allclose(fit.gradient().T, autograd, rtol=1e-9, atol=1e-12)


def test_fitted_components_come_at_unit_norm_with_the_same_reconstruction():
    _, matrix, W, G = _small_problem(2)
    G[1] *= 7.0  # components of very different scales, as a fit may leave them
    fit = LRMFit(LRMNPEFF(n_components=4), matrix, W.clone(), G.clone(), n_free=4)
    dec = fit.decomposition()
    assert torch.allclose(torch.linalg.vector_norm(dec.G, dim=1), torch.ones(4, dtype=torch.float64))
    for i in range(matrix.n_examples):  # W_ij g_j g_j^T summed over j: the same matrix in either gauge
        assert torch.allclose((dec.G.T * dec.W[i]) @ dec.G, (G.T * W[i]) @ G, rtol=1e-10, atol=1e-12)


def test_multiplicative_updates_never_increase_the_loss_for_fixed_components():
    _, matrix, W, G = _small_problem(1)
    fit = LRMFit(LRMNPEFF(n_components=4), matrix, W, G, n_free=4)
    losses = [fit.loss]
    for _ in range(50):
        fit.W = fit.W * fit.N / (fit.W @ fit.pseudo_fisher_gram + 1e-9)
        losses.append(fit.loss)
    assert all(b <= a + 1e-12 * abs(a) for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.9 * losses[0]


def test_fit_loss_never_increases_in_the_joint_phase():
    factors, _, _ = planted_lowrank(3, noise=0.1)
    dec = LRMNPEFF(n_components=6, n_iters_g_only=20, n_iters_joint=200, log_every=1).fit(_pefs(factors), progress=False)
    joint = [e["loss"] for e in dec.losses if e["phase"] == "joint"]
    assert all(b <= a * (1 + 1e-5) + 1e-6 for a, b in zip(joint, joint[1:]))


def test_coefficient_fitting_reproduces_the_training_coefficients():
    factors, _, G_true = planted_lowrank(1)
    pefs = _pefs(factors)
    dec = LRMNPEFF(n_components=G_true.shape[0], n_iters_g_only=50, n_iters_joint=1500).fit(pefs, progress=False)
    W = dec.fit_coefficients(pefs, n_iter=1000, batch_size=100, progress=False)
    assert torch.allclose(W, dec.W, rtol=0.02, atol=1e-3 * float(dec.W.max()))


def test_expansion_keeps_frozen_components_and_finds_the_held_back_ones():
    factors, W_true, G_true = planted_lowrank(4)
    pefs = _pefs(factors)
    first = LRMNPEFF(n_components=10, n_iters_g_only=50, n_iters_joint=1500).fit(pefs, progress=False)
    _, cols, _ = matched_cosines(G_true, _full(first, G_true.shape[1]))
    keep = cols[:6]  # freeze 6 learned components; 4 planted ones are held back
    frozen = type(first)(**{**first.__dict__, "W": first.W[:, keep], "components": first.G[keep]})
    grown = LRMNPEFF(n_components=4, n_iters_g_only=50, n_iters_joint=1500, seed=1).fit(pefs, frozen=frozen,
                                                                                         progress=False)
    assert grown.n_components == 10 and torch.equal(grown.G[4:], frozen.G)  # new ones first, frozen bit for bit
    _, _, cos = matched_cosines(G_true, _full(grown, G_true.shape[1]))
    assert cos.min() >= 0.99


def test_interrupted_fit_resumes_to_the_same_result(tmp_path):
    factors, _, _ = planted_lowrank(2, n=150)
    pefs = _pefs(factors)
    run = LRMNPEFF(n_components=5, n_iters_g_only=10, n_iters_joint=40, tol=0.0)
    whole = run.fit(pefs, progress=False)
    with killed_after_checkpoint(30):
        run.fit(pefs, checkpoint=tmp_path / "ck", checkpoint_every=10, progress=False)
    resumed = run.fit(pefs, checkpoint=tmp_path / "ck", checkpoint_every=10, progress=False)
    assert torch.equal(resumed.W, whole.W) and torch.equal(resumed.G, whole.G)
    assert resumed.losses == whole.losses


def _max_off_diagonal_cosine(G):
    G = G.double() / torch.linalg.vector_norm(G.double(), dim=1, keepdim=True)
    C = (G @ G.T).abs()
    return float((C - torch.diag(torch.diag(C))).max())


def test_orthogonal_regularisation_lowers_the_largest_off_diagonal_cosine():
    factors, _, _ = planted_lowrank(5, noise=0.1)
    pefs = _pefs(factors)
    settings = dict(n_components=12, n_iters_g_only=30, n_iters_joint=300)
    plain = LRMNPEFF(**settings).fit(pefs, progress=False)
    orth = LRMNPEFF(**settings, orthogonal_strength=10.0).fit(pefs, progress=False)
    assert _max_off_diagonal_cosine(orth.G) < _max_off_diagonal_cosine(plain.G)


def test_bad_input_gets_clear_errors():
    factors, _, _ = planted_lowrank(0, n=30)
    pefs = _pefs(factors)
    with pytest.raises(ValueError, match=r"n_components must lie in \[1, 30\]"):
        LRMNPEFF(n_components=31).fit(pefs, progress=False)
    with pytest.raises(ValueError, match="LRM-NPEFF factors low-rank PEFs; these are diagonal"):
        LRMNPEFF(n_components=2).fit(_diagonal(factors), progress=False)
    with pytest.raises(ValueError, match="D-NPEFF factors diagonal PEFs; these are lowrank"):
        DNPEFF(n_components=2).fit(pefs, progress=False)
    dec = LRMNPEFF(n_components=3, n_iters_g_only=2, n_iters_joint=3).fit(pefs, progress=False)
    with pytest.raises(ValueError, match="these are diagonal PEFs but the decomposition was fit on lowrank"):
        dec.fit_coefficients(_diagonal(factors), progress=False)


def _diagonal(factors):
    from npeff_tl import DiagonalPEFs

    return DiagonalPEFs.from_dense(torch.stack([u.square().sum(0) for u in factors]).float())


def test_a_fit_that_stops_at_its_cap_warns_and_a_converged_one_does_not():
    factors, _, G_true = planted_lowrank(0, noise=0.1)
    pefs = _pefs(factors)
    with pytest.warns(ConvergenceWarning, match="LRM-NPEFF stopped at its cap of 30 iterations"):
        LRMNPEFF(n_components=G_true.shape[0], n_iters_g_only=10, n_iters_joint=20, tol=1e-12).fit(pefs, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        LRMNPEFF(n_components=G_true.shape[0], n_iters_g_only=50, n_iters_joint=3000, tol=1e-4).fit(pefs, progress=False)
