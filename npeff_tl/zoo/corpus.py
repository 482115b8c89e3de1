"""The field corpus: the source code of Python's standard library, which every Python installation carries.

Files are the ``.py`` files under the running interpreter's stdlib directory, outside test directories and
``site-packages`` (PSF licence). Each file falls in the training or held-out part by a hash of its relative
path, so the split does not depend on which other files exist; held-out files are never seen in training.
The list of files and its hash go into a model's card, because another Python version has other files.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRECTORIES = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
HELDOUT_PER_MILLE = 100  # a file is held out when its path hash falls in the first 100 of 1000 buckets


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """"train" or "heldout", fixed by a hash of the file's path relative to the stdlib root."""
    bucket = int(hashlib.sha256(relative_path.encode()).hexdigest()[:8], 16) % 1000
    return "heldout" if bucket < HELDOUT_PER_MILLE else "train"


@dataclass(frozen=True)
class Corpus:
    """The stdlib ``.py`` files (relative POSIX paths, sorted) of one split, read as UTF-8 text."""

    root: Path
    split: str
    paths: tuple[str, ...]

    @classmethod
    def from_stdlib(cls, split: str, root: Path | None = None) -> Corpus:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        root = stdlib_root() if root is None else Path(root)
        paths = sorted(
            p.relative_to(root).as_posix() for p in root.rglob("*.py")
            if p.is_file() and not EXCLUDED_DIRECTORIES & set(p.relative_to(root).parts[:-1])
        )
        if not paths:
            raise FileNotFoundError(f"no .py files under {root}; is it a Python standard library directory?")
        return cls(root, split, tuple(p for p in paths if split_of(p) == split))

    def texts(self) -> list[str]:
        """The files' texts in ``paths`` order (undecodable bytes replaced, so every file is kept)."""
        return [(self.root / p).read_text(encoding="utf-8", errors="replace") for p in self.paths]

    def fingerprint(self) -> str:
        """sha256 of the file list and the files' bytes: equal fingerprints mean the same corpus."""
        digest = hashlib.sha256()
        for p in self.paths:
            digest.update(p.encode() + b"\0" + hashlib.sha256((self.root / p).read_bytes()).digest())
        return digest.hexdigest()

    def describe(self) -> dict:
        """What a card records about the corpus."""
        return {"source": "Python standard library (.py files outside test directories and site-packages)",
                "licence": "PSF-2.0", "python": sys.version.split()[0], "split": self.split,
                "files": len(self.paths), "bytes": sum((self.root / p).stat().st_size for p in self.paths),
                "sha256": self.fingerprint()}
