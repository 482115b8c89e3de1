"""Distributed decompositions: the decomposition step with 2 ranks against 1 rank, one thread per rank.

Run:  .venv/bin/python benchmarks/bench_distributed.py [--quick] [--repeats 3]

Data: synthetic normalised D-PEFs (bench_decomp's generator: 2,000 examples x 4,096 nnz over 262,144
parameters, rows mixing 1-3 of 64 planted sparse diagonals plus noise) and low-rank PEFs of the same shape
(3 classes per example). Each run launches ``torchrun --nproc_per_node N`` (gloo on CPU, NCCL on GPUs with
``--device cuda``), loads the stored PEFs, and times ``DNPEFF(32).fit`` (40 iterations) and
``LRMNPEFF(32).fit`` (10 G-only + 20 joint iterations) between barriers: everything the decomposition step
does, preprocessing included. 1-rank and 2-rank runs alternate; the figures are medians over ``--repeats``.

efficiency = time with 1 rank / (2 x time with 2 ranks), over both fits together.
Last line: bench_distributed: efficiency_2_ranks=<x>
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def make_data(out: Path, n: int, size: int, nnz: int) -> None:
    """D-PEFs from bench_decomp's generator; LRM-PEFs with 3 classes per example on the same entries (split
    into 3 disjoint column groups, square roots of the values with random signs)."""
    import npeff_tl as nt
    from bench_decomp import synthetic_diagonal
    from npeff_tl.pefs.sparse import lowrank_rows

    diagonal = synthetic_diagonal(n, size, nnz)
    diagonal.save(out / "diagonal")
    k, per_class = 3, nnz // 3
    g = torch.Generator().manual_seed(1)
    signs = torch.randint(0, 2, (n, k * per_class), generator=g) * 2 - 1
    values = diagonal.values[:, : k * per_class].sqrt() * signs
    joint = torch.arange(k).repeat_interleave(per_class)[None, :] * size + diagonal.indices[:, : k * per_class].long()
    values, indices, col_offsets = lowrank_rows(values, joint, size, k)
    class_norms = values.double().square().reshape(n, k, per_class).sum(-1)  # ||u_c||^2; disjoint supports
    nt.LowRankPEFs(values=values, indices=indices.int(), norms=class_norms.square().sum(1).sqrt(),
                   col_offsets=col_offsets, ranks=torch.full((n,), k), space=diagonal.space,
                   metadata={"synthetic": True}).save(out / "lowrank")


def worker(data: Path, result: Path, device: str) -> None:
    import npeff_tl as nt
    from npeff_tl import distributed

    torch.set_num_threads(1)
    distributed.init_from_env("nccl" if device == "cuda" else "gloo")
    pefs = {kind: nt.load_pefs(data / kind) for kind in ("diagonal", "lowrank")}
    times = {}
    for name, fit in (("dnpeff", lambda: nt.DNPEFF(32, max_iter=40, tol=0, device=device).fit(
                          pefs["diagonal"], progress=False)),
                      ("lrm_npeff", lambda: nt.LRMNPEFF(32, n_iters_g_only=10, n_iters_joint=20, tol=0,
                                                        device=device).fit(pefs["lowrank"], progress=False))):
        distributed.barrier()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fit()
        if device == "cuda":
            torch.cuda.synchronize()
        distributed.barrier()
        times[name] = time.perf_counter() - start
    if distributed.rank() == 0:
        result.write_text(json.dumps(times))


def launch(ranks: int, data: Path, device: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "times.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                        __file__, "--worker", str(data), str(result), "--device", device], env=env, check=True)
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the examples")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--worker", nargs=2, metavar=("DATA", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]), args.device)
        return
    n = 500 if args.quick else 2000
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        make_data(data, n, 262_144, 4096)
        runs = {1: [], 2: []}
        for repeat in range(args.repeats):
            for ranks in (1, 2):
                runs[ranks].append(launch(ranks, data, args.device))
                print(f"repeat {repeat}: {ranks} rank(s): " + "  ".join(f"{k} {v:.2f} s" for k, v in runs[ranks][-1].items()),
                      flush=True)
    median = {r: {k: statistics.median(t[k] for t in runs[r]) for k in runs[r][0]} for r in runs}
    for name in median[1]:
        print(f"{name:>10}: 1 rank {median[1][name]:.2f} s, 2 ranks {median[2][name]:.2f} s, "
              f"efficiency {median[1][name] / (2 * median[2][name]):.2f}")
    total = {r: statistics.median(sum(t.values()) for t in runs[r]) for r in runs}
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores, 1 thread per rank"
    print(f"device: {device}; {n} examples")
    print(f"bench_distributed: efficiency_2_ranks={total[1] / (2 * total[2]):.2f}")


if __name__ == "__main__":
    main()
