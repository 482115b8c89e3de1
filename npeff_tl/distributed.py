"""torch.distributed in one place: which rank this is, how many there are, and the few collectives the stages
need. Without an initialised process group (or with one rank) every helper is the single-process identity, so
the algorithms have one code path.

Under ``torchrun`` (or with ``--distributed`` on the command line) ``init_from_env`` starts the default group:
NCCL when CUDA is available, gloo otherwise, and ends it when the process exits, all ranks together (a gloo
group left to the interpreter's teardown, or torn down while a peer still runs, can abort the process:
"terminate called without an active exception").
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
from jaxtyping import Int64
from torch import Tensor

logger = logging.getLogger(__name__)


def active() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(x: Tensor) -> Tensor:
    """The sum of ``x`` over ranks (``x`` itself in one process); every rank gets the same bits."""
    if not active():
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather_rows(x: Tensor) -> Tensor:
    """The rows of ``x`` from every rank, concatenated in rank order (ranks may hold different numbers)."""
    if not active():
        return x
    counts = all_reduce_sum(torch.zeros(world_size(), dtype=torch.long, device=x.device).index_fill_(
        0, torch.tensor([rank()], device=x.device), x.shape[0]))
    padded = torch.zeros((int(counts.max()), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(c)] for part, c in zip(parts, counts.tolist())])


def balanced_ranges(weights: Int64[Tensor, " m"], parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``range(len(weights))`` with about equal total weight each (the
    columns of a matrix split by their non-zeros, not by their count)."""
    m = len(weights)
    cumulative = torch.cumsum(weights.double(), 0)
    total = float(cumulative[-1]) if m else 0.0
    bounds = [0]
    for k in range(1, parts):
        cut = int(torch.searchsorted(cumulative, total * k / parts, right=True)) if total > 0 else m * k // parts
        bounds.append(min(max(cut, bounds[-1]), m))
    bounds.append(m)
    return list(zip(bounds[:-1], bounds[1:]))


def leave() -> bool:
    """End the process group (all ranks together, ``_end_together``) so that what follows runs in one process;
    returns whether this process is the one that goes on (rank 0)."""
    if not active():
        return True
    stays = rank() == 0
    _end_together()
    return stays


def _end_together() -> None:
    """Destroy the default group on every rank together: a barrier, then a barrier through the rendezvous store
    (no rank closes its connections while a peer may still be inside the last collective), the group destroyed
    and collected (its threads end here, not in the interpreter's teardown), and a last store barrier (no rank
    ends its process while a peer is still tearing its group down). A rank tearing its gloo group down while a
    peer was still running aborted now and then ("terminate called without an active exception")."""
    store, n = dist.distributed_c10d._get_default_store(), world_size()
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.barrier()
    _store_barrier(store, f"npeff_tl/end/{attempt}/collectives", n)
    dist.destroy_process_group()
    gc.collect()
    _store_barrier(store, f"npeff_tl/end/{attempt}/destroyed", n)


def _store_barrier(store, key: str, n: int, timeout: float = 60.0) -> None:
    """Wait until ``n`` processes have reached ``key`` in ``store`` (or ``timeout`` seconds); a store that went
    away (its host ended first) ends the wait."""
    try:
        store.add(key, 1)
        deadline = time.monotonic() + timeout
        while store.add(key, 0) < n and time.monotonic() < deadline:
            time.sleep(0.01)
    except (RuntimeError, dist.DistError) as error:
        logger.debug("store barrier %s ended early: %s", key, error)


def init_from_env(backend: str | None = None) -> bool:
    """Start the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...);
    returns whether a multi-rank group is running. A no-op when one is already running or WORLD_SIZE is 1."""
    if dist.is_initialized():
        return active()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    atexit.register(_end_at_exit)
    logger.info("rank %d of %d (%s)", rank(), world_size(), backend)
    return active()


def _end_at_exit() -> None:
    """Destroy the default group while the interpreter is still whole (no-op if ``leave`` already did): with the
    other ranks (``_end_together``) when this one ends normally; alone after an uncaught error, since the peers
    may be waiting in another collective."""
    if not dist.is_initialized():
        return
    if getattr(sys, "last_value", None) is None and active():
        _end_together()
    else:
        dist.destroy_process_group()
