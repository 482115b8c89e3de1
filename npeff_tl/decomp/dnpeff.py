"""D-NPEFF: non-negative factorisation A ~ W H of the normalised diagonal PEFs (docs/algorithms.md, "D-NPEFF").

The default solver is the reference's: Lee-Seung multiplicative updates, W then H, eps 1e-8. Differences,
all deliberate: the initial factors are scaled to the data (as scikit-learn's NMF does) and drawn from one
seeded generator over the full matrices; the loss ||A - W H||_F^2 is logged (float64) and the fit stops early
when it changes by less than ``tol`` (relative) between logs; rows of H end at unit norm (W rescaled) and can
be thresholded; long fits checkpoint and resume.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass

import torch

from ..pefs import PEFs
from ..pefs.kinds import DIAGONAL
from ..progress import progress_bar
from .checkpoint import Checkpoint, check_ranks_agree, rank_directory
from .decomposition import Decomposition
from .matrix import PEFMatrix, prepare
from .solver import check_settings, loss_settled, multiplicative_w, warn_unconverged

logger = logging.getLogger(__name__)


@dataclass
class DNPEFF:
    """Settings of a D-NPEFF fit; ``DNPEFF(n_components=32).fit(pefs)`` returns a ``Decomposition``.

    Attributes:
        n_components: components to learn (rows of H).
        max_iter: multiplicative-update iterations at most.
        tol: stop when the loss changes by less than this (relative) between two logs; 0 runs max_iter.
        eps: added to the update's denominators (keeps them positive).
        seed: seeds the initial W and H.
        min_nnz_per_column: parameters kept by fewer examples' PEFs than this are dropped before the fit.
        log_every: iterations between loss evaluations (and convergence checks).
        h_threshold: if set, entries of the unit-norm rows of H below it become 0 after the fit.
        device: where the fit runs ("cpu", "cuda").
        dtype: the factors' dtype ("float32" or "float64"); the loss is always summed in float64.
    """

    n_components: int
    max_iter: int = 500
    tol: float = 1e-5
    eps: float = 1e-8
    seed: int = 0
    min_nnz_per_column: int = 1
    log_every: int = 10
    h_threshold: float | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self):
        check_settings(self, at_least_one=("n_components", "max_iter", "min_nnz_per_column", "log_every"),
                       non_negative=("tol",), positive=("eps",))

    def fit(
        self,
        pefs: PEFs,
        *,
        init: tuple[torch.Tensor, torch.Tensor] | None = None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        progress: bool = True,
    ) -> Decomposition:
        """Factor ``pefs`` (diagonal). ``init``: (W0, H0) to start from instead of the seeded draw;
        ``checkpoint``: a directory to save the state to every ``checkpoint_every`` iterations and resume from."""
        if pefs.kind != DIAGONAL.name:
            raise ValueError(f"D-NPEFF factors diagonal PEFs; these are {pefs.kind} (use LRMNPEFF)")
        matrix = prepare(pefs, min_nnz_per_column=self.min_nnz_per_column, device=self.device,
                         dtype=getattr(torch, self.dtype), shard_columns=True)
        n_real = matrix.n_examples - len(matrix.empty_examples)
        if not 1 <= self.n_components <= n_real:
            raise ValueError(f"n_components must lie in [1, {n_real}] (the examples with non-zero PEFs), "
                             f"got {self.n_components}")
        W, H = self._initial_factors(matrix) if init is None else matrix.check_init(init, self.n_components, "H")
        Ht = matrix.local_columns(H).T.contiguous()  # [m, r] (this rank's columns): the layout the sparse products want
        del H
        losses, start, converged = [], 0, False
        saver = None
        if checkpoint is not None:
            trajectory = {k: v for k, v in asdict(self).items() if k not in ("max_iter", "tol", "h_threshold", "device")}
            key = {"settings": trajectory, "data": matrix.fingerprint(), "init": "seeded" if init is None else "custom"}
            saver = Checkpoint(rank_directory(checkpoint), key)
            resumed = saver.load()
            check_ranks_agree(checkpoint, -1 if resumed is None else resumed[1]["iteration"])
            if resumed is not None:
                tensors, state = resumed
                W, Ht = W.copy_(tensors["W"]), Ht.copy_(tensors["H"].T)  # fresh aligned memory: bitwise-equal BLAS
                losses, converged = state["losses"], state["converged"]
                start = self.max_iter if converged else state["iteration"]
                logger.info("resuming D-NPEFF from iteration %d of %s", state["iteration"], checkpoint)
        bar = progress_bar(total=self.max_iter, initial=start, desc="D-NPEFF", enabled=progress)
        for iteration in range(start, self.max_iter):
            W = multiplicative_w(W, matrix.times(Ht), matrix.gram(Ht), 1, self.eps)
            AtW = matrix.t_times(W)  # (W^T A)^T
            WtW = W.T @ W
            Ht = multiplicative_w(Ht, AtW, WtW, 1, self.eps)  # H <- H * W^T A / (W^T W H + eps), transposed
            done = iteration + 1
            if done % self.log_every == 0 or done == self.max_iter:
                loss = matrix.constant - 2 * matrix.inner(AtW, Ht) + float(_dot(WtW, matrix.gram(Ht)))
                losses.append({"phase": "joint", "iteration": done, "loss": loss})
                bar.set_postfix(loss=f"{loss:.4e}")
            bar.update(1)
            converged = len(losses) >= 2 and losses[-1]["iteration"] == done and loss_settled(
                losses[-2]["loss"], losses[-1]["loss"], self.tol, matrix.constant, W.dtype)
            if saver and (done % checkpoint_every == 0 or done == self.max_iter or converged):
                saver.save({"W": W, "H": Ht.T}, iteration=done, losses=losses, converged=converged)
            if converged:
                break
        bar.close()
        if not converged and self.tol > 0:
            warn_unconverged("D-NPEFF", self.max_iter, self.tol, losses)
        return self._decomposition(matrix, W, matrix.all_columns(Ht.T), losses)

    def _initial_factors(self, matrix: PEFMatrix) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform(0, 1) draws, W then H from one generator over the full matrices, scaled so that W H has the
        mean of A (scikit-learn's choice), whatever the device or a later sharding."""
        n, m, r = matrix.n_examples, matrix.n_columns, self.n_components
        mean = matrix.total() / (n * m)
        scale = math.sqrt(max(mean, 1e-30) / r)
        generator = torch.Generator().manual_seed(self.seed)
        to = {"device": matrix.values.device, "dtype": matrix.values.dtype}
        W = (torch.rand(n, r, generator=generator, dtype=torch.float64) * scale).to(**to)
        H = (torch.rand(r, m, generator=generator, dtype=torch.float64) * scale).to(**to)
        return W, H

    def _decomposition(self, matrix: PEFMatrix, W, H, losses) -> Decomposition:
        norms = torch.linalg.vector_norm(H, dim=1).clamp(min=1e-30)
        H, W = H / norms[:, None], W * norms  # unit rows of H; W H unchanged
        if self.h_threshold is not None:
            H = torch.where(H >= self.h_threshold, H, torch.zeros_like(H))
        return Decomposition(
            kind=DIAGONAL.name, W=W, components=H, kept_columns=matrix.kept_columns, space=matrix.space,
            metadata=matrix.fit_metadata,
            settings={**asdict(self), "algorithm": "D-NPEFF", "empty_examples": list(matrix.empty_examples)},
            losses=losses,
        )


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> of two small matrices accumulated in float64 (a 0-d tensor)."""
    return (a.double() * b.double()).sum()

