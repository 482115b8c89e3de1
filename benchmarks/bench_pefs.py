"""Throughput of compute_pefs against a naive loop and a no-per-example floor, in one process.

Run:  .venv/bin/python benchmarks/bench_pefs.py [--threads N] [--quick]

Setting: diagonal PEFs, top-4 classes, nnz 65536 (capped at the space size), sequence length 32, batch 16,
MLP weights selected. Models built from configs with random weights: "tiny" (2 layers, d_model 64) and
"gpt2-width" (2 layers, d_model 768, 12 heads, d_mlp 3072, d_vocab 50257).

Baselines (same process, same thread count; the three are interleaved round by round, 5 rounds for tiny and 3
for gpt2-width, and each speedup is the median of the per-round ratios):
- naive: per example, a batch-1 ``model(tokens)`` forward, then per class one ``torch.autograd.grad`` over the
  selected parameters (retain_graph), squared, weighted by p_c, summed, then top-nnz.
- floor: one batched forward (unembedding only the target position, as ours does) plus K batched backward
  passes of the per-class summed log-probs, weight gradients aggregated over the batch: no per-example
  separation, no top-k: what the gradients alone cost, computed the ordinary way.

Last line: bench_pefs: tiny_speedup_vs_naive=<a> speedup_vs_naive=<x> fraction_of_floor=<y> peak_rss_mb=<z>
(x, y, z for the gpt2-width model; z is the peak RSS of compute_pefs on 4x the examples, with the ratio to
the peak on 1x printed above it).

``--breakdown`` adds, on the tiny model, two parts of ours timed alone and interleaved with the others:
"gradients" (the per-example gradients and diagonals of each batch, as ours computes them, without norms,
sort or storage) and "sort" (the descending sort of each batch's rows, as ours does it when nnz is the whole
space, on random values): how far ours could get if everything else were free.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import warnings

import torch

import npeff_tl as nt
from npeff_tl.pefs.compute import fisher_diagonal
from npeff_tl.pefs.grads import as_examples, batch_grads, batch_target_logits
from npeff_tl.pefs.objectives import ClassLogProbs
from npeff_tl.pefs.topk import sort_descending
from npeff_tl.pefs.workspace import Workspace

K, NNZ, SEQ, BATCH = 4, 65536, 32, 16


def build(width: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    shapes = {
        "tiny": dict(d_model=64, d_head=16, n_heads=4, d_mlp=256, d_vocab=512),
        "gpt2-width": dict(d_model=768, d_head=64, n_heads=12, d_mlp=3072, d_vocab=50257),
    }[width]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cfg = HookedTransformerConfig(n_layers=2, n_ctx=SEQ, act_fn="gelu", normalization_type="LN", device="cpu",
                                      seed=0, **shapes)
        model = HookedTransformer(cfg).eval()
    space = nt.ParamSpace(model, include="blocks.*.mlp.W_*")
    return model, space


def tokens_for(model, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.cfg.d_vocab, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def ours(model, space, tokens) -> float:
    start = time.perf_counter()
    nt.compute_pefs(model, tokens, space, nt.Target("last", nt.TopK(K)), "diagonal", nnz=min(NNZ, space.size),
                    batch_size=BATCH, progress=False)
    return len(tokens) / (time.perf_counter() - start)


def naive(model, space, tokens) -> float:
    params = list(space.check_model(model).values())
    nnz = min(NNZ, space.size)
    start = time.perf_counter()
    for row in tokens:
        log_probs = model(row[None])[0, -1].log_softmax(-1)
        top = log_probs.detach().exp().topk(K)
        fisher = torch.zeros(space.size)
        for p, c in zip(top.values, top.indices):
            grads = torch.autograd.grad(log_probs[c], params, retain_graph=True)
            fisher += p * torch.cat([g.reshape(-1) for g in grads]).square()
        fisher.topk(nnz)
    return len(tokens) / (time.perf_counter() - start)


def floor(model, space, tokens) -> float:
    adapter = nt.as_adapter(model)
    params = list(space.check_model(model).values())
    examples = as_examples(tokens)
    start = time.perf_counter()
    for first in range(0, len(tokens), BATCH):
        index = torch.arange(first, min(first + BATCH, len(tokens)))
        log_probs = batch_target_logits(adapter, examples, index).log_softmax(-1)
        classes = log_probs.detach().topk(K).indices
        for k in range(K):
            torch.autograd.grad(log_probs.gather(1, classes[:, k : k + 1]).sum(), params, retain_graph=True)
    return len(tokens) / (time.perf_counter() - start)


def gradients(model, space, tokens) -> float:
    """Examples/s of the per-example gradients and D-PEF diagonals alone (breakdown of ours)."""
    adapter, examples, rule, workspace = nt.as_adapter(model), as_examples(tokens), nt.TopK(K), Workspace()
    diagonal = torch.empty(BATCH, space.size)
    start = time.perf_counter()
    for first in range(0, len(tokens), BATCH):
        index = torch.arange(first, min(first + BATCH, len(tokens)))

        def objective(logits):
            chosen = rule.select(logits, index)
            return ClassLogProbs(chosen.class_ids, rule, scale=chosen.weights.sqrt())

        pieces, _ = batch_grads(adapter, space, examples, index, objective, None, workspace=workspace)
        for name, factors in pieces:
            fisher_diagonal(factors, diagonal[: len(index), slice(*space.offsets[name])])
    return len(tokens) / (time.perf_counter() - start)


def sort(model, space, tokens) -> float:
    """Examples/s of the descending sort of full D-PEF rows alone, batch by batch (breakdown of ours)."""
    rows = torch.rand(BATCH, space.size, generator=torch.Generator().manual_seed(0)).square()
    order = torch.empty(rows.shape, dtype=torch.long)
    elapsed = 0.0
    for _ in range(0, len(tokens), BATCH):
        keys = rows.clone()
        start = time.perf_counter()
        sort_descending(keys, in_place=True, order=order)
        elapsed += time.perf_counter() - start
    return len(tokens) / elapsed


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def interleaved_rates(fns: dict, model, space, tokens: dict, repeats: int) -> list[dict[str, float]]:
    """Examples/s of each function in ``repeats`` rounds, the functions interleaved within a round, so that a
    change of machine load hits all of them alike (``tokens``: the examples each one runs on)."""
    for name, fn in fns.items():
        fn(model, space, tokens[name][:BATCH])  # warm-up (first-call allocations, lazy imports)
    return [{name: fn(model, space, tokens[name]) for name, fn in fns.items()} for _ in range(repeats)]


def medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}


def median_ratio(rounds: list[dict[str, float]], a: str, b: str) -> float:
    return statistics.median(r[a] / r[b] for r in rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for all runs")
    parser.add_argument("--quick", action="store_true", help="fewer examples and repeats (smoke test)")
    parser.add_argument("--breakdown", action="store_true", help="also time parts of ours alone on the tiny model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else 5
    print(f"bench_pefs: torch {torch.__version__}, {args.threads} threads, K={K}, nnz={NNZ}, seq={SEQ}, batch={BATCH}")
    fns = {"ours": ours, "naive": naive, "floor": floor}

    model, space = build("tiny")
    tokens = tokens_for(model, 64 if args.quick else 256)
    parts = {"gradients": gradients, "sort": sort} if args.breakdown else {}
    tiny = interleaved_rates(fns | parts, model, space, dict.fromkeys(fns | parts, tokens), repeats)
    print("tiny:       " + "  ".join(f"{k} {v:8.1f} ex/s" for k, v in medians(tiny).items()))
    if parts:
        print("tiny breakdown, time per example relative to naive's (10x naive = 0.100): "
              + "  ".join(f"{k} {1 / median_ratio(tiny, k, 'naive'):.3f}" for k in ("ours", *parts)))

    model, space = build("gpt2-width")
    n = BATCH if args.quick else 2 * BATCH
    ours(model, space, tokens_for(model, BATCH))  # warm-up
    rss_before = peak_rss_mb()
    ours(model, space, tokens_for(model, n, seed=1))
    rss_1x = peak_rss_mb()
    ours(model, space, tokens_for(model, 4 * n, seed=2))
    rss_4x = peak_rss_mb()
    big_tokens = {"ours": tokens_for(model, n, seed=1), "floor": tokens_for(model, n, seed=1),
                  "naive": tokens_for(model, BATCH // 2 if args.quick else BATCH, seed=1)}
    big = interleaved_rates(fns, model, space, big_tokens, max(1, repeats - 2))
    print(f"gpt2-width: space {space.size:,} params; " + "  ".join(f"{k} {v:6.2f} ex/s" for k, v in medians(big).items()))
    print(f"gpt2-width: peak RSS {rss_before:.0f} MB after warm-up, {rss_1x:.0f} MB after {n} examples, "
          f"{rss_4x:.0f} MB after {4 * n} examples (4x / 1x = {rss_4x / rss_1x:.2f})")
    print("(speedups: medians of the per-round ratios)")
    print(f"bench_pefs: tiny_speedup_vs_naive={median_ratio(tiny, 'ours', 'naive'):.2f} "
          f"speedup_vs_naive={median_ratio(big, 'ours', 'naive'):.2f} "
          f"fraction_of_floor={median_ratio(big, 'ours', 'floor'):.2f} peak_rss_mb={rss_4x:.0f}")


if __name__ == "__main__":
    main()
