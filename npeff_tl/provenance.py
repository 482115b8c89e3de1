"""What an artifact records about how it was made: the versions of the packages that shape it, and fingerprints
of the tensors it came from (a model's weights, a matrix), so that a resumed or reused artifact is checked
against what would make it now."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def versions() -> dict[str, str]:
    """Versions of the packages that shape a result, saved with it."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("npeff-tl", "torch", "transformer-lens"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def tensor_fingerprint(tensors: list[Tensor]) -> str:
    """A sha256 over the bytes of some tensors (e.g. a model's weights), to tell runs apart."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy of the bytes
    return digest.hexdigest()
