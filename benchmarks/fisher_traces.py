"""Which Fisher trace predicts how far a random parameter step moves a set of examples? (the normaliser of
normalised selectivity)

Run:  .venv/bin/python benchmarks/fisher_traces.py [--model pycode-4l] [--per-group 10] [--directions 24]

For a random step u of norm m over a parameter space of size P, the expected KL on example i is about
m^2 tr(F_i) / (2 P), F_i being the Fisher of the whole predictive distribution. So the ratio of two sets'
mean KL (averaged over random directions) should be the ratio of their mean traces. Per example group (task
or label stratum) vs all other examples, this prints the mean-KL ratio over ``--directions`` random steps (in
the quadratic regime) and, per class rule, (trace ratio) / (KL ratio): 1 is a perfect prediction. Rules: the
top 4 classes (what PEFs usually keep), the top 4 plus 12 draws from the tail (``TopKWithTail``, the default
normaliser), 16 plain draws (``Sampled``), and on a small vocabulary the exact Fisher (every class).
Last line: fisher_traces: <rule>=<median over groups of |log(trace ratio / KL ratio)|> ...
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import npeff_tl as nt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pycode-4l")
    parser.add_argument("--per-group", type=int, default=10, help="held-out examples per task or stratum")
    parser.add_argument("--directions", type=int, default=24)
    parser.add_argument("--magnitude", type=float, default=None,
                        help="step norm (default: 1e-3 of the space's parameter norm, well inside the quadratic regime)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, data = nt.zoo.load(args.model, n_train=1, n_test=args.per_group)
    test = nt.LabeledExamples.from_dataset(data["test"])
    space = nt.ParamSpace(model, include=nt.RunConfig().pefs.include)
    rules = {"top4": nt.TopK(4), "top4_tail12": nt.TopKWithTail(4, 12), "sampled16": nt.Sampled(16)}
    if model.cfg.d_vocab <= 64:
        rules["exact"] = nt.TopK(model.cfg.d_vocab)
    magnitude = args.magnitude or 1e-3 * float(space.gather(nt.as_adapter(model)).double().norm())
    print(f"fisher_traces: {args.model}, {len(test)} held-out examples, {space.size:,} parameters, "
          f"{args.directions} random steps of norm {magnitude:.3g}")
    traces = {}
    for name, rule in rules.items():
        start = time.perf_counter()
        traces[name] = nt.fisher_traces(model, test.examples, space, rule, batch_size=8)
        print(f"  {name}: {1000 * (time.perf_counter() - start) / len(test):.0f} ms per example")
    kl = torch.stack([nt.kl_divergence(model, test.examples, nt.perturb(
        model, nt.random_direction(space, seed=seed), space, magnitude)) for seed in range(args.directions)]).mean(0)
    errors = {name: [] for name in rules}
    print(f"\n{'group':>24} {'KL ratio':>9} " + " ".join(f"{name:>12}" for name in rules))
    for group in dict.fromkeys(test.labels):
        inside = torch.tensor([label == group for label in test.labels])
        kl_ratio = float(kl[inside].mean() / kl[~inside].mean())
        cells = []
        for name, t in traces.items():
            relative = float(t[inside].mean() / t[~inside].mean()) / kl_ratio
            errors[name].append(abs(math.log(relative)))
            cells.append(f"{relative:>12.3f}")
        print(f"{group:>24} {kl_ratio:>9.3f} " + " ".join(cells))
    print("(columns after the KL ratio: trace ratio / KL ratio per rule; 1 = the trace predicts the KL exactly)")
    print("fisher_traces: " + " ".join(f"{name}={float(torch.tensor(e).median()):.3f}" for name, e in errors.items()))


if __name__ == "__main__":
    main()
