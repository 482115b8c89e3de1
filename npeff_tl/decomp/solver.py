"""What the NPEFF solvers share: the check of their settings, the multiplicative coefficient update and its
numerators (the D-NPEFF and LRM-NPEFF fits and coefficient fitting all use it), and the warning for a fit that
stops at its iteration cap."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .matrix import PEFMatrix


def check_settings(settings, *, at_least_one: tuple[str, ...], non_negative: tuple[str, ...],
                   positive: tuple[str, ...]) -> None:
    """A one-line error for the first solver setting out of its range, when the settings are made."""
    for names, test, bound in ((at_least_one, lambda v: v >= 1, ">= 1"), (non_negative, lambda v: v >= 0, ">= 0"),
                               (positive, lambda v: v > 0, "> 0")):
        for name in names:
            if not test(getattr(settings, name)):
                raise ValueError(f"{name} must be {bound}, got {getattr(settings, name)!r}")
    if settings.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be \"float32\" or \"float64\", got {settings.dtype!r}")


class ConvergenceWarning(UserWarning):
    """A fit stopped at its iteration cap before the loss settled to within ``tol`` (as scikit-learn's)."""


def loss_settled(previous: float, current: float, tol: float, constant: float, dtype: torch.dtype) -> bool:
    """Whether the loss changed by at most ``tol`` (relative) between two logs, or both logs are within the
    rounding of a loss expanded as ``constant`` - 2 <A, W H> + ||W H||^2 (``constant`` = ||A||^2 times the
    factors' machine epsilon): an exact fit, whose relative changes are rounding noise that never settles."""
    floor = torch.finfo(dtype).eps * constant
    return abs(previous - current) <= tol * max(abs(previous), 1e-30) or max(abs(previous), abs(current)) <= floor


def warn_unconverged(algorithm: str, iterations: int, tol: float, losses: list[dict]) -> None:
    """Warn that ``algorithm`` used all ``iterations`` without meeting ``tol``, with the last relative change."""
    change = ""
    if len(losses) >= 2 and losses[-2]["loss"]:
        change = f" (last relative change {abs(losses[-2]['loss'] - losses[-1]['loss']) / abs(losses[-2]['loss']):.1e})"
    warnings.warn(f"{algorithm} stopped at its cap of {iterations} iterations before the loss changed by less than "
                  f"tol={tol:g}{change}; raise the iteration cap, or accept the fit as it is", ConvergenceWarning,
                  stacklevel=3)


def numerators(matrix: PEFMatrix, components: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) for the coefficient update W <- W * N / (W K + eps): D: N = A H^T, K = H H^T;
    LRM: N_ij = g_j^T F_i g_j = sum over the rows of example i of (A G^T)^2, K = (G G^T)^2."""
    product = matrix.times(components.T.contiguous())  # [rows, r]
    gram = components @ components.T
    if matrix.kind == "diagonal":
        return product, gram
    return matrix.example_sums(product.square()), gram.square()


def multiplicative_w(W: Tensor, numerator: Tensor, gram: Tensor, n_iter: int, eps: float) -> Tensor:
    """``n_iter`` Lee-Seung steps W <- W * N / (W K + eps) with N and K fixed (also the H step of D-NPEFF,
    in its transposed layout)."""
    for _ in range(n_iter):  # the same operations as W * N / (W @ K + eps), with two temporaries instead of four
        denominator = W @ gram
        denominator += eps
        W = W * numerator
        W /= denominator
    return W
