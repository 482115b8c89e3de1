"""Buffers reused from batch to batch: on CPU, fresh multi-megabyte allocations are slow (the pages are
faulted in anew each time), and per-batch temporaries are the same size batch after batch."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Workspace:
    """Buffers reused from batch to batch, one per role, grown when a larger one is asked for."""

    def __init__(self):
        self._buffers: dict[tuple, Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = math.prod(shape)
        key = (role, dtype, torch.device(device))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers[key] = buffer = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)
