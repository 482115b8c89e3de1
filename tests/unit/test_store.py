"""Run folders and stores: one writer at a time, a dead writer's lock taken over."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import npeff_tl as nt
from npeff_tl.cli import main
from npeff_tl.store import DirectoryLock

HOLD = """
import sys, time
from npeff_tl.store import DirectoryLock
DirectoryLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(directory):
    """Another process that holds ``directory``'s lock until killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path, model64):
    holder = _holder(tmp_path / "store")
    try:
        with pytest.raises(nt.LockedError, match=f"another run is writing to .*store .pid {holder.pid}."):
            DirectoryLock(tmp_path / "store").acquire()
        space = nt.ParamSpace(model64, include=["blocks.0.attn.W_Q"])
        with pytest.raises(nt.LockedError, match=f"pid {holder.pid}"):
            nt.compute_pefs(model64, [[1, 2, 3]], space, nnz=8, store=tmp_path / "store", progress=False)
        assert not list((tmp_path / "store").glob("*.safetensors"))  # the refused writer wrote nothing
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "store" / ".lock").exists()  # left behind by the killed process: stale, taken over
    pefs = nt.compute_pefs(model64, [[1, 2, 3]], space, nnz=8, store=tmp_path / "store", progress=False)
    assert len(pefs) == 1
    with DirectoryLock(tmp_path / "store"):  # compute_pefs released it when done
        pass
    assert not (tmp_path / "store" / ".lock").exists()


def test_the_cli_refuses_a_run_folder_another_run_is_writing(tmp_path, capsys):
    holder = _holder(tmp_path / "run")
    try:
        assert main(["pefs", "--out", str(tmp_path / "run"), "--quiet", "--set", "data.per_task=2"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"another run is writing to {tmp_path / 'run'} (pid {holder.pid})" in err and "\n" not in err, err
        assert not (tmp_path / "run" / "config.json").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()


def test_a_lock_is_released_when_its_holder_is_done(tmp_path):
    lock = DirectoryLock(tmp_path).acquire()
    with pytest.raises(nt.LockedError):
        DirectoryLock(tmp_path).acquire()
    lock.release()
    start = time.perf_counter()
    with DirectoryLock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    assert time.perf_counter() - start < 5
    assert not (tmp_path / ".lock").exists()  # a released lock leaves nothing behind


def _damage(path, n=64):
    """Overwrite bytes near the end of a file (tensor data, past the header) with 0xFF."""
    data = bytearray(path.read_bytes())
    data[-n - 8:-8] = b"\xff" * n
    path.write_bytes(bytes(data))


def _pefs_equal(a, b):
    return (torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
            and torch.equal(a.dataset_fisher, b.dataset_fisher))


def test_damaged_stores_are_detected_on_load_and_recomputed_by_re_running(tmp_path, model64, tokens):
    space = nt.ParamSpace(model64, include=["blocks.0.attn.W_[QK]"])
    store = tmp_path / "store"

    def compute():
        return nt.compute_pefs(model64, tokens, space, nt.Target(classes=nt.TopK(2)), nnz=16, store=store,
                               shard_size=3, progress=False)

    first = compute()
    shard = store / "shard_00001.safetensors"
    _damage(shard)
    with pytest.raises(nt.FormatError, match="shard_00001.safetensors is corrupt: its contents no longer match the "
                                             "checksum"):
        nt.load_pefs(store)
    assert _pefs_equal(compute(), first)  # the corrupt shard alone was recomputed, bit for bit
    shard.unlink()
    with pytest.raises(nt.FormatError, match=r"shards \[1\] are missing; re-run compute_pefs"):
        nt.load_pefs(store)
    assert _pefs_equal(compute(), first)
    (store / "dataset_fisher.safetensors").unlink()
    with pytest.raises(nt.FormatError, match="dataset_fisher.safetensors is missing, though the store was saved with it"):
        nt.load_pefs(store)
    assert _pefs_equal(compute(), first)
    assert nt.load_pefs(store).dataset_fisher is not None


def test_saved_tensor_files_are_checksummed_and_foreign_folders_say_what_they_lack(tmp_path, model64, tokens):
    space = nt.ParamSpace(model64, include=["blocks.0.attn.W_Q"])
    pefs = nt.compute_pefs(model64, tokens, space, nnz=16, progress=False)
    decomposition = nt.DNPEFF(2, max_iter=5).fit(pefs, progress=False)
    decomposition.save(tmp_path / "dec")
    files = sorted((tmp_path / "dec").glob("*.safetensors"))
    assert files
    for file in files:
        original = file.read_bytes()
        _damage(file, 16)
        with pytest.raises(nt.FormatError, match=f"{file.name} is corrupt"):
            nt.load_decomposition(tmp_path / "dec")
        file.write_bytes(original)
    nt.load_decomposition(tmp_path / "dec")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(nt.FormatError, match="has no metadata.json. A saved result is a directory of metadata.json and "
                                             ".safetensors files"):
        nt.load_pefs(tmp_path / "notes")


def test_progress_after_a_resume_counts_from_where_the_run_stopped(tmp_path, model64, tokens, capsys):
    space = nt.ParamSpace(model64, include=["blocks.0.attn.W_Q"])
    kwargs = {"nnz": 8, "store": tmp_path / "store", "shard_size": 4}
    nt.compute_pefs(model64, tokens, space, progress=False, **kwargs)
    (tmp_path / "store" / "shard_00002.safetensors").unlink()  # the last 2 of 10 examples
    capsys.readouterr()
    nt.compute_pefs(model64, tokens, space, progress=True, **kwargs)
    bar = capsys.readouterr().err
    assert "8/10" in bar and "10/10" in bar and "0/2" not in bar, bar
