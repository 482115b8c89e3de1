"""NPEFF against the baselines on a zoo model: SAEs (two widths), gradient clustering, activation k-means.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/zoo_compare.py [--model tasks-2l] [--per-task 128]
      [--components 16] [--seeds 3] [--out DIR] [--no-selectivity]

Every method sees the same train examples (fit, and each component's strategy) and is scored on the same
held-out test examples. Settings are chosen on the train split only: SAEs at every residual-stream hook (each
layer's hook_resid_pre and the last hook_resid_post) and activation k-means at the same hooks, by mean train
AMI over seeds. NPEFF, gradient clustering and k-means get ``--components`` components; SAEs get that many
features and a wider dictionary. Test figures are the mean over seeds with the (min, max) spread; selectivity
(the interventions issue's definition, with random-direction controls for parameter-space methods) is measured
for seed 0 of each chosen setting.
Last line: zoo_compare: <method>_ami=<x> ... (test AMI, mean over seeds)
"""

from __future__ import annotations

import argparse
import time

import torch

import npeff_tl as nt
from npeff_tl.baselines import ActivationKMeans, GradientClustering, SAEDictionary, evaluate_sae, train_sae
from npeff_tl.baselines.activations import residual_hooks
from npeff_tl.comparison import compare, label_metrics, train_ami

METRICS = ("ami", "nmi", "purity_at_20", "best_match_f1", "multi_factor_recall")


def summary(rows: list[dict]) -> dict[str, str]:
    """'mean (min-max)' per metric over seeds."""
    out = {}
    for key in METRICS:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = f"{sum(values) / len(values):.3f} ({min(values):.3f}-{max(values):.3f})" if values else "n/a"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tasks-2l")
    parser.add_argument("--per-task", type=int, default=128)
    parser.add_argument("--components", type=int, default=16)
    parser.add_argument("--wide", type=int, default=256, help="the wider SAE's number of features")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--nnz", type=int, default=8192)
    parser.add_argument("--sae-steps", type=int, default=2000)
    parser.add_argument("--no-selectivity", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, data = nt.zoo.load(args.model, n_train=args.per_task, n_test=args.per_task)
    train = nt.LabeledExamples.from_dataset(data["train"])
    test = nt.LabeledExamples.from_dataset(data["test"])
    r, seeds = args.components, range(args.seeds)
    hooks = residual_hooks(model)
    print(f"zoo_compare: {args.model}, {len(train)} train / {len(test)} test examples, {r} components, "
          f"{args.seeds} seeds, {args.threads} threads")

    candidates: dict[str, list] = {}  # method -> dictionaries over seeds (the chosen setting)
    started = time.perf_counter()
    space = nt.ParamSpace(model, include=["blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*"])
    target = nt.Target("last", nt.TopK(4))
    for kind, solver in (("diagonal", nt.DNPEFF), ("lowrank", nt.LRMNPEFF)):
        pefs = nt.compute_pefs(model, train.examples, space, target, kind, nnz=args.nnz, progress=False)
        fits = [solver(r, seed=s, **({"max_iter": 1000} if kind == "diagonal" else {})).fit(pefs, progress=False)
                for s in seeds]
        candidates["dnpeff" if kind == "diagonal" else "lrm_npeff"] = [
            nt.NPEFFDictionary(model, dec, train, target, pefs) for dec in fits]
    print(f"  NPEFF: {time.perf_counter() - started:.0f} s")

    started = time.perf_counter()
    for width, k in ((r, 4), (args.wide, 8)):
        by_hook = {}
        for hook in hooks:
            saes = [train_sae(model, train, hook, width, k=k, steps=args.sae_steps, seed=s, progress=False) for s in seeds]
            by_hook[hook] = [SAEDictionary(model, sae, train, name=f"sae_{width}") for sae in saes]
        scores = {hook: sum(map(train_ami, ds)) / len(ds) for hook, ds in by_hook.items()}
        best = max(scores, key=scores.get)
        print(f"  sae_{width} (TopK k={k}): train AMI by hook " + ", ".join(f"{h} {v:.3f}" for h, v in scores.items())
              + f" -> {best}")
        for d in by_hook[best]:
            d.evaluation = evaluate_sae(model, d.sae, test)
        candidates[f"sae_{width}"] = by_hook[best]
    print(f"  SAEs: {time.perf_counter() - started:.0f} s")

    started = time.perf_counter()
    by_hook = {hook: [ActivationKMeans(model, train, hook, r, seed=s) for s in seeds] for hook in hooks}
    scores = {hook: sum(map(train_ami, ds)) / len(ds) for hook, ds in by_hook.items()}
    best = max(scores, key=scores.get)
    print("  activation k-means: train AMI by hook " + ", ".join(f"{h} {v:.3f}" for h, v in scores.items())
          + f" -> {best}")
    candidates["activation_kmeans"] = by_hook[best]
    candidates["gradient_clustering"] = [GradientClustering(model, train, r, seed=s) for s in seeds]
    print(f"  clusterings: {time.perf_counter() - started:.0f} s")

    print("\ntest split, mean over seeds (min-max):")
    print(f"{'method':>20} " + " ".join(f"{m:>22}" for m in METRICS))
    means = {}
    for name, ds in candidates.items():
        rows = [label_metrics(d, d.coefficients(test), test) for d in ds]
        means[name] = {m: sum(r[m] for r in rows if r[m] is not None) / max(1, sum(r[m] is not None for r in rows))
                       for m in METRICS}
        print(f"{name:>20} " + " ".join(f"{v:>22}" for v in summary(rows).values()))
    for name in ("sae_%d" % r, "sae_%d" % args.wide):
        evaluation = candidates[name][0].evaluation
        print(f"  {name} seed 0, SAE-Lens evals on test: " + ", ".join(f"{k} {v:.3f}" for k, v in evaluation.items()))

    if not args.no_selectivity:
        started = time.perf_counter()
        table = compare([ds[0] for ds in candidates.values()], test, selectivity=True, out=args.out, progress=False)
        print(f"\nseed 0 of each method, with selectivity ({time.perf_counter() - started:.0f} s):")
        columns = ["method", "ami", "purity_at_20", "multi_factor_recall", "median_selectivity",
                   "median_strategy_selectivity"]
        print(table[columns].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
        matched = [c for c in table.columns if c.startswith("matched_corr_")]
        print("\nmean matched coefficient correlation between methods (Hungarian):")
        print(table[["method", *matched]].dropna(subset=matched, how="all").to_string(
            index=False, float_format=lambda x: f"{x:.3f}"))
    print("zoo_compare: " + " ".join(f"{name}_ami={m['ami']:.3f}" for name, m in means.items()))


if __name__ == "__main__":
    main()
