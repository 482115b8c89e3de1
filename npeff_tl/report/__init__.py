"""``report.html``: one self-contained page (inline CSS, JS and SVG; opens from disk with no network) showing a
run directory's results: the comparison table, selectivity plots with the random controls, component x strategy
heatmaps, coefficient distributions and, per NPEFF component, its top held-out examples (target token
highlighted), its readout in TL layouts (tensors, heads, neurons) and its selectivity.

The page is built from the run directory's artifacts alone (see ``npeff_tl.pipeline``); sections whose
artifacts are missing are left out.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..layout import RunLayout
from ..store import save_text
from .page import _Report

__all__ = ["write_report"]


def write_report(out: str | os.PathLike) -> Path:
    """Write ``out/report.html`` from the run directory ``out``; returns its path."""
    out = Path(out)
    layout = RunLayout(out)
    if not layout.config.exists():
        raise FileNotFoundError(f"{out} is not a run directory (no config.json); run `npeff-tl pefs --out {out}` "
                                f"or `npeff-tl demo --out {out}` first")
    save_text(_Report(out).render(), layout.report)
    return layout.report
