"""Checkpoints of long fits: the factors and the loss history every few iterations, so a fit that was
stopped resumes where it was and ends exactly where an uninterrupted fit would have."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import distributed
from ..store import json_normal, atomic_directory, load_json, load_tensors, save_json, save_tensors

CHECKPOINT_FORMAT = "npeff_tl.fit_checkpoint"


class Checkpoint:
    """``path``/latest/{state.safetensors, state.json}, replaced as a whole; ``key`` (settings and a data
    fingerprint) must match to resume."""

    def __init__(self, path: str | os.PathLike, key: dict[str, Any]):
        self.path, self.key = Path(path), json_normal(key)

    def load(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """(tensors, state) of the last checkpoint, or None when there is none yet."""
        latest = self.path / "latest"
        if not (latest / "state.json").exists():
            return None
        state = load_json(latest / "state.json")
        if state.get("format") != CHECKPOINT_FORMAT or state.get("key") != self.key:
            raise ValueError(
                f"{self.path} holds a checkpoint of a different fit (other settings or data); "
                "use a new checkpoint directory, or delete this one to start over"
            )
        return load_tensors(latest / "state.safetensors"), state

    def save(self, tensors: dict[str, Tensor], **state: Any) -> None:
        with atomic_directory(self.path / "latest") as tmp:
            save_tensors(tensors, tmp / "state.safetensors")
            save_json({"format": CHECKPOINT_FORMAT, "key": self.key, **state}, tmp / "state.json")


def rank_directory(path: str | os.PathLike) -> Path:
    """Where this rank checkpoints: ``path`` in one process, ``path``/rank{r}of{world} under torch.distributed
    (each rank holds its own columns of the factors)."""
    if not distributed.active():
        return Path(path)
    return Path(path) / f"rank{distributed.rank()}of{distributed.world_size()}"


def check_ranks_agree(path: str | os.PathLike, iteration: int) -> None:
    """Every rank must resume from the same iteration (a rank that died between two ranks' saves did not)."""
    if not distributed.active():
        return
    seen = distributed.all_gather_rows(torch.tensor([[iteration]]))
    if int(seen.min()) != int(seen.max()):
        raise ValueError(f"the ranks' checkpoints in {path} are at different iterations ({seen.flatten().tolist()}); "
                         "delete the directory to start the fit over")
