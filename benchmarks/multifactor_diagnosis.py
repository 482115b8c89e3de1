"""Is an example's second factor in its per-example Fisher, and which step of NPEFF loses it? One step at a time.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/multifactor_diagnosis.py [--model pycode-4l]
      [--per-group 30] [--test-per-group 20] [--seeds 3] [--pair-share 0.05] [--nnz 16384 4096]
      [--rules one_class threshold eight_classes] [--set pefs.KEY=VALUE ...]

On a field dataset (strata of single factors and of pairs, as ``field_compare.py`` uses them) and the settings
``field_compare.py`` uses (the pipeline's, the zoo entry's label-free ones over them, ``--set`` over both),
two questions, both scored on the held-out examples that need two factors:

1. Representation. Each factor's mean D-PEF over the single-factor train examples is a component that names
   that factor, so a representation "holds" a pair if the example's D-PEF, written as the non-negative
   combination of the factor means closest to it (NNLS), puts its two factors on top. This is what a dictionary
   whose components were exactly the factors could read out; no method here does better than its representation
   lets it. Rows change one step of the pipeline at a time: the class rule (one class, the default threshold
   rule, eight classes), the per-example normalisation (raw, unit norm) and the sparsification (dense, the
   ``--nnz`` largest entries, normalised by the dense norm as the pipeline does). Single-factor held-out
   examples are scored too (top-1: the largest weight on their own factor), as a check that the means separate.
   The same readout of the activations the SAEs and k-means see (middle residual stream) tells whether the pair
   is easier to read there.
2. Solver. D-NPEFF and LRM-NPEFF at the pipeline's settings on the train split (multi-factor examples at most
   ``--pair-share`` of it, as ``field_compare.py --pair-share`` keeps them), scored as there (top-2 recall:
   the two largest components named by two different needed factors; factor AUC) and once more with each
   example's coefficients summed per factor name before taking the two largest (factor-merged top-2): a gap
   between the two says a factor was split over several components rather than missed.

Scores: top-2 recall and factor AUC (``npeff_tl.evaluation``), mean over ``--seeds`` (the fits only; the
representation rows have no seed).
Last line: multifactor_diagnosis: <row>_top2=<t> ... (held-out top-2 recall of every row).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.optimize
import torch

import npeff_tl as nt
from field_compare import with_rare_pairs  # the compositional split, as field_compare.py makes it
from npeff_tl.baselines.activations import hook_activations, middle_hook
from npeff_tl.evaluation import component_factors, factor_auc, factor_mass, multi_factor_recall
from npeff_tl.interventions import target_log_probs
from npeff_tl.pefs import per_example_grads
from npeff_tl.pefs.objectives import ClassLogProbs

RULES = {"one_class": nt.TopK(1), "threshold": None, "eight_classes": nt.TopK(8)}  # None: the pipeline's rule


def dense_dpefs(model, examples: nt.LabeledExamples, space: nt.ParamSpace, rule):
    """Blocks of (rows, dense D-PEFs [b, size]): sum over the rule's classes c of w_c (grad log p_c)^2."""
    logits = target_log_probs(model, examples.examples)
    selection = rule.select(logits, examples.examples.identity(torch.arange(len(examples))))
    weights = torch.where(selection.class_ids >= 0, selection.weights, 0.0)
    objective = ClassLogProbs(selection.class_ids.clamp(min=0), rule, weights.sqrt())
    for block in per_example_grads(model, examples.examples, space, objective, batch_size=4, progress=False):
        g = block.grads.double()
        yield range(block.start, block.stop), torch.einsum("bkn,bkn->bn", g, g)


def variants(dpef: torch.Tensor, nnz: list[int]) -> dict[str, torch.Tensor]:
    """The D-PEF rows as the pipeline's steps leave them: raw, unit norm, sparsified then unit (dense) norm."""
    norm = dpef.norm(dim=1, keepdim=True).clamp(min=1e-300)
    out = {"raw": dpef, "unit": dpef / norm}
    top = dpef.topk(min(max(nnz), dpef.shape[1]), dim=1)  # sorted: each nnz keeps a prefix
    for n in nnz:
        out[f"nnz{n}"] = torch.zeros_like(dpef).scatter_(1, top.indices[:, :n], top.values[:, :n]) / norm
    return out


def single_factor_rows(train: nt.LabeledExamples, factors: list[str]) -> tuple[list[int], torch.Tensor]:
    """The train examples with one factor, and the [n, n_factors] weights that average their rows per factor."""
    single = [i for i, f in enumerate(train.factors) if len(set(f)) == 1]
    of_factor = torch.tensor([factors.index(train.factors[i][0]) for i in single])
    onehot = torch.nn.functional.one_hot(of_factor, len(factors)).double()
    return single, onehot / onehot.sum(0).clamp(min=1)


def nnls_readout(gram: torch.Tensor, dots: torch.Tensor) -> torch.Tensor:
    """argmin_{w >= 0} ||M^T w - x||^2 per row, from gram = M M^T and dots = x M^T (NNLS on a Cholesky factor)."""
    scale = gram.diagonal().mean()
    L = torch.linalg.cholesky(gram / scale + 1e-12 * torch.eye(len(gram), dtype=torch.float64))
    y = torch.linalg.solve_triangular(L, dots.T / scale, upper=False).T
    return torch.tensor(np.stack([scipy.optimize.nnls(L.T.numpy(), row.numpy())[0] for row in y]))


