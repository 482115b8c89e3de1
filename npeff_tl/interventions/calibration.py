"""The magnitude search: the step size whose mean KL on a set of examples hits a target."""

from __future__ import annotations

import math
from collections.abc import Callable


def calibrate_magnitude(
    mean_kl: Callable[[float], float], target: float, start: float, rtol: float = 0.05, max_steps: int = 40,
    limit: float = math.inf,
) -> tuple[float, float, bool]:
    """A magnitude m <= ``limit`` with mean_kl(m) within ``rtol`` of ``target``: steps of x4 from ``start`` until
    the target is bracketed, then geometric bisection (KL is continuous in m, so a bracket holds a solution).
    Returns (m, mean_kl(m), reached); when the target is not reached, the closest magnitude seen."""
    low, high, m = 0.0, math.inf, min(start, limit)
    best = (math.inf, start, math.nan)
    for _ in range(max_steps):
        kl = mean_kl(m)
        miss = abs(kl / target - 1)
        if miss < best[0]:
            best = (miss, m, kl)
        if miss <= rtol:
            return m, kl, True
        if kl < target:
            if m >= limit:
                break
            low = m
        else:
            high = m
        m = min(m * 4, limit) if high == math.inf else (high / 4 if low == 0 else math.sqrt(low * high))
    return best[1], best[2], False
