"""Does AtP* rank a component's nodes like exact activation patching, and how much faster is it?

Run:  .venv/bin/python benchmarks/bench_trace.py [--model tasks-2l] [--per-task 64] [--components 16] [--top 20]
      [--include GLOB ...] [--traced N] [--window N]
      The real model (exact patching of every head at every position costs one forward pass per node):
      .venv/bin/python benchmarks/bench_trace.py --model smollm2-135m --per-task 4 --components 8 --traced 2
      --top 3 --window 16 --include 'blocks.5.mlp.W_*' 'blocks.11.mlp.W_*' 'blocks.17.mlp.W_*' ...

D-NPEFF and LRM-NPEFF are fitted to the PEFs of the train split (``--include``: all attention and MLP weights by
default; top-4 classes). For every component (``--traced N``: the N with the most training mass): its ``--top``
test examples by coefficient (``--window N``: each cut to its last N tokens, the target last), the magnitude at
which its intervention moves them by a mean KL of 0.5 nats (sign +1), and three traces of that intervention over
every head output, MLP output and residual-stream node at every position up to the target: exact patching (the
ground truth), AtP and AtP*.
``--metric logprob`` traces the change of the original answer's log-probability instead of the KL.
Per component: Spearman correlation of mean |effect| over all head and MLP nodes x positions, and the recall of
exact patching's top 10 nodes among the estimate's top 20; time of exact patching / time of AtP* (same examples,
same process, one after the other). Figures are medians over components of both fits.
For the components whose top training examples are mostly induction it also prints the heads and positions
their exact traces route through on the induction examples among their top test examples, noising and
denoising (see RESULTS.md).
Last line: bench_trace: atpstar_spearman=<s> atpstar_top10_recall=<r> atp_spearman=<a> speedup_vs_patching=<x>
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import npeff_tl as nt
from npeff_tl.tracing import agreement, trace

KL_TARGET = 0.5


def calibrated(dictionary, j: int, probe: nt.KLProbe) -> float | None:
    start, limit = dictionary.magnitude_bounds(j)
    mean_kl = lambda m: float(probe.run(dictionary.intervention(j, m, 1))[0].mean())  # noqa: E731
    m, _, reached = nt.calibrate_magnitude(mean_kl, KL_TARGET, start, limit=limit)
    return m if reached else None


def describe(tr, k: int = 5) -> str:
    return ", ".join(f"{row['node']}@-{row['offset']} {row['effect']:.3g}" for row in tr.top_nodes(k))


def windowed(examples: nt.Examples, window: int | None) -> nt.Examples:
    """Each example as its own sequence of (at most) its last ``window`` tokens up to the target."""
    if window is None:
        return examples
    return nt.Examples.from_tokens([examples.tokens[s, max(0, int(p) - window + 1):int(p) + 1].tolist()
                                    for s, p in zip(examples.seq_index.tolist(), examples.position.tolist())])


def induction_routes(model, examples: nt.Examples, labels: list[str], exact) -> str | None:
    """On the induction examples among ``examples`` (the last token occurred before, at position j), per head: the
    effect of each layer-1 head at the target and its attention to j + 1 (the token after the earlier
    occurrence); the effect of each layer-0 head at j + 1, the share of its |effect| that sits there, and its
    attention from j + 1 to j (a previous-token head) and to itself."""
    layer1, layer0, share, attend1, attend0, attend_self = [], [], [], [], [], []
    for i, label in enumerate(labels):
        if label != "induction":
            continue
        seq, t = examples.tokens[examples.seq_index[i]], int(examples.position[i])
        earlier = torch.nonzero(seq[:t] == seq[t]).flatten()
        if len(earlier) == 0 or int(earlier[-1]) + 1 >= t:
            continue
        j = int(earlier[-1])
        effects = exact.per_example["attn.hook_z"][i]  # [layer, head, offset]
        layer1.append(effects[1, :, 0])
        layer0.append(effects[0, :, t - (j + 1)])
        share.append(effects[0, :, t - (j + 1)].abs() / effects[0].abs().nansum(-1).clamp(min=1e-300))
        _, cache = model.run_with_cache(seq[None, : t + 1])
        attend1.append(cache["blocks.1.attn.hook_pattern"][0, :, t, j + 1])
        attend0.append(cache["blocks.0.attn.hook_pattern"][0, :, j + 1, j])
        attend_self.append(cache["blocks.0.attn.hook_pattern"][0, :, j + 1, j + 1])
    if not layer1:
        return None
    n = len(share)
    vector = lambda values, f: "[" + " ".join(format(float(v), f) for v in values) + "]"  # noqa: E731
    layer1, layer0, share = torch.stack(layer1).mean(0), torch.stack(layer0).mean(0), torch.stack(share).mean(0)
    attend1, attend0 = torch.stack(attend1).mean(0), torch.stack(attend0).mean(0)
    attend_self = torch.stack(attend_self).mean(0)
    return (f"{n} induction examples, total effect {float(exact.total.mean()):.3g}; per head: layer 1 at the target: "
            f"effect {vector(layer1, '.3g')}, attention to the token after the earlier occurrence "
            f"{vector(attend1, '.2f')}; layer 0 at that token: effect {vector(layer0, '.3g')} (share of each head's "
            f"|effect| over all positions {vector(share, '.2f')}), attention to the previous token "
            f"{vector(attend0, '.2f')}, to itself {vector(attend_self, '.2f')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tasks-2l")
    parser.add_argument("--per-task", type=int, default=64, help="train and test examples per task")
    parser.add_argument("--components", type=int, default=16)
    parser.add_argument("--top", type=int, default=20, help="test examples traced per component")
    parser.add_argument("--nnz", type=int, default=8192)
    parser.add_argument("--include", nargs="+", default=["blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*"],
                        help="the parameters of the PEFs (TL name globs)")
    parser.add_argument("--traced", type=int, default=None, help="trace only the N components with most mass")
    parser.add_argument("--window", type=int, default=None, help="cut each traced example to its last N tokens")
    parser.add_argument("--metric", default="kl", choices=["kl", "logprob"], help="what the traces measure")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, data = nt.zoo.load(args.model, n_train=args.per_task, n_test=args.per_task)
    train = nt.LabeledExamples.from_dataset(data["train"])
    test = nt.LabeledExamples.from_dataset(data["test"])
    space = nt.ParamSpace(model, include=args.include)
    target = nt.Target(classes=nt.TopK(4))
    print(f"bench_trace: {args.model}, {len(train)} train / {len(test)} test examples, {args.components} components "
          f"per fit ({args.traced or 'all'} traced), top {args.top} test examples each (window: "
          f"{args.window or 'whole'}), {space.size:,} parameters, KL target {KL_TARGET}, metric {args.metric}, "
          f"{args.threads} threads")
    rows = []
    for kind in ("diagonal", "lowrank"):
        pefs = nt.compute_pefs(model, train.examples, space, target, kind, nnz=args.nnz, progress=False)
        solver = (nt.DNPEFF(args.components, max_iter=1000, seed=0) if kind == "diagonal"
                  else nt.LRMNPEFF(args.components, seed=0))
        dictionary = nt.NPEFFDictionary(model, solver.fit(pefs, progress=False), train, target, pefs)
        coefficients = dictionary.coefficients(test)
        print(f"\n== {dictionary.name}")
        mass = dictionary.train_coefficients.double().sum(0)
        traced = mass.topk(min(args.traced or dictionary.n_components, dictionary.n_components)).indices.sort().values
        for j in traced.tolist():
            top = coefficients[:, j].topk(args.top).indices
            examples = windowed(test.examples.subset(top), args.window)
            magnitude = calibrated(dictionary, j, nt.KLProbe(model, examples))
            strategy = statistics.mode([train.labels[i] for i in dictionary.top_examples(j).tolist()])
            if magnitude is None:
                print(f"  {j:>2} ({strategy}): KL target out of reach; left out")
                continue
            traces, seconds = {}, {}
            for method in ("patching", "atp", "atp*"):
                start = time.perf_counter()
                traces[method] = trace(model, dictionary.intervention(j, magnitude, 1), examples, method=method,
                                       metric=args.metric, progress=False)
                seconds[method] = time.perf_counter() - start
            star, plain = agreement(traces["patching"], traces["atp*"]), agreement(traces["patching"], traces["atp"])
            rows.append({"fit": dictionary.name, "component": j, "strategy": strategy, "star": star, "atp": plain,
                         "speedup": seconds["patching"] / seconds["atp*"]})
            print(f"  {j:>2} ({strategy:>9}): AtP* spearman {star['spearman']:.3f} recall {star['recall']:.2f} | "
                  f"AtP spearman {plain['spearman']:.3f} recall {plain['recall']:.2f} | patching "
                  f"{seconds['patching']:.2f} s, AtP* {seconds['atp*']:.2f} s, AtP {seconds['atp']:.2f} s")
            print(f"      exact: {describe(traces['patching'])}")
            routes = (induction_routes(model, examples, [test.labels[i] for i in top.tolist()], traces["patching"])
                      if strategy == "induction" and model.cfg.n_layers == 2 else None)  # the two-layer task models
            if routes:
                print(f"      routes (noising): {routes}")
                restored = trace(model, dictionary.intervention(j, magnitude, 1), examples, method="patching",
                                 metric=args.metric, direction="denoising", progress=False)
                print(f"      denoising (exact): {describe(restored)}")
                print(f"      routes (denoising): "
                      f"{induction_routes(model, examples, [test.labels[i] for i in top.tolist()], restored)}")
            if plain["recall"] < star["recall"] or plain["spearman"] < star["spearman"] - 0.05:
                print(f"      AtP:   {describe(traces['atp'])}")
            print("      heat map (resid_post, layer x offset 0..): "
                  + " | ".join(" ".join(f"{v:.2g}" for v in row[:8].tolist()) for row in traces["patching"].heatmap()))
    med = lambda values: statistics.median(values)  # noqa: E731
    print(f"\n{len(rows)} components traced; medians over them:")
    print(f"bench_trace: atpstar_spearman={med([r['star']['spearman'] for r in rows]):.3f} "
          f"atpstar_top10_recall={med([r['star']['recall'] for r in rows]):.2f} "
          f"atp_spearman={med([r['atp']['spearman'] for r in rows]):.3f} "
          f"speedup_vs_patching={med([r['speedup'] for r in rows]):.1f}")


if __name__ == "__main__":
    main()
