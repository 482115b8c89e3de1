"""One rank of the torch.distributed tests (launched by tests/integration/test_distributed.py through torchrun, gloo on CPU).

    python -m torch.distributed.run --nproc_per_node N tests/helpers/distributed_worker.py OUT [--die-after-shards K]
                                    [--only-pefs] [--late-rank R] [--raise-on-rank R]

Computes diagonal and low-rank PEFs of a tiny model into OUT/pefs_{kind}, fits D-NPEFF and LRM-NPEFF to them
and LRM-NPEFF to planted low-rank PEFs, fits coefficients of the PEFs again, and (rank 0) saves the factors to
OUT/result.safetensors. Every shard a rank
writes is listed in OUT/written_rank{r}.txt. ``--die-after-shards K``: rank 1 exits hard after writing K
shards, as a crashed rank would. ``--late-rank R``: rank R looks at the store's finished shards 3 s later than
the others, as a rank slowed down by a busy machine would. ``--raise-on-rank R``: rank R raises after the PEFs, while the
others go on to the fits' collectives.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for helpers
torch.set_num_threads(1)

from helpers.models import make_model  # noqa: E402
from helpers.planted import planted_lowrank  # noqa: E402

import npeff_tl as nt  # noqa: E402
from npeff_tl import distributed  # noqa: E402
from npeff_tl.store import ShardStore, save_tensors  # noqa: E402

N_EXAMPLES, SHARD_SIZE = 29, 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--die-after-shards", type=int)
    parser.add_argument("--only-pefs", action="store_true")
    parser.add_argument("--late-rank", type=int)
    parser.add_argument("--raise-on-rank", type=int)
    args = parser.parse_args()
    out = Path(args.out)
    distributed.init_from_env("gloo")
    rank = distributed.rank()
    written = []
    original_write = ShardStore.write

    def write(self, j, tensors, prefix="shard"):
        original_write(self, j, tensors, prefix)
        if prefix == "shard":
            written.append(f"{self.path.name} {j}")
            with open(out / f"written_rank{rank}.txt", "a") as f:
                f.write(f"{self.path.name} {j}\n")
            if args.die_after_shards is not None and rank == 1 and len(written) >= args.die_after_shards:
                os._exit(17)

    ShardStore.write = write
    original_is_done = ShardStore.is_done

    def is_done(self, j):
        if rank == args.late_rank and j == 0:
            time.sleep(3)
        return original_is_done(self, j)

    ShardStore.is_done = is_done

    model = make_model(torch.float32, seed=3)
    tokens = torch.randint(0, 23, (N_EXAMPLES, 9), generator=torch.Generator().manual_seed(5))
    space = nt.ParamSpace(model, include=["blocks.*.attn.W_[QKV]", "blocks.*.mlp.W_*"])
    target = nt.Target("last", nt.TopK(3))
    pefs = {kind: nt.compute_pefs(model, tokens, space, target, kind, nnz=300, batch_size=3, shard_size=SHARD_SIZE,
                                  store=out / f"pefs_{kind}", progress=False)
            for kind in ("diagonal", "lowrank")}
    if args.only_pefs:
        return
    if rank == args.raise_on_rank:
        raise RuntimeError("a planned failure")
    dnpeff = nt.DNPEFF(3, max_iter=60, seed=1).fit(pefs["diagonal"], progress=False)
    lrm = nt.LRMNPEFF(3, n_iters_g_only=20, n_iters_joint=40, seed=1).fit(pefs["lowrank"], progress=False)
    refit = dnpeff.fit_coefficients(pefs["diagonal"], n_iter=50, batch_size=5, progress=False)
    factors, _, _ = planted_lowrank(7, r=4, n=80, m=240, size=40, shared=8, noise=0.05)
    planted = nt.LRMNPEFF(4, n_iters_g_only=20, n_iters_joint=200, seed=1).fit(
        nt.LowRankPEFs.from_dense([u.float() for u in factors]), progress=False)
    if rank == 0:
        save_tensors({"dnpeff.W": dnpeff.W, "dnpeff.H": dnpeff.H, "dnpeff.kept": dnpeff.kept_columns,
                      "lrm.W": lrm.W, "lrm.G": lrm.G, "lrm.kept": lrm.kept_columns, "refit.W": refit,
                      "dnpeff.loss": torch.tensor([dnpeff.losses[-1]["loss"]]),
                      "lrm.loss": torch.tensor([lrm.losses[-1]["loss"]]),
                      "planted.W": planted.W, "planted.G": planted.G}, out / "result.safetensors")


if __name__ == "__main__":
    main()
