"""GPT-2-small size, end to end: PEFs, both NPEFF fits, coefficients and one selectivity measurement, with peak
memory against ``estimate_memory``, projected to 10,000 examples.

Run:  .venv/bin/python -u benchmarks/bench_scale.py [--examples N] [--device cuda] [--quick] [--model NAME]

Model: by default a ``HookedTransformer`` of GPT-2-small size from config with random weights (seed 0): 12 layers,
d_model 768, 12 heads, d_mlp 3072, d_vocab 50257, sequences of 32 random tokens. ``--model NAME`` takes a zoo
model instead (e.g. ``smollm2-135m``, the real pretrained model, prepared on first use: ``npeff-tl prepare
smollm2-135m``) on windows of 64 tokens of real text (held-out files of the standard library, in the model's
tokenisation). Space: every attention and MLP weight (W_Q, W_K, W_V, W_O, W_in, W_gate where the MLP is gated,
W_out of all blocks: 84,934,656 parameters at GPT-2 size, 106,168,320 in SmolLM2-135M). Target: the last
position, top-4 classes; nnz 65536; batch 8; PEFs streamed to a store in a temporary directory (what the memory
estimate assumes).

Figures, in order:
- D-PEFs and LRM-PEFs of ``--examples`` training examples (default 128): examples/s; for D-PEFs the fraction
  of the floor (one batched forward, unembedding the target position only, plus K batched backward passes with
  weight gradients aggregated over the batch: no per-example separation, no selection), the floor timed on one
  batch before and one after (mean of the two, so a change of machine load hits both).
- Peak memory of each stage against its estimate: on CPU the peak resident memory the stage adds (Linux
  VmHWM after a reset through /proc/self/clear_refs, minus VmRSS before; the script re-executes itself with
  MALLOC_MMAP_THRESHOLD_=65536 so that freed memory goes back to the system); on CUDA
  ``torch.cuda.max_memory_allocated`` above what was allocated before.
- D-NPEFF and LRM-NPEFF with 32 components on ``--device``: seconds per iteration (20 iterations; LRM: 5 G-only
  then 15 joint).
- Coefficients of 32 held-out examples (their D-PEFs, then ``fit_coefficients``, 300 iterations).
- One selectivity measurement: the D-NPEFF component with the most training mass, its mixing weight fixed at
  0.5, KL target 0.5 on a top set of 8 held-out examples against 24 others, the random control; the Fisher
  traces for normalised selectivity are the held-out D-PEFs' (top-4 classes) to keep the run short.
- The projection to 10,000 examples: PEF time at the measured rate; fits at the measured time per iteration
  scaled by the larger of the growth in stored entries (with the examples) and in kept columns (at most the
  whole space), for the default iteration counts (D-NPEFF max_iter 500; LRM-NPEFF 100 + 1000); memory from
  the estimates at that size, with every parameter of the space kept (the bound a fit must plan for).

Last line:
bench_scale: d_pefs_per_s=<a> lrm_pefs_per_s=<b> d_fraction_of_floor=<c> pef_peak_gb=<d> estimate_ratio=<e> dnpeff_s_per_iter=<f> lrm_s_per_iter=<g>
(d: the larger PEF peak; e: estimate / measured, the one furthest from 1 over all four measured stages).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
MMAP = "MALLOC_MMAP_THRESHOLD_"
if sys.platform == "linux" and os.environ.get(MMAP) is None:  # before torch allocates anything large
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, MMAP: "65536"})

import npeff_tl as nt  # noqa: E402
from npeff_tl.decomp.matrix import count_columns  # noqa: E402
from npeff_tl.evaluation.labels import components_by_mass  # noqa: E402
from npeff_tl.evaluation.selectivity import SelectivityConfig, measure_selectivity  # noqa: E402
from npeff_tl.memory import estimate_memory  # noqa: E402

sys.path.insert(0, str(ROOT))
from bench_pefs import floor, now  # noqa: E402

K, NNZ, BATCH, RANK, PROJECTED = 4, 65536, 8, 32, 10_000
SEQ, REAL_SEQ = 32, 64  # random tokens for the model from config; windows of real text for a zoo model
SPACE = ["blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*"]


def real_windows(model, n: int, seq: int) -> torch.Tensor:
    """``n`` windows of ``seq`` tokens of the standard library's held-out files in ``model``'s tokenisation: the
    first window of each file long enough, in the corpus's order."""
    from npeff_tl.zoo.corpus import Corpus

    windows = []
    for text in Corpus.from_stdlib("heldout").texts():
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        windows += [ids[start: start + seq] for start in range(0, len(ids) - seq + 1, 4 * seq)][: max(1, n // 40)]
        if len(windows) >= n:
            return torch.tensor(windows[:n])
    raise ValueError(f"the held-out files give only {len(windows)} windows of {seq} tokens, fewer than {n}")


def build(device: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cfg = HookedTransformerConfig(n_layers=12, d_model=768, d_head=64, n_heads=12, d_mlp=3072, d_vocab=50257,
                                      n_ctx=SEQ, act_fn="gelu_new", normalization_type="LN", device=device, seed=0)
        return HookedTransformer(cfg).eval()


class PeakMemory:
    """Peak memory a block of work adds (bytes), see the module docstring."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.bytes = self._status("VmHWM") - self.base

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def timed(fn, model):
    """(fn(), seconds), with the model's device finished before and after."""
    start = now(model)
    result = fn()
    return result, now(model) - start


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=128, help="training examples (at least 128 for the record)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="40 examples and 4 iterations per fit (smoke test)")
    parser.add_argument("--model", help="a zoo model instead of the GPT-2-size model from config (smollm2-135m)")
    args = parser.parse_args()
    n = 40 if args.quick else args.examples
    iters = 4 if args.quick else 20
    device = args.device
    seq = REAL_SEQ if args.model else SEQ
    print(f"bench_scale: torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"model {args.model or 'GPT-2 size from config'}, {n} examples, K={K}, nnz={NNZ}, seq={seq}, batch={BATCH}")
    model = nt.zoo.load_model(args.model, device) if args.model else build(device)
    space = nt.ParamSpace(model, include=SPACE)
    print(f"space: {space.size:,} parameters in {len(space.names)} tensors")
    if args.model:
        windows = real_windows(model, n + 32, seq)
        train, heldout = windows[:n], windows[n:]
    else:
        g = torch.Generator().manual_seed(0)
        train = torch.randint(0, model.cfg.d_vocab, (n, SEQ), generator=g)
        heldout = torch.randint(0, model.cfg.d_vocab, (32, SEQ), generator=g)
    target = nt.Target("last", nt.TopK(K))
    ratios, peaks, rates = {}, {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale."))

    floor(model, space, train[:BATCH])  # warm-up
    floors = [floor(model, space, train[:BATCH])]
    nt.compute_pefs(model, train[:2], space, target, "diagonal", nnz=NNZ, batch_size=2, progress=False)  # warm-up
    pefs = {}
    for kind in ("diagonal", "lowrank"):
        estimate = estimate_memory("pefs", model=model, space=space, target=target, kind=kind, batch_size=BATCH,
                                   nnz=NNZ, n_examples=n, seq_len=seq)
        with PeakMemory(device) as peak:
            pefs[kind], seconds = timed(lambda: nt.compute_pefs(model, train, space, target, kind, nnz=NNZ,
                                                                batch_size=BATCH, store=tmp / kind, progress=False),
                                        model)
        rates[kind], peaks[kind], ratios[f"{kind} PEFs"] = n / seconds, peak.bytes, estimate.bytes / peak.bytes
        print(f"{kind} PEFs: {rates[kind]:.2f} examples/s ({seconds:.0f} s); peak {gb(peak.bytes)}, "
              f"estimate {gb(estimate.bytes)} (ratio {ratios[f'{kind} PEFs']:.2f})")
        if kind == "diagonal":
            floors.append(floor(model, space, train[:BATCH]))
    floor_rate = sum(floors) / len(floors)
    fraction = rates["diagonal"] / floor_rate
    print(f"floor: {floor_rate:.2f} examples/s (before and after: {floors[0]:.2f}, {floors[1]:.2f}); "
          f"D-PEFs at {fraction:.2f} of the floor")

    seconds_per_iter, fits, growth = {}, {}, {}
    solvers = {"dnpeff": nt.DNPEFF(RANK, max_iter=iters, tol=0.0, device=device),
               "lrm_npeff": nt.LRMNPEFF(RANK, n_iters_g_only=iters // 4, n_iters_joint=iters - iters // 4, tol=0.0,
                                        device=device)}
    for method, kind in (("dnpeff", "diagonal"), ("lrm_npeff", "lowrank")):
        p = pefs[kind]
        columns = count_columns(p)
        estimate = estimate_memory(method, n_examples=len(p), nnz=p.nnz, n_columns=columns, rank=RANK,
                                   classes=getattr(p, "max_rank", 1))
        with PeakMemory(device) as peak:
            fits[method], seconds = timed(lambda: solvers[method].fit(p, progress=False), model)
        seconds_per_iter[method], ratios[method] = seconds / iters, estimate.bytes / peak.bytes
        growth[method] = max(PROJECTED / n, space.size / columns)
        print(f"{method}: {RANK} components over {columns:,} columns, {seconds_per_iter[method]:.3f} s/iteration "
              f"({iters} iterations, {seconds:.1f} s in all); peak {gb(peak.bytes)}, estimate {gb(estimate.bytes)} "
              f"(ratio {ratios[method]:.2f})")

    held_pefs, seconds = timed(lambda: nt.compute_pefs(model, heldout, space, target, "diagonal", nnz=NNZ,
                                                       batch_size=BATCH, progress=False), model)
    coefficients, fit_seconds = timed(lambda: fits["dnpeff"].fit_coefficients(held_pefs, progress=False), model)
    print(f"coefficients of {len(heldout)} held-out examples: their D-PEFs {seconds:.1f} s, "
          f"fit_coefficients {fit_seconds:.1f} s")

    dictionary = nt.NPEFFDictionary(model, fits["dnpeff"], nt.Examples.from_tokens(train), target, pefs["diagonal"],
                                    mix=0.5, batch_size=BATCH)
    component = components_by_mass(fits["dnpeff"].W, 1)[0]
    config = SelectivityConfig(n_top=8, n_baseline=24, kl_targets=(0.5,), controls=("random",), batch_size=BATCH,
                               n_top_train=8)
    result, seconds = timed(lambda: measure_selectivity(
        dictionary, nt.LabeledExamples(nt.Examples.from_tokens(heldout)), components=[component],
        coefficients=coefficients, fisher_traces=held_pefs.per_example["fisher_trace"], config=config,
        progress=False), model)
    print(f"selectivity of component {component}: {seconds:.1f} s; medians: {result.medians()}")

    pef_hours = {kind: PROJECTED / rates[kind] / 3600 for kind in rates}
    fit_hours = {"dnpeff": seconds_per_iter["dnpeff"] * growth["dnpeff"] * 500 / 3600,
                 "lrm_npeff": seconds_per_iter["lrm_npeff"] * growth["lrm_npeff"] * 1100 / 3600}
    big = {kind: estimate_memory("pefs", model=model, space=space, target=target, kind=kind, batch_size=BATCH,
                                 nnz=NNZ, n_examples=PROJECTED, seq_len=seq).bytes for kind in rates}
    big_fits = {method: estimate_memory(method, n_examples=PROJECTED, nnz=NNZ, n_columns=space.size, rank=RANK,
                                        classes=K).bytes for method in fits}
    print(f"projected for {PROJECTED:,} examples on this machine: D-PEFs {pef_hours['diagonal']:.1f} h, "
          f"LRM-PEFs {pef_hours['lowrank']:.1f} h, D-NPEFF {fit_hours['dnpeff']:.1f} h (500 iterations), "
          f"LRM-NPEFF {fit_hours['lrm_npeff']:.1f} h (1100 iterations); memory (estimates): PEFs "
          f"{gb(big['diagonal'])} / {gb(big['lowrank'])}, fits {gb(big_fits['dnpeff'])} / {gb(big_fits['lrm_npeff'])}")
    worst = max(ratios.values(), key=lambda r: abs(r - 1))
    print("estimate / measured: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"bench_scale: d_pefs_per_s={rates['diagonal']:.2f} lrm_pefs_per_s={rates['lowrank']:.2f} "
          f"d_fraction_of_floor={fraction:.2f} pef_peak_gb={max(peaks.values()) / 2**30:.2f} "
          f"estimate_ratio={worst:.2f} dnpeff_s_per_iter={seconds_per_iter['dnpeff']:.3f} "
          f"lrm_s_per_iter={seconds_per_iter['lrm_npeff']:.3f}")


if __name__ == "__main__":
    main()
