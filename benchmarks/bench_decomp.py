"""Decomposition speed: D-NPEFF against scikit-learn's NMF, LRM-NPEFF against a dense implementation.

Run:  .venv/bin/python benchmarks/bench_decomp.py [--threads N] [--quick]

D-NPEFF: a sparse float32 matrix of normalised synthetic D-PEFs (2,000 examples x 16,384 nnz over 262,144
parameters; rows mix 1-3 of 64 planted sparse diagonals plus noise), rank 32, one shared random start.
scikit-learn ``NMF(solver="mu", init="custom", tol=0, max_iter=200)`` gives time T_sk and loss L_sk; ours
is timed for the number of iterations it needs to reach a loss <= L_sk from the same start (found by a first,
untimed run that logs every iteration). scikit-learn's ``solver="cd"`` is timed to the same loss (report
only; it is restarted with doubling max_iter, and the first run that reaches L_sk counts).
LRM-NPEFF: time per joint iteration against a plain dense implementation of the same updates (W by
multiplicative update, one gradient step on G) on the same data, densified: 600 examples x 3 classes with
16,384 nnz per example over 262,144 parameters, the D-NPEFF data's shape (2.1% dense).
Torch and scikit-learn (via threadpoolctl) use the same number of threads.

Last line: bench_decomp: dnpeff_speedup_vs_sklearn=<x> dnpeff_speedup_vs_sklearn_cd=<c> lrm_speedup_vs_dense=<y>
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch

import npeff_tl as nt
from npeff_tl.decomp import prepare
from npeff_tl.decomp.lrm import LRMFit


def synthetic_diagonal(n: int, size: int, nnz: int, n_latent: int = 64, support: int = 20_000, seed: int = 0):
    """Normalised-to-be D-PEFs: each row mixes 1-3 planted sparse non-negative diagonals, plus noise."""
    g = torch.Generator().manual_seed(seed)
    supports = [torch.randperm(size, generator=g)[:support] for _ in range(n_latent)]
    heights = [torch.rand(support, generator=g).square() for _ in range(n_latent)]
    values, indices, norms = [], [], []
    for _ in range(n):
        row = torch.rand(size, generator=g) * 1e-3  # noise everywhere
        for j in torch.randint(n_latent, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist():
            row[supports[j]] += float(torch.rand(1, generator=g)) * heights[j]
        top = row.topk(nnz)
        values.append(top.values)
        indices.append(top.indices)
        norms.append(row.double().norm())
    return nt.DiagonalPEFs(values=torch.stack(values), indices=torch.stack(indices).int(), norms=torch.stack(norms),
                           space=nt.ParamSpace.from_shapes({"theta": (size,)}))


def frobenius_loss(X, W, H) -> float:
    """||X - W H||_F^2 for a scipy CSR X, from the identity ||X||^2 - 2 <X H^T, W> + <W^T W, H H^T>."""
    import numpy as np

    W, H = W.astype(np.float64), H.astype(np.float64)
    XHt = X @ H.T
    return float(X.multiply(X).sum() - 2 * (XHt * W).sum() + ((W.T @ W) * (H @ H.T)).sum())


def bench_dnpeff(pefs, rank: int, max_iter: int, seed: int = 0):
    from sklearn.decomposition import NMF
    import scipy.sparse as sp

    matrix = prepare(pefs)
    At = matrix.At
    X = sp.csr_matrix((At.values().numpy(), At.col_indices().numpy(), At.crow_indices().numpy()),
                      shape=(matrix.n_columns, matrix.n_rows)).T.tocsr()
    print(f"D-NPEFF data: {X.shape[0]} examples x {X.shape[1]:,} kept columns, {X.nnz:,} non-zeros, rank {rank}")
    g = torch.Generator().manual_seed(seed)
    scale = math.sqrt(float(X.sum()) / (X.shape[0] * X.shape[1]) / rank)
    W0 = (torch.rand(X.shape[0], rank, generator=g) * scale).numpy()
    H0 = (torch.rand(rank, X.shape[1], generator=g) * scale).numpy()

    start = time.perf_counter()
    model = NMF(rank, solver="mu", init="custom", tol=0, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Maximum number of iterations reached"
        W_sk = model.fit_transform(X, W=W0.copy(), H=H0.copy())
    t_sk = time.perf_counter() - start
    loss_sk = frobenius_loss(X, W_sk, model.components_)
    print(f"sklearn mu: {max_iter} iterations in {t_sk:.1f} s, loss {loss_sk:.6e}")

    init = (torch.from_numpy(W0), torch.from_numpy(H0))
    probe = nt.DNPEFF(rank, max_iter=4 * max_iter, tol=0.0, log_every=1).fit(pefs, init=init, progress=False)
    reached = [e["iteration"] for e in probe.losses if e["loss"] <= loss_sk]
    if not reached:
        raise RuntimeError(f"ours did not reach sklearn's loss in {4 * max_iter} iterations")
    iterations = reached[0]
    start = time.perf_counter()
    ours = nt.DNPEFF(rank, max_iter=iterations, tol=0.0, log_every=iterations).fit(pefs, init=init, progress=False)
    t_ours = time.perf_counter() - start
    print(f"ours (D-NPEFF mu): {iterations} iterations in {t_ours:.1f} s, loss {ours.losses[-1]['loss']:.6e}")

    t_cd, budget = None, 1
    while t_cd is None and budget <= 256:
        start = time.perf_counter()
        cd = NMF(rank, solver="cd", init="custom", tol=0, max_iter=budget)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            W_cd = cd.fit_transform(X, W=W0.copy(), H=H0.copy())
        elapsed = time.perf_counter() - start
        if frobenius_loss(X, W_cd, cd.components_) <= loss_sk:
            t_cd = elapsed
            print(f"sklearn cd: {budget} iterations in {t_cd:.1f} s reach sklearn mu's loss")
        budget *= 2
    if t_cd is None:
        print("sklearn cd: did not reach sklearn mu's loss in 256 iterations")
    return t_sk / t_ours, (t_cd / t_ours if t_cd is not None else float("nan"))


def dense_lrm_step(A, row_example, W, Gt, lr, eps=1e-9):
    """The same joint iteration as LRM-NPEFF, with a dense A [rows, m]: W multiplicative step, then one
    gradient step on G (mean loss)."""
    AG = A @ Gt
    GG = Gt.T @ Gt
    N = torch.zeros_like(W).index_add_(0, row_example, AG.square())
    W = W * N / (W @ GG.square() + eps)
    WAG = W[row_example] * AG
    grad = (Gt @ (W.T @ W * GG) - A.T @ WAG) * (4 / W.shape[0])
    return W, Gt - lr * grad


def bench_lrm(n: int, size: int, nnz: int, rank: int, repeats: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(48, size, generator=g) * (torch.rand(48, size, generator=g) < 0.2)
    factors = []
    for _ in range(n):
        mix = torch.rand(3, 48, generator=g) * (torch.rand(3, 48, generator=g) < 0.05)
        factors.append(mix @ latent + 0.01 * torch.randn(3, size, generator=g))
    pefs = nt.LowRankPEFs.from_dense(factors, nnz=nnz)
    matrix = prepare(pefs)
    A = matrix.to_dense().contiguous()
    print(f"LRM-NPEFF data: {n} examples x 3 classes, {matrix.n_columns:,} kept columns, {matrix.values.numel():,} "
          f"non-zeros ({matrix.values.numel() / A.numel():.1%} dense), rank {rank}")
    W = torch.rand(n, rank, generator=g)
    G = torch.randn(rank, matrix.n_columns, generator=g) * math.sqrt(2 / (rank * matrix.n_columns))
    fit = LRMFit(nt.LRMNPEFF(rank), matrix, W.clone(), G.clone(), n_free=rank)
    fit.step(update_w=True)  # warm-up
    ours = []
    for _ in range(repeats):
        start = time.perf_counter()
        fit.step(update_w=True)
        ours.append(time.perf_counter() - start)
    Wd, Gtd = W.clone(), G.T.contiguous()
    Wd, Gtd = dense_lrm_step(A, matrix.row_example, Wd, Gtd, 1.0)  # warm-up
    dense = []
    for _ in range(repeats):
        start = time.perf_counter()
        Wd, Gtd = dense_lrm_step(A, matrix.row_example, Wd, Gtd, 1.0)
        dense.append(time.perf_counter() - start)
    t_ours, t_dense = statistics.median(ours), statistics.median(dense)
    print(f"LRM-NPEFF per joint iteration: ours {t_ours * 1e3:.1f} ms, dense {t_dense * 1e3:.1f} ms (medians of {repeats})")
    return t_dense / t_ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for torch and sklearn")
    parser.add_argument("--quick", action="store_true", help="a smaller problem (smoke test; figures not comparable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=args.threads):
        print(f"bench_decomp: torch {torch.__version__}, {args.threads} threads")
        if args.quick:
            pefs = synthetic_diagonal(400, 32_768, 2048, support=4000)
            x, c = bench_dnpeff(pefs, 16, 50)
            y = bench_lrm(200, 8192, 4096, 16, 5)
        else:
            pefs = synthetic_diagonal(2000, 262_144, 16_384)
            x, c = bench_dnpeff(pefs, 32, 200)
            y = bench_lrm(600, 262_144, 16_384, 32, 5)
    print(f"bench_decomp: dnpeff_speedup_vs_sklearn={x:.2f} dnpeff_speedup_vs_sklearn_cd={c:.2f} "
          f"lrm_speedup_vs_dense={y:.2f}")


if __name__ == "__main__":
    main()
