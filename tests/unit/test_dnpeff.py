"""D-NPEFF on planted truth and its contracts: loss, monotonicity, coefficients, checkpoints, bad input."""

import warnings

import pytest
import torch

from npeff_tl import DNPEFF, ConvergenceWarning, DiagonalPEFs, load_decomposition, matched_cosines
from npeff_tl.decomp import prepare
from helpers.planted import killed_after_checkpoint, planted_diagonal


def _pefs(A, **metadata):
    return DiagonalPEFs.from_dense(A.float(), **metadata)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_recovers_planted_components(seed, noise):
    A, W_true, H_true = planted_diagonal(seed, noise=noise)
    dec = DNPEFF(n_components=H_true.shape[0], max_iter=3000, tol=1e-7, seed=seed).fit(_pefs(A), progress=False)
    H = torch.zeros(dec.n_components, A.shape[1], dtype=torch.float64)
    H[:, dec.kept_columns] = dec.H.double()
    rows, cols, cos = matched_cosines(H_true, H)
    assert cos.min() >= (0.99 if noise == 0 else 0.95), cos
    if noise == 0:  # coefficients: the true ones of the normalised rows, up to each component's scale
        W_norm = W_true / torch.linalg.norm(A, dim=1, keepdim=True)
        for j, k in zip(rows.tolist(), cols.tolist()):
            corr = torch.corrcoef(torch.stack([W_norm[:, j], dec.W[:, k].double()]))[0, 1]
            assert corr >= 0.95, (j, corr)


def test_loss_is_the_true_reconstruction_error_and_never_increases():
    A, _, H_true = planted_diagonal(0, noise=0.1)
    pefs = _pefs(A)
    dec = DNPEFF(n_components=6, max_iter=60, log_every=1, tol=0.0).fit(pefs, progress=False)
    losses = [entry["loss"] for entry in dec.losses]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:]))
    matrix = prepare(pefs)
    dense = matrix.to_dense().double()
    WH = dec.W.double() @ dec.H.double()  # unit-norm H with rescaled W: the same product
    assert losses[-1] == pytest.approx(float((dense - WH).square().sum()), rel=1e-4)


def test_coefficient_fitting_reproduces_the_training_coefficients():
    A, _, H_true = planted_diagonal(1)
    pefs = _pefs(A)
    dec = DNPEFF(n_components=H_true.shape[0], max_iter=2000, tol=1e-8).fit(pefs, progress=False)
    W = dec.fit_coefficients(pefs, n_iter=2000, batch_size=128, progress=False)
    assert torch.allclose(W, dec.W, rtol=0.02, atol=1e-3 * float(dec.W.max()))


def test_interrupted_fit_resumes_to_the_same_result(tmp_path):
    A, _, _ = planted_diagonal(2)
    pefs = _pefs(A)
    run = DNPEFF(n_components=5, max_iter=40, tol=0.0)
    whole = run.fit(pefs, progress=False)
    with killed_after_checkpoint(20):
        run.fit(pefs, checkpoint=tmp_path / "ck", checkpoint_every=10, progress=False)
    resumed = run.fit(pefs, checkpoint=tmp_path / "ck", checkpoint_every=10, progress=False)
    assert torch.equal(resumed.W, whole.W) and torch.equal(resumed.H, whole.H)
    assert resumed.losses == whole.losses
    with pytest.raises(ValueError, match="holds a checkpoint of a different fit"):
        DNPEFF(n_components=5, seed=1).fit(pefs, checkpoint=tmp_path / "ck", progress=False)


def test_save_load_round_trip_and_views(tmp_path):
    A, _, _ = planted_diagonal(0, n=80)
    dec = DNPEFF(n_components=4, max_iter=20).fit(_pefs(A), progress=False)
    dec.save(tmp_path / "dec")
    back = load_decomposition(tmp_path / "dec")
    assert torch.equal(back.W, dec.W) and torch.equal(back.H, dec.H)
    assert torch.equal(back.kept_columns, dec.kept_columns) and back.space == dec.space
    assert back.losses == dec.losses and back.settings == dec.settings
    full = back.full(2)
    assert full.shape == (600,) and torch.equal(full[back.kept_columns], back.H[2])
    assert torch.torch.equal(torch.cat([t.reshape(-1) for t in back.named(2).values()]), full)


def test_bad_input_gets_clear_errors():
    A, _, _ = planted_diagonal(0, n=40)
    pefs = _pefs(A)
    with pytest.raises(ValueError, match=r"n_components must lie in \[1, 40\]"):
        DNPEFF(n_components=41).fit(pefs, progress=False)
    bad = _pefs(A)
    bad.values[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"PEFs of examples \[3\] contain NaN or inf"):
        DNPEFF(n_components=2).fit(bad, progress=False)
    zero = A.clone()
    zero[5] = 0
    with pytest.warns(UserWarning, match=r"examples \[5\] have zero-norm PEFs; they are left out"):
        dec = DNPEFF(n_components=3, max_iter=30).fit(_pefs(zero), progress=False)
    assert dec.W[5].abs().max() == 0
    dec = DNPEFF(n_components=3, max_iter=5).fit(pefs, progress=False)
    other = _pefs(A, target={"rule": "something else"})
    with pytest.raises(ValueError, match="differ in target"):
        dec.fit_coefficients(other, progress=False)
    with pytest.raises(ValueError, match=r"init must be \(W \[40, 2\], H \[2, \d+\] over the kept columns\), got"):
        DNPEFF(n_components=2).fit(pefs, init=(torch.rand(40, 3), torch.rand(3, 10)), progress=False)
    with pytest.raises(ValueError, match="over different parameter spaces"):
        dec.fit_coefficients(_pefs(A[:, :500]), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dec.fit_coefficients(pefs, n_iter=3, progress=False)


def test_a_fit_that_stops_at_its_cap_warns_and_a_converged_one_does_not():
    A, _, H_true = planted_diagonal(0, noise=0.1)
    with pytest.warns(ConvergenceWarning, match="D-NPEFF stopped at its cap of 20 iterations"):
        DNPEFF(n_components=H_true.shape[0], max_iter=20, tol=1e-12).fit(_pefs(A), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        DNPEFF(n_components=H_true.shape[0], max_iter=3000, tol=1e-4).fit(_pefs(A), progress=False)


@pytest.mark.parametrize("size", [100, 1000])  # arrays as long as the space (size <= entries) or a sorted search
def test_kept_columns_and_their_positions_follow_a_plain_count(size):
    from collections import Counter

    from npeff_tl.decomp.matrix import _columns_used, _positions_among

    cols = torch.randint(0, 100, (500,), generator=torch.Generator().manual_seed(size))
    counts = Counter(cols.tolist())
    for at_least in (1, 6):
        kept = _columns_used(cols, size, at_least)
        assert kept.tolist() == sorted(c for c, n in counts.items() if n >= at_least)
        rank = {c: i for i, c in enumerate(kept.tolist())}
        position, keep = _positions_among(kept, cols, size)
        assert keep.tolist() == [c in rank for c in cols.tolist()]
        assert position[keep].tolist() == [rank[c] for c in cols.tolist() if c in rank]
