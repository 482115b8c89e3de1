"""Throughput of compute_pefs against torch.func, a naive loop and a no-per-example floor, in one process.

Run:  .venv/bin/python benchmarks/bench_pefs.py [--threads N] [--quick] [--breakdown] [--device cuda] [--include GLOB]

Setting: diagonal PEFs, top-4 classes, nnz 65536 (capped at the space size), sequence length 32, batch 16,
MLP weights selected (``--include``: another selection, e.g. ``'blocks.0.mlp.W_*'``, the first block alone, whose
maps reach the loss at every position, so the last-block shortcut of D-PEFs does not apply). Models built from configs with random weights: "tiny" (2 layers, d_model 64; its space
is 65,536 parameters, so nnz is the whole space and nothing is selected or sorted) and "gpt2-width" (2 layers,
d_model 768, 12 heads, d_mlp 3072, d_vocab 50257; 9.4M parameters, of which the top 65,536 are kept).

Baselines (same process, same thread count, interleaved round by round: 5 rounds for tiny, 3 for gpt2-width;
each ratio is the median of the per-round ratios):
- vmap: ``torch.func.vmap`` over the batch's examples of ``torch.func.jacrev`` of the chosen classes'
  log-probs with respect to the selected parameters (``functional_call``; the classes and their probabilities
  from a no-grad pass first), then sum_c p_c g_c^2 and top-nnz: the per-example Fisher as torch.func writes it.
  Both of its passes unembed only the target position, as ours does.
- naive: per example, a batch-1 ``model(tokens)`` forward, then per class one ``torch.autograd.grad`` over the
  selected parameters (retain_graph), squared, weighted by p_c, summed, then top-nnz.
- floor: one batched forward (unembedding only the target position, as ours does) plus K batched backward
  passes of the per-class summed log-probs, weight gradients aggregated over the batch: no per-example
  separation, no top-k: what the gradients alone cost, computed the ordinary way.

Last line:
bench_pefs: tiny_vs_vmap=<a> tiny_fraction_of_floor=<b> speedup_vs_vmap=<c> fraction_of_floor=<d> speedup_vs_naive=<e> peak_rss_mb=<f>
(c, d, e, f for the gpt2-width model; f is the peak RSS of compute_pefs on 4x the examples, with the ratio to
the peak on 1x printed above it).

``--breakdown`` adds "gradients", timed and interleaved with the others: ours' per-example gradients and
diagonals of each batch alone (no norms, selection or storage): how far ours could get if the rest were free.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import warnings

import torch

import npeff_tl as nt
from npeff_tl.pefs.grads import as_examples, batch_grads, batch_target_logits
from npeff_tl.pefs.objectives import ClassLogProbs
from npeff_tl.pefs.workspace import Workspace

K, NNZ, SEQ, BATCH = 4, 65536, 32, 16


def build(width: str, device: str = "cpu", include: str = "blocks.*.mlp.W_*"):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    shapes = {
        "tiny": dict(d_model=64, d_head=16, n_heads=4, d_mlp=256, d_vocab=512),
        "gpt2-width": dict(d_model=768, d_head=64, n_heads=12, d_mlp=3072, d_vocab=50257),
    }[width]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cfg = HookedTransformerConfig(n_layers=2, n_ctx=SEQ, act_fn="gelu", normalization_type="LN", device=device,
                                      seed=0, **shapes)
        model = HookedTransformer(cfg).eval()
    space = nt.ParamSpace(model, include=include)
    return model, space


def now(model) -> float:
    """The time once the model's device has finished its queued work (CUDA runs asynchronously)."""
    if str(model.cfg.device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def tokens_for(model, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.cfg.d_vocab, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def ours(model, space, tokens) -> float:
    start = now(model)
    nt.compute_pefs(model, tokens, space, nt.Target("last", nt.TopK(K)), "diagonal", nnz=min(NNZ, space.size),
                    batch_size=BATCH, progress=False)
    return len(tokens) / (now(model) - start)


def naive(model, space, tokens) -> float:
    params = list(space.check_model(model).values())
    nnz = min(NNZ, space.size)
    start = now(model)
    for row in tokens.to(model.cfg.device):
        log_probs = model(row[None])[0, -1].log_softmax(-1)
        top = log_probs.detach().exp().topk(K)
        fisher = torch.zeros(space.size, device=log_probs.device)
        for p, c in zip(top.values, top.indices):
            grads = torch.autograd.grad(log_probs[c], params, retain_graph=True)
            fisher += p * torch.cat([g.reshape(-1) for g in grads]).square()
        fisher.topk(nnz)
    return len(tokens) / (now(model) - start)


def vmap(model, space, tokens) -> float:
    selected = {name: p.detach() for name, p in space.check_model(model).items()}
    nnz, last = min(NNZ, space.size), model.cfg.n_layers

    def target_logits(params, seqs):  # only the target (last) position is unembedded
        resid = torch.func.functional_call(model, params, (seqs,), {"stop_at_layer": last}, strict=False)
        return model.unembed(model.ln_final(resid[:, -1:]))[:, 0]

    def class_log_probs(params, seq, classes):
        return target_logits(params, seq[None])[0].log_softmax(-1)[classes]

    per_example = torch.func.vmap(torch.func.jacrev(class_log_probs), in_dims=(None, 0, 0))
    start = now(model)
    for first in range(0, len(tokens), BATCH):
        seqs = tokens[first : first + BATCH].to(model.cfg.device)
        with torch.no_grad():
            probs, classes = target_logits(selected, seqs).softmax(-1).topk(K)
        jacobians = per_example(selected, seqs, classes)  # name -> [b, K, *shape]
        fisher = torch.cat([(probs[:, :, None] * jacobians[name].flatten(2).square()).sum(1) for name in space.names],
                           dim=1)
        fisher.topk(nnz, dim=1)
    return len(tokens) / (now(model) - start)


def floor(model, space, tokens) -> float:
    adapter = nt.as_adapter(model)
    space.check_model(model)
    params = adapter.parameters_behind(space.names)  # the model's own tensors (a bridge shows views of them)
    examples = as_examples(tokens)
    start = now(model)
    for first in range(0, len(tokens), BATCH):
        index = torch.arange(first, min(first + BATCH, len(tokens)))
        log_probs = batch_target_logits(adapter, examples, index).log_softmax(-1)
        classes = log_probs.detach().topk(K).indices
        for k in range(K):
            torch.autograd.grad(log_probs.gather(1, classes[:, k : k + 1]).sum(), params, retain_graph=True)
    return len(tokens) / (now(model) - start)


def gradients(model, space, tokens) -> float:
    """Examples/s of the per-example gradients and D-PEF diagonals alone (breakdown of ours)."""
    adapter, examples, rule, workspace = nt.as_adapter(model), as_examples(tokens), nt.TopK(K), Workspace()
    start = now(model)
    for first in range(0, len(tokens), BATCH):
        index = torch.arange(first, min(first + BATCH, len(tokens)))

        def objective(logits):
            chosen = rule.select(logits, index)
            return ClassLogProbs(chosen.class_ids, rule, scale=chosen.weights.sqrt())

        pieces, _ = batch_grads(adapter, space, examples, index, objective, None, workspace=workspace, diagonal=True)
        for _ in pieces:  # each diagonal is computed when its turn comes
            pass
    return len(tokens) / (now(model) - start)


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
    parser.add_argument("--breakdown", action="store_true", help="also time ours' gradients alone")
    parser.add_argument("--device", default="cpu", help="where the models run (cuda: for the GPU check)")
    parser.add_argument("--include", default="blocks.*.mlp.W_*", help="the parameters selected (a ParamSpace glob)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else 5
    print(f"bench_pefs: torch {torch.__version__}, device {args.device}, {args.threads} threads, K={K}, nnz={NNZ}, "
          f"seq={SEQ}, batch={BATCH}, parameters {args.include}")
    fns = {"ours": ours, "vmap": vmap, "naive": naive, "floor": floor} | ({"gradients": gradients} if args.breakdown else {})

    model, space = build("tiny", args.device, args.include)
    tokens = tokens_for(model, 64 if args.quick else 256)
    tiny = interleaved_rates(fns, model, space, dict.fromkeys(fns, tokens), repeats)
    print("tiny:       " + "  ".join(f"{k} {v:8.1f} ex/s" for k, v in medians(tiny).items()))

    model, space = build("gpt2-width", args.device, args.include)
    n = BATCH if args.quick else 2 * BATCH
    ours(model, space, tokens_for(model, BATCH))  # warm-up
    rss_before = peak_rss_mb()
    ours(model, space, tokens_for(model, n, seed=1))
    rss_1x = peak_rss_mb()
    ours(model, space, tokens_for(model, 4 * n, seed=2))
    rss_4x = peak_rss_mb()
    big_tokens = dict.fromkeys(fns, tokens_for(model, n, seed=1))
    big_tokens["naive"] = tokens_for(model, BATCH // 2 if args.quick else BATCH, seed=1)
    big = interleaved_rates(fns, model, space, big_tokens, max(1, repeats - 2))
    print(f"gpt2-width: space {space.size:,} params; " + "  ".join(f"{k} {v:6.2f} ex/s" for k, v in medians(big).items()))
    print(f"gpt2-width: peak RSS {rss_before:.0f} MB after warm-up, {rss_1x:.0f} MB after {n} examples, "
          f"{rss_4x:.0f} MB after {4 * n} examples (4x / 1x = {rss_4x / rss_1x:.2f})")
    if args.breakdown:
        print("gradients alone as a fraction of the floor: "
              f"tiny {median_ratio(tiny, 'gradients', 'floor'):.2f}, gpt2-width {median_ratio(big, 'gradients', 'floor'):.2f}")
    print("(ratios: medians of the per-round ratios)")
    print(f"bench_pefs: tiny_vs_vmap={median_ratio(tiny, 'ours', 'vmap'):.2f} "
          f"tiny_fraction_of_floor={median_ratio(tiny, 'ours', 'floor'):.2f} "
          f"speedup_vs_vmap={median_ratio(big, 'ours', 'vmap'):.2f} "
          f"fraction_of_floor={median_ratio(big, 'ours', 'floor'):.2f} "
          f"speedup_vs_naive={median_ratio(big, 'ours', 'naive'):.2f} peak_rss_mb={rss_4x:.0f}")


if __name__ == "__main__":
    main()
