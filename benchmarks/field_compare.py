"""NPEFF against the baselines on equal terms, on the field model (a language model of Python code) or a zoo model.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/field_compare.py [--model pycode-4l]
      [--per-group 60] [--test-per-group 40] [--seeds 3] [--selectivity-components 8] [--out DIR]
      [--set pefs.KEY=VALUE ...]

Every method sees the same train examples and is scored on the same held-out examples (for the field model:
windows from held-out files, train and test from different files). Nothing is chosen with labels by default:
NPEFF runs at the pipeline's default settings (``npeff-tl config``) with the zoo entry's label-free settings
on top (``label_free_settings``: chosen on its train split by split-half stability) and ``--set`` over both,
SAEs and activation k-means look at the middle residual stream, and every method gets the same number of
components. Rows marked ``oracle_hook``
choose their hook among all residual-stream hooks by train-split AMI against the labels: an advantage NPEFF never
gets, shown for reference and never counted as a baseline. Label metrics are the mean over ``--seeds`` seeds
with the (min-max) spread. Selectivity (seed 0, the components with the most training mass, one KL target):
raw and normalised by the sets' Fisher-trace ratio, with random-direction controls.

``--pair-share F`` keeps at most a share F of the train examples from multi-factor strata (seeded; 0 keeps
none, so every held-out pair is one no method saw in training): the compositional test, where a method that
learned factors can still explain a pair by two components and a clustering cannot. The held-out split keeps
all its pairs.

Second-to-last line: multifactor: npeff_top2=<a> best_baseline_top2=<b> npeff_auc=<c> best_baseline_auc=<d>
unseen_pair_top2=<e> planted_top2=<f> (held-out examples needing two factors, components named by factor:
top-2 recall and factor AUC, NPEFF the better method, baselines the best label-free row; unseen: NPEFF's top-2
recall on the pairs absent from the train split; planted: the worse of D- and LRM-NPEFF on planted PEFs whose
held-out examples each use two planted components, ``tests/helpers/planted.py``).
Last line: field_compare: npeff_purity=<p> best_baseline_purity=<b> npeff_mf_recall=<m>
best_baseline_mf_recall=<n> npeff_norm_selectivity=<s> control_norm_selectivity=<c> field_loss=<l> bigram_loss=<g>
(NPEFF: the better of D-NPEFF and LRM-NPEFF per figure; baselines: the label-free rows; figures on the test
split; selectivity figures are medians over components, the control pooled over both NPEFF methods; the losses
are the model card's held-out nats per token, nan for a task model or a pretrained one: see heldout_loss.py.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import npeff_tl as nt
from npeff_tl.baselines import ActivationKMeans, GradientClustering, SAEDictionary, train_sae
from npeff_tl.baselines.activations import middle_hook, residual_hooks
from npeff_tl.evaluation import component_factors, multi_factor_recall
from npeff_tl.evaluation.metrics import label_metrics, train_ami
from npeff_tl.zoo import MODELS_DIR

METRICS = ("ami", "nmi", "purity_at_20", "best_match_f1", "multi_factor_recall", "multi_factor_recall_by_stratum",
           "factor_auc", "unseen_pair_recall")
NPEFF = ("dnpeff", "lrm_npeff")


def spread(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    return f"{sum(values) / len(values):.3f} ({min(values):.3f}-{max(values):.3f})" if values else "n/a"


def with_rare_pairs(train: nt.LabeledExamples, share: float, seed: int = 0) -> nt.LabeledExamples:
    """``train`` with at most a share ``share`` of examples needing two or more factors (a random subset of them)."""
    multi = [i for i, f in enumerate(train.factors) if len(set(f)) >= 2]
    single = [i for i, f in enumerate(train.factors) if len(set(f)) < 2]
    keep = int(share * len(single) / (1 - share)) if share < 1 else len(multi)
    chosen = torch.randperm(len(multi), generator=torch.Generator().manual_seed(seed))[:keep].tolist()
    return train.subset(sorted(single + [multi[i] for i in chosen]))


def unseen_pair_recall(dictionary, coefficients, test: nt.LabeledExamples) -> float | None:
    """Top-2 recall (components named by factor) on the held-out examples whose set of factors no train example
    has."""
    seen = {frozenset(f) for f in dictionary.train.factors}
    index = [i for i, f in enumerate(test.factors) if len(set(f)) >= 2 and frozenset(f) not in seen]
    if not index:
        return None
    return multi_factor_recall(torch.as_tensor(coefficients)[index], [test.factors[i] for i in index],
                               component_factors(dictionary))


def planted_top2() -> float:
    """The worse top-2 recall of D- and LRM-NPEFF on planted pairs (the test suite's planted compositional split)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from helpers.planted import pair_top2, planted_pairs

    recalls = []
    for kind, solver in (("diagonal", nt.DNPEFF(8, max_iter=2000, tol=1e-8, seed=0)),
                         ("lowrank", nt.LRMNPEFF(8, n_iters_g_only=50, n_iters_joint=1000, seed=0))):
        train, test, parts, pairs, _ = planted_pairs(0, kind)
        hits = pair_top2(solver.fit(train, progress=False), test, parts, pairs)[0]
        recalls.append(sum(hits) / len(hits))
    return min(recalls)


def mean(values: list[float | None]) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def npeff_selectivity(args, model, test, space, dictionaries, test_coefficients) -> tuple[dict, dict]:
    """Seed 0's selectivity of each NPEFF method's components with the most training mass, with controls: the
    median figures per method, and each control's median normalised selectivity pooled over both methods."""
    started = time.perf_counter()
    config = nt.SelectivityConfig(kl_targets=(args.kl_target,), n_baseline=min(200, len(test) - 20))
    traces = nt.fisher_traces(model, test.examples, space, config.trace_classes)  # shared by both NPEFF methods
    medians, controls = {}, {"random": [], "random_support": []}
    for method in NPEFF:
        d = dictionaries[method][0]
        mass = torch.as_tensor(d.train_coefficients).double().sum(0)
        components = mass.topk(min(args.selectivity_components, d.n_components)).indices.sort().values.tolist()
        result = nt.measure_selectivity(d, test, components=components, coefficients=test_coefficients[method][0],
                                        fisher_traces=traces, config=config, progress=False)
        if args.out:
            result.save(f"{args.out}/selectivity/{method}")
        medians[method] = result.medians()[method]
        for control in controls:
            controls[control] += [rec.get("norm_selectivity") for rec in result.records if rec["method"] == control]
        print(f"  {method} selectivity ({len(components)} components): "
              + json.dumps({k: round(v, 3) if v else v for k, v in result.medians()[method].items()}))
        for control in controls:
            print(f"    control {control}: "
                  + json.dumps({k: round(v, 3) if v else v for k, v in result.medians()[control].items()}))
    print(f"  selectivity: {time.perf_counter() - started:.0f} s")
    pooled = {c: float(torch.tensor([v for v in vs if v is not None]).median()) for c, vs in controls.items()}
    print("  controls pooled over both NPEFF methods, median normalised selectivity: " + json.dumps(pooled))
    return medians, pooled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pycode-4l")
    parser.add_argument("--per-group", type=int, default=60, help="train examples per task or stratum")
    parser.add_argument("--test-per-group", type=int, default=40, help="held-out examples per task or stratum")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--wide", type=int, default=128, help="the wider SAE's number of features")
    parser.add_argument("--sae-steps", type=int, default=1000)
    parser.add_argument("--selectivity-components", type=int, default=8,
                        help="NPEFF components measured for selectivity per method (0: skip the stage)")
    parser.add_argument("--kl-target", type=float, default=0.5)
    parser.add_argument("--no-oracle", action="store_true", help="skip the oracle-hook rows")
    parser.add_argument("--set", action="append", default=[], metavar="pefs.KEY=VALUE",
                        help="NPEFF settings other than the pipeline's defaults, as for npeff-tl (e.g. "
                             "--set pefs.nnz=16384); choose them without labels (docs/settings.md)")
    parser.add_argument("--out", default=None, help="save the seed-0 comparison table and selectivity here")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--pair-share", type=float, default=None,
                        help="keep at most this share of train examples from multi-factor strata (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = [*nt.zoo.entry(args.model).label_free_settings, *args.set]
    defaults = nt.RunConfig().with_overrides(settings)
    model, data = nt.zoo.load(args.model, n_train=args.per_group, n_test=args.test_per_group)
    train = nt.LabeledExamples.from_dataset(data["train"])
    test = nt.LabeledExamples.from_dataset(data["test"])
    if args.pair_share is not None:
        if not 0 <= args.pair_share < 1:
            parser.error(f"--pair-share must be in [0, 1), got {args.pair_share}")
        train = with_rare_pairs(train, args.pair_share)
    r, seeds = defaults.fit.n_components, range(args.seeds)
    space = nt.ParamSpace(model, include=defaults.pefs.include, exclude=defaults.pefs.exclude)
    target = nt.Target(classes=defaults.pefs.class_rule())
    hook, oracle_hooks = middle_hook(model), ([] if args.no_oracle else residual_hooks(model))
    print(f"field_compare: {args.model}, {len(train)} train / {len(test)} test examples in "
          f"{len(set(train.labels))} groups, {r} components, {args.seeds} seeds, {args.threads} threads; NPEFF on "
          f"{space.size:,} parameters, classes {target.classes}, nnz {defaults.pefs.nnz} (settings over the "
          f"pipeline's: {settings or 'none'}); label-free hook {hook}")

    dictionaries: dict[str, list] = {}  # method -> one dictionary per seed
    test_coefficients: dict[str, list] = {}
    started = time.perf_counter()
    for kind, method, solver in (("diagonal", "dnpeff", nt.DNPEFF), ("lowrank", "lrm_npeff", nt.LRMNPEFF)):
        nnz = min(defaults.pefs.nnz, space.size * (target.classes.max_classes if kind == "lowrank" else 1))
        pefs = nt.compute_pefs(model, train.examples, space, target, kind, nnz=nnz, answers=train.answers,
                               progress=False)
        test_pefs = nt.compute_pefs(model, test.examples, space, target, kind, nnz=nnz, progress=False)
        fits = [solver(r, seed=s).fit(pefs, progress=False) for s in seeds]
        dictionaries[method] = [nt.NPEFFDictionary(model, dec, train, target, pefs, name=method) for dec in fits]
        test_coefficients[method] = [dec.fit_coefficients(test_pefs, progress=False) for dec in fits]
        print(f"  {method}: PEFs and {args.seeds} fits in {time.perf_counter() - started:.0f} s")

    started = time.perf_counter()
    for width, k in ((r, 4), (args.wide, 8)):
        def saes(hook_name, name):
            return [SAEDictionary(model, train_sae(model, train, hook_name, width, k=k, steps=args.sae_steps, seed=s,
                                                   progress=False), train, name=name) for s in seeds]

        dictionaries[f"sae_{width}"] = saes(hook, f"sae_{width}")
        if oracle_hooks:
            by_hook = {h: saes(h, f"sae_{width}_oracle_hook") for h in oracle_hooks}
            best = max(by_hook, key=lambda h: mean([train_ami(d) for d in by_hook[h]]))
            dictionaries[f"sae_{width}_oracle_hook"] = by_hook[best]
            print(f"  sae_{width}_oracle_hook: {best} (label-free: {hook})")
    print(f"  SAEs: {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    dictionaries["gradient_clustering"] = GradientClustering.for_seeds(model, train, r, list(seeds))  # one sketch
    dictionaries["activation_kmeans"] = [ActivationKMeans(model, train, hook, r, seed=s) for s in seeds]
    if oracle_hooks:
        by_hook = {h: [ActivationKMeans(model, train, h, r, seed=s, name="activation_kmeans_oracle_hook")
                       for s in seeds] for h in oracle_hooks}
        best = max(by_hook, key=lambda h: mean([train_ami(d) for d in by_hook[h]]))
        dictionaries["activation_kmeans_oracle_hook"] = by_hook[best]
        print(f"  activation_kmeans_oracle_hook: {best}")
    print(f"  clusterings: {time.perf_counter() - started:.0f} s")

    print(f"\ntest split ({len(test)} examples), mean over {args.seeds} seeds (min-max):")
    print(f"{'method':>30} " + " ".join(f"{m:>22}" for m in METRICS))
    figures: dict[str, dict[str, float]] = {}
    for name, ds in dictionaries.items():
        coefficients = test_coefficients.get(name) or [d.coefficients(test) for d in ds]
        rows = [{**label_metrics(d, W, test), "unseen_pair_recall": unseen_pair_recall(d, W, test)}
                for d, W in zip(ds, coefficients)]
        figures[name] = {m: mean([row[m] for row in rows]) for m in METRICS}
        print(f"{name:>30} " + " ".join(f"{spread([row[m] for row in rows]):>22}" for m in METRICS))

    medians, pooled = ({m: {"norm_selectivity": None} for m in NPEFF}, {"random": float("nan")})
    if args.selectivity_components > 0:
        medians, pooled = npeff_selectivity(args, model, test, space, dictionaries, test_coefficients)

    card = MODELS_DIR / args.model / "card.json"  # trained entries only (a pretrained one has no card: nan)
    losses = json.loads(card.read_text()).get("heldout_loss_per_token", {}) if card.is_file() else {}
    baselines = [name for name in dictionaries if name not in NPEFF and not name.endswith("oracle_hook")]
    line = {
        "npeff_purity": max(figures[m]["purity_at_20"] for m in NPEFF),
        "best_baseline_purity": max(figures[b]["purity_at_20"] for b in baselines),
        "npeff_mf_recall": max(figures[m]["multi_factor_recall"] for m in NPEFF),
        "best_baseline_mf_recall": max(figures[b]["multi_factor_recall"] for b in baselines),
        "npeff_norm_selectivity": max(medians[m]["norm_selectivity"] or float("nan") for m in NPEFF),
        "control_norm_selectivity": pooled["random"],
        "field_loss": losses.get("model", float("nan")),
        "bigram_loss": losses.get("bigram", float("nan")),
    }
    def best(figure: str, methods) -> float:
        return max((figures[m][figure] for m in methods if figures[m][figure] == figures[m][figure]), default=math.nan)

    print(f"multifactor: npeff_top2={best('multi_factor_recall', NPEFF):.4g} "
          f"best_baseline_top2={best('multi_factor_recall', baselines):.4g} "
          f"npeff_auc={best('factor_auc', NPEFF):.4g} best_baseline_auc={best('factor_auc', baselines):.4g} "
          f"unseen_pair_top2={best('unseen_pair_recall', NPEFF):.4g} planted_top2={planted_top2():.4g}")
    print("field_compare: " + " ".join(f"{k}={v:.4g}" for k, v in line.items()))


if __name__ == "__main__":
    main()
