"""Atomic safetensors + JSON files, and a directory of fixed example-range shards that long runs resume from.

A store covers examples [0, n) in shards [j * shard_size, (j + 1) * shard_size). A shard is written once,
atomically, when finished; a re-run skips finished shards. Because shard boundaries do not depend on the batch
size (or, later, on the number of processes), neither does the stored result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

FORMAT_VERSION = 1


class FormatError(ValueError):
    """A file or directory that is not a valid npeff_tl result (corrupt, foreign or incomplete)."""


class LockedError(RuntimeError):
    """Another process is writing to the directory."""


class DirectoryLock:
    """One writer at a time for a directory: an advisory ``flock`` on DIR/.lock, which records the holder's pid.

    The operating system drops the lock when its process ends, so the lock of a killed run is taken over by the
    next one without any clean-up. Where ``fcntl`` is missing (Windows) nothing is locked.
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        if fcntl is None or self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LockedError(f"another run is writing to {self.path.parent} (pid {holder}); wait for it to "
                                  "finish, or use another directory") from None
            try:  # the file we locked may have been released and removed meanwhile: then lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before the unlock, so no one locks a file about to vanish
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _file_mode() -> int:
    """The permissions a plain ``open(path, "w")`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~_umask()


def _atomic_target(path: Path):
    """A temporary file beside ``path``, with the permissions a plain ``open(path, "w")`` would give."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, _file_mode())  # mkstemp makes files private (0600)
    os.close(fd)
    return Path(tmp)


def _checksum(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()


def save_tensors(tensors: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Write a safetensors file atomically (a temporary name, then a rename), with a checksum of its tensors in
    the file's header that ``load_tensors`` verifies."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata={"npeff_tl.sha256": _checksum(tensors)})
        os.chmod(tmp, _file_mode())  # safetensors writes a new, private file in place of ours
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a safetensors file, verifying the checksum ``save_tensors`` wrote (files without one load as they are)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"missing file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get("npeff_tl.sha256")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise FormatError(f"{path} is not a readable safetensors file ({error}); it may be corrupt or truncated") from None
    if expected is not None and _checksum(tensors) != expected:
        raise FormatError(f"{path} is corrupt: its contents no longer match the checksum written with it; delete it and "
                          "re-run what wrote it (compute_pefs with the same store, or the same npeff-tl stage) to "
                          "recompute it")
    return tensors


def save_text(text: str, path: str | os.PathLike) -> None:
    """Write a UTF-8 text file atomically (a temporary name, then a rename)."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_json(data: Any, path: str | os.PathLike) -> None:
    """Write a JSON file atomically."""
    save_text(json.dumps(data, indent=2, sort_keys=True), path)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Fill a temporary directory beside ``path``; on success it replaces ``path`` (nothing half-written is
    ever left at ``path``), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes directories private (0700); give the usual permissions
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FormatError(f"{path} is not valid JSON ({error}); it may be corrupt") from None


def json_normal(data: Any) -> Any:
    return json.loads(json.dumps(data, sort_keys=True))


def read_metadata(directory: str | os.PathLike, fmt: str) -> dict[str, Any]:
    """The metadata.json of a result directory, after checking it is of format ``fmt``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FormatError(f"{directory} is not a directory of saved npeff_tl results")
    if not (directory / "metadata.json").is_file():
        raise FormatError(f"{directory} is not a saved npeff_tl result ({fmt}): it has no metadata.json. A saved result "
                          "is a directory of metadata.json and .safetensors files, as .save(path) or "
                          "compute_pefs(..., store=path) write it")
    meta = load_json(directory / "metadata.json")
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise FormatError(f"{directory} holds {found!r}, not {fmt!r} results")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise FormatError(f"{directory} was written by a newer npeff_tl (format {meta['format_version']}); upgrade")
    return meta


class ShardStore:
    """A directory of shards over a fixed example range, created or resumed.

    ``config`` is everything that defines the result; resuming with a different config is an error rather
    than a silent mix of two runs.
    """

    def __init__(self, path: str | os.PathLike, fmt: str, config: Mapping[str, Any], n_examples: int, shard_size: int,
                 *, lock: bool = True):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.path = Path(path)
        self.lock = DirectoryLock(self.path)
        if lock:  # one writer; held until close()
            self.lock.acquire()
        try:
            self._open(fmt, config, n_examples, shard_size)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, fmt: str, config: Mapping[str, Any], n_examples: int, shard_size: int) -> None:
        self.n_examples, self.shard_size = n_examples, shard_size
        config = json_normal(dict(config))
        layout = {"n_examples": n_examples, "shard_size": shard_size}
        if (self.path / "metadata.json").exists():
            meta = read_metadata(self.path, fmt)
            old = {**meta.get("config", {}), **{k: meta.get(k) for k in layout}}
            new = {**config, **layout}
            differs = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            if differs:
                raise ValueError(
                    f"{self.path} holds a different run (it differs in: {', '.join(differs)}); "
                    "use a new directory, or delete this one to start over"
                )
            self.meta = meta
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self.meta = {"format": fmt, "format_version": FORMAT_VERSION, "complete": False, "config": config, **layout}
            save_json(self.meta, self.path / "metadata.json")

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.shard_size, self.n_examples)) for s in range(0, self.n_examples, self.shard_size)]

    def shard_path(self, j: int, prefix: str = "shard") -> Path:
        return self.path / f"{prefix}_{j:05d}.safetensors"

    def is_done(self, j: int) -> bool:
        return self.shard_path(j).is_file()

    def write(self, j: int, tensors: Mapping[str, Tensor], prefix: str = "shard") -> None:
        save_tensors(tensors, self.shard_path(j, prefix))

    def read(self, j: int, prefix: str = "shard") -> dict[str, Tensor]:
        return load_tensors(self.shard_path(j, prefix))

    def mark_complete(self, **extra: Any) -> None:
        self.meta = {**self.meta, **json_normal(extra), "complete": True}
        save_json(self.meta, self.path / "metadata.json")

    def reopen(self) -> None:
        """Mark a finished store unfinished again (some of its files must be recomputed)."""
        self.meta = {**self.meta, "complete": False}
        save_json(self.meta, self.path / "metadata.json")

    def close(self) -> None:
        self.lock.release()
