"""Measure one stage's peak memory in a fresh process, next to its estimate (run by tests/unit/test_memory.py).

    MALLOC_MMAP_THRESHOLD_=65536 python tests/helpers/memory_worker.py '{"stage": "pefs", ...}'

Prints {"measured": bytes, "estimated": bytes}. The measurement is the peak resident memory the stage adds
(Linux: VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before the stage); with the mmap
threshold fixed, glibc hands freed blocks back to the system, so resident memory follows the live tensors.
"""

import json
import sys
import tempfile
import warnings

import torch

warnings.simplefilter("ignore")
torch.set_num_threads(1)

import npeff_tl as nt  # noqa: E402
from npeff_tl.memory import estimate_memory  # noqa: E402


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def measure(run) -> int:
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    run()
    return _status("VmHWM") - base


def pefs(cfg: dict) -> tuple[int, int]:
    from npeff_tl.tl_models import build_model

    L, d, h, V, T = (cfg[key] for key in ("layers", "d_model", "heads", "vocab", "seq_len"))
    model = build_model(dict(n_layers=L, d_model=d, n_heads=h, d_head=d // h, d_mlp=4 * d, d_vocab=V, n_ctx=T,
                             act_fn="gelu", normalization_type="LN", device="cpu", seed=0)).eval()
    tokens = torch.randint(0, V, (cfg["n"], T), generator=torch.Generator().manual_seed(0))
    space = nt.ParamSpace(model, include=["blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*"])
    target = nt.Target("last", nt.TopK(cfg["classes"]))
    settings = {"kind": cfg["kind"], "nnz": cfg["nnz"], "batch_size": cfg["batch"]}
    nt.compute_pefs(model, tokens[:2], space, target, cfg["kind"], nnz=64, batch_size=2, progress=False)  # warm-up
    estimate = estimate_memory("pefs", model=model, space=space, target=target, n_examples=cfg["n"], seq_len=T,
                               **settings)
    with tempfile.TemporaryDirectory() as tmp:
        measured = measure(lambda: nt.compute_pefs(model, tokens, space, target, store=f"{tmp}/pefs", progress=False,
                                                   **settings))
    return measured, estimate.bytes


def decomposition(cfg: dict) -> tuple[int, int]:
    """Synthetic PEFs of ``n`` examples x ``nnz`` entries over ``size`` parameters (low-rank: 4 classes)."""
    from npeff_tl.pefs.sparse import lowrank_rows

    n, nnz, size, rank, k = cfg["n"], cfg["nnz"], cfg["size"], cfg["rank"], 4
    g = torch.Generator().manual_seed(0)
    columns = torch.stack([torch.randperm(size, generator=g)[:nnz] for _ in range(n)])
    values = torch.rand(n, nnz, generator=g)
    space = nt.ParamSpace.from_shapes({"theta": (size,)})
    if cfg["stage"] == "dnpeff":
        values, order = values.sort(1, descending=True)
        pefs = nt.DiagonalPEFs(values=values, indices=columns.gather(1, order).int(),
                               norms=values.double().norm(dim=1), space=space)
        solver = nt.DNPEFF(rank, max_iter=3)
    else:
        joint = torch.arange(k).repeat_interleave(nnz // k)[None, :] * size + columns.long()
        values, indices, col_offsets = lowrank_rows(values - 0.5, joint, size, k)
        pefs = nt.LowRankPEFs(values=values, indices=indices.int(), norms=torch.full((n,), 3.0, dtype=torch.float64),
                              col_offsets=col_offsets, ranks=torch.full((n,), k), space=space)
        solver = nt.LRMNPEFF(rank, n_iters_g_only=1, n_iters_joint=2)
    kept = int((torch.bincount(columns.flatten(), minlength=size) > 0).sum())
    estimate = estimate_memory(cfg["stage"], n_examples=n, nnz=nnz, n_columns=kept, rank=rank, classes=k)
    measured = measure(lambda: solver.fit(pefs, progress=False))
    return measured, estimate.bytes


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    measured, estimated = (pefs if config["stage"] == "pefs" else decomposition)(config)
    print(json.dumps({"measured": measured, "estimated": estimated}))
