"""Compositional recovery on planted PEFs: fitted to examples that mostly use one component, NPEFF explains a
held-out example made of two (pairs never seen in training included) by those two components on top."""

import pytest
import torch

from npeff_tl import DNPEFF, LRMNPEFF, matched_cosines
from helpers.planted import planted_pairs


def _top2_hits(dec, test, parts, pairs) -> tuple[list[bool], float]:
    """(per held-out pair, whether its two largest coefficients are its two planted components; the worst
    cosine of a planted component with its matched fitted one)."""
    full = torch.zeros(dec.n_components, parts.shape[1], dtype=torch.float64)
    full[:, dec.kept_columns] = dec.components.double()
    rows, cols, cos = matched_cosines(parts, full)
    planted_of = dict(zip(cols.tolist(), rows.tolist()))  # fitted component -> planted one
    W = dec.fit_coefficients(test, n_iter=1000, progress=False)
    top = W.topk(2, dim=1)
    assert (top.values > 0).all()
    return [{planted_of[j] for j in t} == set(p) for t, p in zip(top.indices.tolist(), pairs.tolist())], float(cos.min())


@pytest.mark.parametrize("kind", ["diagonal", "lowrank"])
def test_npeff_puts_both_planted_components_of_an_unseen_pair_on_top(kind):
    train, test, parts, pairs, seen = planted_pairs(0, kind)
    if kind == "diagonal":
        dec = DNPEFF(n_components=len(parts), max_iter=2000, tol=1e-8, seed=0).fit(train, progress=False)
    else:
        dec = LRMNPEFF(n_components=len(parts), n_iters_g_only=50, n_iters_joint=1000, seed=0).fit(train, progress=False)
    hits, worst_cosine = _top2_hits(dec, test, parts, pairs)
    unseen = [hit for hit, p in zip(hits, pairs.tolist()) if p not in seen.tolist()]
    assert worst_cosine >= 0.98 and len(unseen) == len(pairs) - len(seen)
    assert sum(hits) / len(hits) >= 0.95 and sum(unseen) / len(unseen) >= 0.95, (sum(hits), len(hits))
