"""Are NPEFF components causal? Coefficient and strategy selectivity on a zoo model, against random controls.

Run:  .venv/bin/python benchmarks/zoo_selectivity.py [--model tasks-2l] [--per-task 128] [--components 16] [--out DIR]

D-NPEFF and LRM-NPEFF are fitted to the PEFs of the train split (all attention and MLP weights, top-4 classes),
coefficients are fitted to the test split's PEFs, and ``measure_selectivity`` perturbs every component with its
magnitude set so that its 20 top test examples reach a mean KL of 0.5 nats (and 0.1), against 200 seeded test
examples (coefficient selectivity) and against the test examples of other strategies (strategy selectivity).
Controls: random directions of the same norms, over the space and on each component's support. A ratio of 1
means no selectivity.
Last line: zoo_selectivity: dnpeff=<median coefficient selectivity> dnpeff_strategy=<...> lrm=<...>
lrm_strategy=<...> random=<...> random_support=<...> (controls: the larger of their medians over both fits)
"""

from __future__ import annotations

import argparse
import time

import torch

import npeff_tl as nt


def matrix(result: nt.SelectivityResult, values: dict[str, torch.Tensor], method: str, fmt: str) -> str:
    strategy_of = {r["component"]: r["strategy"] for r in result.records if r["method"] == method}
    lines = [f"{'component':>22} " + " ".join(f"{s:>9}" for s in result.strategies)]
    for row, j in enumerate(result.components):
        cells = " ".join(format(float(v), fmt).rjust(9) for v in values[method][row])
        lines.append(f"{j:>3} ({strategy_of.get(j) or '-':>9})        {cells}")
    return "\n".join(lines)


def trace_ratio(pefs: nt.PEFs, coefficients: torch.Tensor, n_top: int) -> float:
    """Median over components of mean tr(F_i) over the top held-out examples / over the others: what a random
    direction's selectivity should be, since its expected KL on example i is ~ magnitude^2 tr(F_i) / (2 size)."""
    values = pefs.values.double()
    trace = values.sum(1) if isinstance(pefs, nt.DiagonalPEFs) else values.square().sum(1)  # kept entries
    ratios = []
    for j in range(coefficients.shape[1]):
        top = torch.zeros(len(trace), dtype=torch.bool)
        top[coefficients[:, j].topk(n_top).indices] = True
        ratios.append(float(trace[top].mean() / trace[~top].mean()))
    return float(torch.tensor(ratios).median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tasks-2l")
    parser.add_argument("--per-task", type=int, default=128, help="train and test examples per task")
    parser.add_argument("--components", type=int, default=16)
    parser.add_argument("--nnz", type=int, default=8192)
    parser.add_argument("--kl-targets", type=float, nargs="+", default=[0.5, 0.1],
                        help="mean KL on the top sets, nats; the first one drives the matrices")
    parser.add_argument("--out", default=None, help="save the selectivity results here")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, data = nt.zoo.load(args.model, n_train=args.per_task, n_test=args.per_task)
    train = nt.LabeledExamples.from_dataset(data["train"])
    test = nt.LabeledExamples.from_dataset(data["test"])
    space = nt.ParamSpace(model, include=["blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*"])
    target = nt.Target(classes=nt.TopK(4))
    print(f"zoo_selectivity: {args.model}, {len(train)} train / {len(test)} test examples, space {space.size:,}, "
          f"{args.components} components, {args.threads} threads")
    medians = {}
    for kind in ("diagonal", "lowrank"):
        start = time.perf_counter()
        pefs = nt.compute_pefs(model, train.examples, space, target, kind, nnz=args.nnz, progress=False)
        solver = (nt.DNPEFF(args.components, max_iter=1000, seed=0) if kind == "diagonal"
                  else nt.LRMNPEFF(args.components, seed=0))
        dec = solver.fit(pefs, progress=False)
        dictionary = nt.NPEFFDictionary(model, dec, train, target, pefs)
        coefficients = dictionary.coefficients(test)
        fitted = time.perf_counter() - start
        config = nt.SelectivityConfig(kl_targets=tuple(args.kl_targets))
        result = nt.measure_selectivity(dictionary, test, config=config, progress=False)
        method = result.settings["method"]
        print(f"\n== {method}: PEFs + fit {fitted:.1f} s, selectivity {time.perf_counter() - start - fitted:.1f} s")
        for kl_target in result.settings["kl_targets"]:
            for name, m in result.medians(kl_target).items():
                print(f"  KL target {kl_target}: {name:>14}  median selectivity {m['selectivity']:.4g}  "
                      f"median strategy selectivity {m['strategy_selectivity']:.4g}")
        left_out = sum(r[key] is False for r in result.records for key in ("calibrated_plus", "calibrated_minus"))
        print(f"  (component, sign, KL target) triples whose target was out of reach and left out: {left_out}")
        test_pefs = nt.compute_pefs(model, test.examples, space, target, kind, nnz=args.nnz, progress=False)
        print(f"  Fisher-trace ratio of the top sets (random directions should score about this): "
              f"median {trace_ratio(test_pefs, coefficients, result.settings['n_top']):.3g}")
        for name in result.methods:
            print(f"\n  {name}: mean KL per test strategy (KL target {result.settings['kl_targets'][0]})")
            print(matrix(result, result.kl_matrix, name, ".3g"))
            print(f"  {name}: accuracy drop per test strategy")
            print(matrix(result, result.accuracy_drop, name, ".2f"))
        if args.out:
            result.save(f"{args.out}/{method}")
        medians[method] = result.medians()
    d, l = medians["dnpeff"], medians["lrm_npeff"]
    controls = {c: max(medians[m][c]["selectivity"] for m in medians) for c in ("random", "random_support")}
    print(f"zoo_selectivity: dnpeff={d['dnpeff']['selectivity']:.4g} "
          f"dnpeff_strategy={d['dnpeff']['strategy_selectivity']:.4g} lrm={l['lrm_npeff']['selectivity']:.4g} "
          f"lrm_strategy={l['lrm_npeff']['strategy_selectivity']:.4g} random={controls['random']:.3g} "
          f"random_support={controls['random_support']:.3g}")


if __name__ == "__main__":
    main()
