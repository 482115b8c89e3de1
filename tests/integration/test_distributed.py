"""torch.distributed (gloo on CPU, launched with torchrun): PEF stores, D-NPEFF / LRM-NPEFF factors and refitted
coefficients are identical whatever the number of ranks (one thread per process), and a run whose rank died
resumes without recomputing finished shards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from npeff_tl.store import load_tensors

WORKER = Path(__file__).parents[1] / "helpers" / "distributed_worker.py"
KINDS = ("diagonal", "lowrank")


def _torchrun(n: int, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(WORKER),
         str(out), *args], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _store(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a PEF store, by file and name."""
    return {f"{f.name}:{k}": v for f in sorted(path.glob("*.safetensors")) for k, v in load_tensors(f).items()}


def _written(out: Path) -> list[tuple[str, int]]:
    lines = [line.split() for f in out.glob("written_rank*.txt") for line in f.read_text().splitlines()]
    return sorted((name, int(j)) for name, j in lines)


def _assert_same_pef_stores(a: Path, b: Path) -> None:
    for kind in KINDS:
        x, y = _store(a / f"pefs_{kind}"), _store(b / f"pefs_{kind}")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def one_rank_pefs(tmp_path_factory) -> Path:
    """The PEF stores of the job in one process (the reference for the runs with --only-pefs)."""
    out = tmp_path_factory.mktemp("one_rank_pefs")
    _torchrun(1, out, "--only-pefs")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same job with 1, 2 and 3 ranks."""
    root = tmp_path_factory.mktemp("distributed")
    for n in (1, 2, 3):
        _torchrun(n, root / f"ranks{n}")
    return root


@pytest.mark.parametrize("n", [2, 3])
def test_pef_stores_are_identical_for_any_number_of_ranks(runs, n):
    for kind in KINDS:
        single, multi = _store(runs / "ranks1" / f"pefs_{kind}"), _store(runs / f"ranks{n}" / f"pefs_{kind}")
        assert single.keys() == multi.keys() and len(single) > 8
        for key in single:
            assert torch.equal(single[key], multi[key]), key
    # each shard was computed exactly once, by one of the ranks
    shards = -(-29 // 4)
    assert _written(runs / f"ranks{n}") == sorted((f"pefs_{k}", j) for k in KINDS for j in range(shards))
    assert len(list((runs / f"ranks{n}").glob("written_rank*.txt"))) == n


@pytest.mark.parametrize("n", [2, 3])
def test_decompositions_agree_with_one_process(runs, n):
    single = load_tensors(runs / "ranks1" / "result.safetensors")
    multi = load_tensors(runs / f"ranks{n}" / "result.safetensors")
    for key in ("dnpeff.kept", "lrm.kept"):
        assert torch.equal(single[key], multi[key])
    # The products add fixed column blocks' shares in float64 and round once, so even LRM-NPEFF on the tiny
    # model's PEFs, whose accept/reject steps turn a last-bit difference into ~1e-3 in W, takes the same path.
    for key in ("dnpeff.W", "dnpeff.H", "refit.W", "dnpeff.loss", "lrm.W", "lrm.G", "lrm.loss", "planted.W",
                "planted.G"):
        assert torch.equal(single[key], multi[key]), (key, _relative(single[key], multi[key]))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a.double() - b.double()).norm() / a.double().norm())


def test_a_run_whose_rank_died_resumes_without_recomputing(tmp_path, one_rank_pefs):
    out = tmp_path / "crash"
    crashed = _torchrun(2, out, "--die-after-shards", "2", "--only-pefs", check=False)
    assert crashed.returncode != 0
    before = set(_written(out))
    assert 2 <= len(before) < 2 * -(-29 // 4)  # some shards finished, not all
    for f in out.glob("written_rank*.txt"):
        f.unlink()
    _torchrun(2, out, "--only-pefs")
    after = set(_written(out))
    assert not before & after  # finished shards were not computed again
    assert before | after == {(f"pefs_{k}", j) for k in KINDS for j in range(-(-29 // 4))}
    _assert_same_pef_stores(one_rank_pefs, out)


def test_a_rank_that_starts_late_still_gets_its_own_shards(tmp_path, one_rank_pefs):
    """Ranks agree on the unfinished shards before any of them writes one: a late rank must not find its
    shards' neighbours finished and shift the share-out (a shard nobody computes, or one computed twice)."""
    out = tmp_path / "late"
    _torchrun(2, out, "--late-rank", "1", "--only-pefs")
    assert _written(out) == sorted((f"pefs_{k}", j) for k in KINDS for j in range(-(-29 // 4)))  # each once
    _assert_same_pef_stores(one_rank_pefs, out)


def test_a_rank_that_fails_ends_the_run_instead_of_waiting_at_exit(tmp_path):
    """Ranks meet at a barrier when they exit normally; one that fails must not: its peers sit in another
    collective, and a barrier there would hang the job instead of ending it."""
    result = _torchrun(3, tmp_path / "failing", "--raise-on-rank", "1", check=False)
    assert result.returncode != 0 and "a planned failure" in result.stderr


def test_the_command_line_runs_pefs_and_fit_on_every_rank_then_goes_on_in_one(own_model_and_data, tmp_path):
    """`torchrun -m npeff_tl.cli --distributed selectivity`: PEFs and fits on 2 ranks, selectivity on rank 0; the
    artifacts match a one-process run's."""
    from npeff_tl.cli import main

    root, _, _ = own_model_and_data
    settings = ["--quiet", "--set", f"model.name={root / 'checkpoint'}", "--set", f"data.source={root / 'prompts.jsonl'}",
                "--set", "fit.n_components=3", "--set", "pefs.nnz=512", "--set", "selectivity.n_top=5",
                "--set", "selectivity.n_baseline=40", "--set", "selectivity.n_measured=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "npeff_tl.cli", "--distributed", "selectivity", "--out", str(tmp_path / "two"),
                             *settings], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    assert main(["selectivity", "--out", str(tmp_path / "one"), *settings]) == 0
    for kind in KINDS:
        a, b = _store(tmp_path / "one" / "pefs" / f"train_{kind}"), _store(tmp_path / "two" / "pefs" / f"train_{kind}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one, two = (load_tensors(tmp_path / d / "dnpeff" / "decomposition.safetensors") for d in ("one", "two"))
    assert _relative(one["W"], two["W"]) < 1e-4 and _relative(one["components"], two["components"]) < 1e-4
    for method in ("dnpeff", "lrm_npeff"):
        assert (tmp_path / "two" / "selectivity" / method / "selectivity.json").exists()
    timings = json.loads((tmp_path / "two" / "timings.json").read_text())
    assert set(timings) == {"pefs", "fit", "selectivity"}


def test_distributed_without_torchrun_is_a_clear_error(capsys, tmp_path):
    from npeff_tl.cli import main

    assert main(["--distributed", "pefs", "--out", str(tmp_path)]) == 2
    assert "--distributed needs torchrun to start the ranks" in capsys.readouterr().err
