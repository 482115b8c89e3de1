"""One progress bar for the library: ``tqdm.auto``, silenced by ``progress=False`` and on every rank but 0 (so a
``torchrun`` job draws one bar, not one per process)."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm.auto import tqdm

from npeff_tl import distributed


def progress_bar(iterable: Iterable | None = None, *, desc: str, enabled: bool = True, **kwargs) -> tqdm:
    """``tqdm(iterable, desc=desc, **kwargs)``, drawn only when ``enabled`` and on rank 0."""
    return tqdm(iterable, desc=desc, disable=not enabled or distributed.rank() > 0, **kwargs)
