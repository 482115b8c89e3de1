"""Compositional recovery on planted PEFs: fitted to examples that mostly use one component, NPEFF explains a
held-out example made of two (pairs never seen in training included) by those two components on top."""

import warnings

import pytest

from npeff_tl import DNPEFF, LRMNPEFF, ConvergenceWarning
from helpers.planted import pair_top2, planted_pairs


@pytest.mark.parametrize("kind", ["diagonal", "lowrank"])
def test_npeff_puts_both_planted_components_of_an_unseen_pair_on_top(kind):
    train, test, parts, pairs, seen = planted_pairs(0, kind)
    if kind == "diagonal":
        dec = DNPEFF(n_components=len(parts), max_iter=2000, tol=1e-8, seed=0).fit(train, progress=False)
    else:
        dec = LRMNPEFF(n_components=len(parts), n_iters_g_only=50, n_iters_joint=1000, seed=0).fit(train, progress=False)
    hits, worst_cosine, smallest = pair_top2(dec, test, parts, pairs)
    assert smallest > 0
    unseen = [hit for hit, p in zip(hits, pairs.tolist()) if p not in seen.tolist()]
    assert worst_cosine >= 0.98 and len(unseen) == len(pairs) - len(seen)
    assert sum(hits) / len(hits) >= 0.95 and sum(unseen) / len(unseen) >= 0.95, (sum(hits), len(hits))


@pytest.mark.parametrize("kind", ["diagonal", "lowrank"])
def test_an_exact_fit_converges_although_its_loss_changes_are_rounding_noise(kind):
    """These PEFs are exact sums of the planted components: the loss reaches the rounding of its expanded form
    (around 0, either sign), where relative changes never fall below tol; the fit must stop there, unwarned."""
    train = planted_pairs(0, kind)[0]
    if kind == "diagonal":
        solver, cap = DNPEFF(n_components=8, max_iter=2000, tol=1e-8, seed=0), 2000
    else:
        solver, cap = LRMNPEFF(n_components=8, n_iters_g_only=50, n_iters_joint=1000, seed=0), 1050
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        dec = solver.fit(train, progress=False)
    last = dec.losses[-1]
    assert last["iteration"] < cap and abs(last["loss"]) <= 1e-6 * len(train), last
