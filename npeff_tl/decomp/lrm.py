"""LRM-NPEFF: F_i ~ sum_j W_ij g_j g_j^T for low-rank PEFs F_i = U_i U_i^T (docs/algorithms.md, "LRM-NPEFF").

Everything comes from the thin products AG = A G^T and GG = G G^T and the sparse A (rows: one per example
and class, any number of classes per example):
    loss  = sum_i ||F_i||_F^2 - 2 <W, N> + <W^T W, (GG)^2>,   N_ij = sum over example i's rows of AG^2
    W    <- W * N / (W (GG)^2 + eps)                              (multiplicative, keeps W >= 0)
    dL/dG = 4 [(W^T W * GG) G - (W[row] * AG)^T A]
The reference's schedule is kept (a G-only warm-up against the initial W, then W and G steps in turn,
G steps reusing that iteration's AG and GG). Differences, all deliberate: the constant term is exact
(float64), so the loss is the true reconstruction error; G steps are taken on the mean loss over examples
with a step that halves whenever it would raise the loss (and grows 5% after each accepted step), so no
setting depends on the number of examples and the loss never increases; optional orthogonal
regularisation lambda ||GG^T - sI||_F^2 (s = 2/r, the initial scale); expansion learns new components
while given ones stay frozen bit for bit; fits checkpoint and resume. The fitted (non-frozen) components are
returned at unit norm, W_ij scaled by ||g_j||^2 so that W_ij g_j g_j^T is unchanged: the loss leaves the scale
of each g_j free, and without a fixed gauge coefficients of different components (argmax assignments,
training mass) would not compare. D-NPEFF's unit rows of H play the same part.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..pefs import PEFs
from ..pefs.containers import check_compatible
from ..pefs.kinds import LOWRANK
from ..progress import progress_bar
from ..provenance import tensor_fingerprint
from .checkpoint import Checkpoint, check_ranks_agree, rank_directory
from .decomposition import Decomposition
from .matrix import PEFMatrix, prepare
from .solver import check_settings, loss_settled, multiplicative_w, warn_unconverged

logger = logging.getLogger(__name__)


@dataclass
class LRMNPEFF:
    """Settings of an LRM-NPEFF fit; ``LRMNPEFF(n_components=32).fit(pefs)`` returns a ``Decomposition``.

    Attributes:
        n_components: components to learn (rows of G).
        n_iters_g_only: warm-up iterations that update G alone, against the initial W.
        n_iters_joint: iterations that then update W and G in turn.
        lr: the first G step size (halved whenever a step would raise the loss, grown 5% after each accepted one).
        orthogonal_strength: weight of the orthogonality penalty on G (0: none).
        eps: added to the W update's denominator (keeps it positive).
        tol: stop when the loss changes by less than this (relative) between two logs; 0 runs every iteration.
        seed: seeds the initial W and G.
        min_nnz_per_column: parameters kept by fewer example-class rows than this are dropped before the fit.
        log_every: iterations between loss evaluations (and convergence checks).
        device: where the fit runs ("cpu", "cuda").
        dtype: the factors' dtype ("float32" or "float64"); the loss is always summed in float64.
    """

    n_components: int
    n_iters_g_only: int = 100
    n_iters_joint: int = 1000
    lr: float = 1.0
    orthogonal_strength: float = 0.0
    eps: float = 1e-9
    tol: float = 1e-7
    seed: int = 0
    min_nnz_per_column: int = 1
    log_every: int = 10
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self):
        check_settings(self, at_least_one=("n_components", "min_nnz_per_column", "log_every"),
                       non_negative=("n_iters_g_only", "n_iters_joint", "orthogonal_strength", "tol"),
                       positive=("lr", "eps"))

    def fit(
        self,
        pefs: PEFs,
        *,
        frozen: Decomposition | None = None,
        init: tuple[Tensor, Tensor] | None = None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        progress: bool = True,
    ) -> Decomposition:
        """Factor ``pefs`` (low-rank). ``frozen``: an LRM-NPEFF decomposition whose components are kept fixed
        while ``n_components`` new ones are learned (the result lists the new ones first). ``init``: (W0, G0)
        instead of the seeded draw; ``checkpoint``: a directory to save the state to and resume from."""
        if pefs.kind != LOWRANK.name:
            raise ValueError(f"LRM-NPEFF factors low-rank PEFs; these are {pefs.kind} (use DNPEFF)")
        dtype = getattr(torch, self.dtype)
        if frozen is not None:
            if init is not None:
                raise ValueError("give either init= or frozen=, not both (expansion draws the new components itself)")
            check_compatible(pefs, LOWRANK.name, frozen.space, frozen.metadata, "the decomposition was fit on")
            matrix = prepare(pefs, columns=frozen.kept_columns, device=self.device, dtype=dtype, shard_columns=True)
            fixed = frozen.G.to(device=self.device, dtype=dtype)
        else:
            matrix = prepare(pefs, min_nnz_per_column=self.min_nnz_per_column, device=self.device, dtype=dtype,
                             shard_columns=True)
            fixed = torch.zeros(0, matrix.n_columns, device=self.device, dtype=dtype)
        n_real = matrix.n_examples - len(matrix.empty_examples)
        if not 1 <= self.n_components <= n_real:
            raise ValueError(f"n_components must lie in [1, {n_real}] (the examples with non-zero PEFs), "
                             f"got {self.n_components}")
        r = self.n_components + fixed.shape[0]
        W, G = self._initial_factors(matrix, fixed) if init is None else matrix.check_init(init, r, "G")
        fit = LRMFit(self, matrix, W, matrix.local_columns(G), n_free=self.n_components)
        total = self.n_iters_g_only + self.n_iters_joint
        saver = None
        if checkpoint is not None:
            trajectory = {k: v for k, v in asdict(self).items() if k not in ("tol", "device", "log_every")}
            key = {"settings": trajectory, "data": matrix.fingerprint(), "init": "seeded" if init is None else "custom",
                   "frozen": None if frozen is None else tensor_fingerprint([frozen.G])}
            saver = Checkpoint(rank_directory(checkpoint), key)
            resumed = saver.load()
            check_ranks_agree(checkpoint, -1 if resumed is None else resumed[1]["iteration"])
            if resumed is not None:
                tensors, state = resumed
                fit.restore(tensors, state)
                logger.info("resuming LRM-NPEFF from iteration %d of %s", fit.iteration, checkpoint)
        bar = progress_bar(total=total, initial=fit.iteration, desc="LRM-NPEFF", enabled=progress)
        while fit.iteration < total and not fit.converged:
            joint = fit.iteration >= self.n_iters_g_only
            fit.step(update_w=joint)
            if fit.iteration % self.log_every == 0 or fit.iteration == total:
                fit.log("joint" if joint else "G_only")
                bar.set_postfix(loss=f"{fit.losses[-1]['loss']:.4e}", lr=f"{fit.lr:.2g}")
            bar.update(1)
            if saver and (fit.iteration % checkpoint_every == 0 or fit.iteration == total or fit.converged):
                saver.save(fit.tensors(), **fit.state())
        bar.close()
        if not fit.converged and self.tol > 0:
            warn_unconverged("LRM-NPEFF", total, self.tol, fit.losses)
        return fit.decomposition()

    def _initial_factors(self, matrix: PEFMatrix, fixed: Tensor) -> tuple[Tensor, Tensor]:
        """W ~ U(0, 1) then G ~ N(0, 2 / (r m)) from one generator over the full matrices (r counts frozen
        components too); frozen rows of G come last."""
        n, m = matrix.n_examples, matrix.n_columns
        r = self.n_components + fixed.shape[0]
        generator = torch.Generator().manual_seed(self.seed)
        W = torch.rand(n, r, generator=generator, dtype=torch.float64)
        G = torch.randn(self.n_components, m, generator=generator, dtype=torch.float64) * math.sqrt(2 / (r * m))
        to = {"device": matrix.values.device, "dtype": matrix.values.dtype}
        return W.to(**to), torch.cat([G.to(**to), fixed])


class LRMFit:
    """The state of one LRM-NPEFF fit and its steps (components past ``n_free`` are frozen). G is held
    transposed, Gt [m, r] (this rank's columns), the layout the sparse products want."""

    def __init__(self, settings: LRMNPEFF, matrix: PEFMatrix, W: Tensor, G: Tensor, n_free: int):
        self.settings, self.matrix, self.W, self.Gt, self.n_free = settings, matrix, W, G.T.contiguous(), n_free
        self.n = matrix.n_examples
        self.target_scale = 2 / G.shape[0]
        self.lr, self.iteration, self.converged, self.losses = settings.lr, 0, False, []
        self._products()

    # ------------------------------------------------------------------------------ pieces
    def _products(self) -> None:
        self.AG = self.matrix.times(self.Gt)  # [rows, r]
        self.GG = self.matrix.gram(self.Gt)
        self.N = self.matrix.example_sums(self.AG.square())
        self.pseudo_fisher_gram = self.GG.square()  # <g_j g_j^T, g_l g_l^T>_F = (g_j . g_l)^2

    @property
    def loss(self) -> float:
        """The true reconstruction error sum_i ||F_i - F_hat_i||_F^2 (no penalty), float64 accumulation."""
        W = self.W.double()
        cross = float((W * self.N.double()).sum())
        return self.matrix.constant - 2 * cross + float((W.T @ W * self.pseudo_fisher_gram.double()).sum())

    def _objective(self) -> float:
        """What the G steps minimise: the mean loss over examples plus the orthogonal penalty."""
        return self.loss / self.n + self._penalty()

    def _penalty(self) -> float:
        if not self.settings.orthogonal_strength:
            return 0.0
        eye = torch.eye(self.GG.shape[0], dtype=torch.float64, device=self.GG.device)
        return self.settings.orthogonal_strength * float((self.GG.double() - self.target_scale * eye).square().sum())

    def gradient(self) -> Tensor:
        """d(mean loss + penalty)/dG^T [m, r] with the current W, AG and GG."""
        WAG = self.W[self.matrix.row_example] * self.AG
        grad = self.Gt @ (self.W.T @ self.W * self.GG) - self.matrix.t_times(WAG)
        grad = grad * (4 / self.n)
        if self.settings.orthogonal_strength:
            eye = torch.eye(self.GG.shape[0], dtype=self.GG.dtype, device=self.GG.device)
            grad = grad + 4 * self.settings.orthogonal_strength * self.Gt @ (self.GG - self.target_scale * eye)
        return grad

    # ------------------------------------------------------------------------------ steps
    def step(self, update_w: bool) -> None:
        if update_w:
            self.W = multiplicative_w(self.W, self.N, self.pseudo_fisher_gram, 1, self.settings.eps)
        before = self._objective()
        saved = (self.Gt, self.AG, self.GG, self.N, self.pseudo_fisher_gram)
        grad = self.gradient()
        Gt = self.Gt.clone()
        Gt[:, : self.n_free] -= self.lr * grad[:, : self.n_free]
        self.Gt = Gt
        self._products()
        after = self._objective()
        if after > before:  # reject: keep G, halve the step
            self.Gt, self.AG, self.GG, self.N, self.pseudo_fisher_gram = saved
            self.lr /= 2
        else:
            self.lr *= 1.05
        self.iteration += 1

    def log(self, phase: str) -> None:
        self.losses.append({"phase": phase, "iteration": self.iteration, "loss": self.loss})
        in_joint = phase == "joint"
        if in_joint and len(self.losses) >= 2 and self.losses[-2]["phase"] == "joint":
            previous, current = self.losses[-2]["loss"], self.losses[-1]["loss"]
            self.converged = loss_settled(previous, current, self.settings.tol, self.matrix.constant, self.W.dtype)

    # ------------------------------------------------------------------------------ checkpoints
    def tensors(self) -> dict[str, Tensor]:
        return {"W": self.W, "G": self.Gt.T}

    def state(self) -> dict:
        return {"iteration": self.iteration, "lr": self.lr, "converged": self.converged, "losses": self.losses}

    def restore(self, tensors: dict[str, Tensor], state: dict) -> None:
        self.W = torch.empty_like(self.W).copy_(tensors["W"])  # fresh aligned memory: bitwise-equal BLAS results
        self.Gt = torch.empty_like(self.Gt).copy_(tensors["G"].T)
        self.iteration, self.lr = state["iteration"], state["lr"]
        self.converged, self.losses = state["converged"], state["losses"]
        self._products()

    def decomposition(self) -> Decomposition:
        m, free = self.matrix, self.n_free
        G, W = m.all_columns(self.Gt.T), self.W
        norms = torch.linalg.vector_norm(G[:free], dim=1).clamp(min=1e-30)  # new components first, frozen after
        G = torch.cat([G[:free] / norms[:, None], G[free:]])
        W = torch.cat([W[:, :free] * norms.square(), W[:, free:]], dim=1)
        return Decomposition(
            kind=LOWRANK.name, W=W, components=G, kept_columns=m.kept_columns, space=m.space,
            metadata=m.fit_metadata,
            settings={**asdict(self.settings), "algorithm": "LRM-NPEFF", "n_frozen": self.Gt.shape[1] - self.n_free,
                      "final_lr": self.lr, "empty_examples": list(m.empty_examples)},
            losses=self.losses,
        )
