"""Planted truth: synthetic PEFs built from known components, so a decomposition's answer can be checked."""

from contextlib import contextmanager

import pytest
import torch


def planted_supports(g, r, m, size, shared):
    """r supports of ``size`` columns out of m; every support contains the same ``shared`` columns, so any
    two overlap by at least shared / size."""
    perm = torch.randperm(m, generator=g)
    common, rest = perm[:shared], perm[shared:]
    unique = size - shared
    assert shared + r * unique <= m
    return [torch.cat([common, rest[j * unique : (j + 1) * unique]]) for j in range(r)]


def planted_coefficients(g, n, r, max_active=3):
    """[n, r] non-negative, 1 to ``max_active`` active components per example, every component used."""
    W = torch.zeros(n, r, dtype=torch.float64)
    for i in range(n):
        k = int(torch.randint(1, max_active + 1, (1,), generator=g))
        active = torch.randperm(r, generator=g)[:k]
        active[0] = i % r
        W[i, active] = 0.5 + 1.5 * torch.rand(len(active), generator=g, dtype=torch.float64)
    return W


def planted_diagonal(seed, r=10, n=500, m=600, size=60, shared=14, noise=0.0):
    """(dense non-negative rows A = W H + noise, W, H): H rows are sparse non-negative diagonals whose supports
    overlap pairwise by >= 20%; noise has Frobenius norm ``noise`` x the signal's, half on the signal's
    support and half on random entries off it."""
    g = torch.Generator().manual_seed(seed)
    H = torch.zeros(r, m, dtype=torch.float64)
    for j, support in enumerate(planted_supports(g, r, m, size, shared)):
        H[j, support] = 0.5 + torch.rand(size, generator=g, dtype=torch.float64)
    W = planted_coefficients(g, n, r)
    A = W @ H
    if noise:
        on = A > 0
        off_mask = (~on) & (torch.rand(A.shape, generator=g) < on.double().mean())
        E_on = torch.rand(A.shape, generator=g, dtype=torch.float64) * on
        E_off = torch.rand(A.shape, generator=g, dtype=torch.float64) * off_mask
        target = noise * torch.linalg.norm(A) / 2 ** 0.5  # half of the noise energy on each part
        A = A + E_on * (target / torch.linalg.norm(E_on)) + E_off * (target / torch.linalg.norm(E_off))
    return A, W, H


def planted_lowrank(seed, r=10, n=400, m=600, size=60, shared=14, noise=0.0):
    """(list of factors U_i [k_i, m], W, G): F_i = U_i U_i^T = sum_j W_ij g_j g_j^T with 1 to 3 active
    components per example (so ranks differ), G rows Gaussian on supports overlapping pairwise by >= 20%;
    noise is added to the factors with Frobenius norm ``noise`` x theirs, half on the signal's support and
    half on random entries off it."""
    g = torch.Generator().manual_seed(seed)
    G = torch.zeros(r, m, dtype=torch.float64)
    for j, support in enumerate(planted_supports(g, r, m, size, shared)):
        G[j, support] = torch.randn(size, generator=g, dtype=torch.float64)
    W = planted_coefficients(g, n, r)
    factors = []
    for i in range(n):
        active = W[i].nonzero().flatten()
        U = W[i, active, None].sqrt() * G[active]
        if noise:
            on = U != 0
            off = (~on) & (torch.rand(U.shape, generator=g) < on.double().mean())
            E_on = torch.randn(U.shape, generator=g, dtype=torch.float64) * on
            E_off = torch.randn(U.shape, generator=g, dtype=torch.float64) * off
            target = noise * torch.linalg.norm(U) / 2 ** 0.5
            U = U + E_on * (target / torch.linalg.norm(E_on)) + E_off * (target / torch.linalg.norm(E_off))
        factors.append(U)
    return factors, W, G


@contextmanager
def killed_after_checkpoint(iteration):
    """Inside the block, a fit dies (RuntimeError "killed") right after saving its checkpoint of ``iteration``,
    as a process killed at that point would."""
    from npeff_tl.decomp.checkpoint import Checkpoint

    save = Checkpoint.save

    def save_then_die(self, tensors, **state):
        save(self, tensors, **state)
        if state["iteration"] == iteration:
            raise RuntimeError("killed")

    Checkpoint.save = save_then_die
    try:
        with pytest.raises(RuntimeError, match="killed"):
            yield
    finally:
        Checkpoint.save = save


def planted_pairs(seed, kind, r=8, n_train=320, m=480, size=48, shared=10, train_pairs=4, pair_share=0.05):
    """A compositional split on planted PEFs: training examples use one component each, except ``pair_share`` of
    them, which use one of ``train_pairs`` pairs; every held-out example uses two components, once per pair (all
    r (r - 1) / 2 pairs, most never seen in training). ``kind``: "diagonal" (rows W H of non-negative diagonals)
    or "lowrank" (factors sqrt(W_ij) g_j, one row per active component). Returns (train PEFs, held-out PEFs, the
    planted components [r, m], the held-out pairs [p, 2], the pairs seen in training)."""
    from itertools import combinations

    from npeff_tl import DiagonalPEFs, LowRankPEFs

    g = torch.Generator().manual_seed(seed)
    parts = torch.zeros(r, m, dtype=torch.float64)
    for j, support in enumerate(planted_supports(g, r, m, size, shared)):
        parts[j, support] = (0.5 + torch.rand(size, generator=g, dtype=torch.float64) if kind == "diagonal"
                             else torch.randn(size, generator=g, dtype=torch.float64))
    pairs = torch.tensor(list(combinations(range(r), 2)))
    seen = pairs[torch.randperm(len(pairs), generator=g)[:train_pairs]]
    n_pairs = round(pair_share * n_train)
    train_active = [[i % r] for i in range(n_train - n_pairs)] + [seen[i % train_pairs].tolist() for i in range(n_pairs)]

    def pefs(active_lists):
        weights = [0.5 + 1.5 * torch.rand(len(a), generator=g, dtype=torch.float64) for a in active_lists]
        if kind == "diagonal":
            return DiagonalPEFs.from_dense(torch.stack([w @ parts[a] for a, w in zip(active_lists, weights)]).float())
        return LowRankPEFs.from_dense([(w.sqrt()[:, None] * parts[a]).float() for a, w in zip(active_lists, weights)])

    return pefs(train_active), pefs(pairs.tolist()), parts, pairs, seen


def pair_top2(dec, test, parts, pairs):
    """How a fit explains planted pairs: (per held-out pair, whether its two largest coefficients are its two
    planted components, fitted components matched to planted ones by cosine; the worst matched cosine; the
    smallest of the top-2 coefficients)."""
    from npeff_tl import matched_cosines

    full = torch.zeros(dec.n_components, parts.shape[1], dtype=torch.float64)
    full[:, dec.kept_columns] = dec.components.double()
    rows, cols, cos = matched_cosines(parts, full)
    planted_of = dict(zip(cols.tolist(), rows.tolist()))  # fitted component -> planted one
    top = dec.fit_coefficients(test, n_iter=1000, progress=False).topk(2, dim=1)
    hits = [{planted_of[j] for j in t} == set(p) for t, p in zip(top.indices.tolist(), pairs.tolist())]
    return hits, float(cos.min()), float(top.values.min())