def factor_readout(model, train, test, space, rule, nnz, factors: list[str]) -> dict[str, torch.Tensor]:
    """Per variant, NNLS weights [n_test, n_factors] of each held-out D-PEF on the factor means of the train split."""
    single, averaging = single_factor_rows(train, factors)
    means: dict[str, torch.Tensor] = {}
    for rows, dpef in dense_dpefs(model, train.subset(single), space, rule):
        for name, x in variants(dpef, nnz).items():
            means[name] = means.get(name, 0) + averaging[list(rows)].T @ x
    dots = {name: torch.empty(len(test), len(factors), dtype=torch.float64) for name in means}
    for rows, dpef in dense_dpefs(model, test, space, rule):
        for name, x in variants(dpef, nnz).items():
            dots[name][list(rows)] = x @ means[name].T
    return {name: nnls_readout(M @ M.T, dots[name]) for name, M in means.items()}


def activation_readout(model, train, test, factors: list[str]) -> dict[str, torch.Tensor]:
    """The same readout for the activations SAEs and k-means see (middle residual stream, target position): raw,
    and centred on the train mean (no labels)."""
    hook = middle_hook(model)
    single, averaging = single_factor_rows(train, factors)
    x_train = hook_activations(model, train.subset(single).examples, hook).double()
    x_test = hook_activations(model, test.examples, hook).double()
    out = {}
    for name, shift in (("raw", 0.0), ("centred", x_train.mean(0))):
        means = averaging.T @ (x_train - shift)
        out[name] = nnls_readout(means @ means.T, (x_test - shift) @ means.T)
    return out


def scores(W: torch.Tensor, test: nt.LabeledExamples, names: list[str | None], factors: list[str]) -> dict:
    """Top-2 recall and factor AUC on two-factor examples; top-1 accuracy on single-factor ones."""
    single = [i for i, f in enumerate(test.factors) if len(set(f)) == 1]
    top1 = sum(names[int(W[i].argmax())] == test.factors[i][0] for i in single) / len(single)
    return {"top2": multi_factor_recall(W, test.factors, names), "auc": factor_auc(W, test.factors, names, factors),
            "single_top1": top1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pycode-4l")
    parser.add_argument("--per-group", type=int, default=30)
    parser.add_argument("--test-per-group", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pair-share", type=float, default=0.05)
    parser.add_argument("--nnz", type=int, nargs="+", default=[16384, 4096])
    parser.add_argument("--rules", nargs="*", default=list(RULES), choices=list(RULES),
                        help="the class rules of the representation rows (default: all three; none: fits only)")
    parser.add_argument("--set", action="append", default=[], metavar="pefs.KEY=VALUE")
    args = parser.parse_args()
    config = nt.RunConfig().with_overrides([*nt.zoo.entry(args.model).label_free_settings, *args.set])
    model, data = nt.zoo.load(args.model, n_train=args.per_group, n_test=args.test_per_group)
    train = with_rare_pairs(nt.LabeledExamples.from_dataset(data["train"]), args.pair_share)
    test = nt.LabeledExamples.from_dataset(data["test"])
    factors = sorted({f for fs in train.factors + test.factors for f in fs})
    space = nt.ParamSpace(model, include=config.pefs.include, exclude=config.pefs.exclude)
    default_rule = config.pefs.class_rule()
    print(f"multifactor_diagnosis: {args.model}, {len(train)} train ({sum(len(set(f)) > 1 for f in train.factors)} "
          f"need two factors) / {len(test)} test ({sum(len(set(f)) > 1 for f in test.factors)}), factors "
          f"{factors}, {space.size:,} parameters, default classes {default_rule}")
    print(f"{'row':>34} {'top2':>8} {'auc':>8} {'single_top1':>12}")
    top2: dict[str, float] = {}

    def show(row: str, figures: dict) -> None:
        top2[row] = figures["top2"]
        print(f"{row:>34} " + " ".join(f"{figures[m]:{w}.3f}" for m, w in (("top2", 8), ("auc", 8),
                                                                            ("single_top1", 12))))

    started = time.perf_counter()
    for rule_name, rule in ((name, RULES[name]) for name in args.rules):
        weights = factor_readout(model, train, test, space, rule or default_rule, args.nnz, factors)
        for variant, W in weights.items():
            show(f"factor_means_{rule_name}_{variant}", scores(W, test, factors, factors))
    if args.rules:
        for variant, W in activation_readout(model, train, test, factors).items():
            show(f"factor_means_activations_{variant}", scores(W, test, factors, factors))
        print(f"  representations: {time.perf_counter() - started:.0f} s")

    started = time.perf_counter()
    target = nt.Target(classes=default_rule)
    for kind, method, solver in (("diagonal", "dnpeff", nt.DNPEFF), ("lowrank", "lrm_npeff", nt.LRMNPEFF)):
        nnz = min(config.pefs.nnz, space.size * (target.classes.max_classes if kind == "lowrank" else 1))
        pefs = nt.compute_pefs(model, train.examples, space, target, kind, nnz=nnz, progress=False)
        test_pefs = nt.compute_pefs(model, test.examples, space, target, kind, nnz=nnz, progress=False)
        rows = {"components": [], "merged": []}
        for seed in range(args.seeds):
            dec = solver(config.fit.n_components, seed=seed).fit(pefs, progress=False)
            names = component_factors(nt.NPEFFDictionary(model, dec, train, target, pefs, name=method))
            if seed == 0:
                print(f"  {method} components named by factor (seed 0): {names}")
            W = torch.as_tensor(dec.fit_coefficients(test_pefs, progress=False)).double()
            rows["components"].append(scores(W, test, names, factors))
            rows["merged"].append(scores(factor_mass(W, names, factors), test, factors, factors))
        for how, runs in rows.items():
            show(f"{method}_{how}", {m: sum(r[m] for r in runs) / len(runs) for m in runs[0]})
    print(f"  fits: {time.perf_counter() - started:.0f} s")
    print("multifactor_diagnosis: " + " ".join(f"{row}_top2={value:.3f}" for row, value in top2.items()))


if __name__ == "__main__":
    main()
