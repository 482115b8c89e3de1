"""How NPEFF's alignment with the labels moves with its settings: nnz, number of components, class rule and
parameter group, one factor at a time around the pipeline's defaults, for D-NPEFF and LRM-NPEFF.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/settings_study.py [--model pycode-4l]
      [--per-group 60] [--test-per-group 40] [--seed 0] [--factors rule nnz ...] [--include PATTERN ...]
      [--base-rule 'threshold(0.05, max 8)']

Each setting is scored on the train split (the examples the decomposition was fitted to: what a user may choose
on) and on the held-out test split (what is reported): AMI, purity@20 and multi-factor recall; on the train split
also split-half stability, the label-free score (``nt.split_half_stability``: two fits to random halves of the
train PEFs, their components paired by the correlation of their coefficients over all train examples); on the test split
also the median normalised selectivity of the components with the most training mass (0.5 nats on their top
20 held-out examples against 200 others, divided by the sets' Fisher-trace ratio; no controls, which
field_compare.py runs: they sit at 1 by construction). By default the number of
components is given as a multiple of the number of label groups, which uses the labels: those rows are an
oracle view, never a default; ``--components 8 16 32`` states the numbers without labels. D-PEFs are
computed once at the largest nnz and truncated (their entries are sorted by value, so a prefix is the smaller
sparsification); low-rank PEFs are computed per nnz. Per method
and factor, the value with the best train purity@20 (chosen with the labels) is marked with '*', the one with the
best split-half stability (chosen without them) with '+'. ``--include`` replaces the parameter-group factor by one
stated group (for a model whose every layer does not fit the time).
Last line: settings_study: <method>.<factor>=<value chosen on train by purity> ...
<method>.<factor>.label_free=<value chosen on train by stability> ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import torch

import npeff_tl as nt
from npeff_tl.evaluation.metrics import label_metrics

METRICS = ("ami", "purity_at_20", "multi_factor_recall")
GROUPS = {"attn+mlp": ["blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*"], "attn": ["blocks.*.attn.W_[QKVO]"],
          "mlp": ["blocks.*.mlp.W_*"]}
RULES = {"top_k(1)": nt.TopK(1), "top_k(2)": nt.TopK(2), "top_k(4)": nt.TopK(4),
         "threshold(0.05, max 8)": nt.Threshold(0.05, max_k=8), "sampled(8)": nt.Sampled(8), "top_k(4)+tail(12)": nt.TopKWithTail(4, 12)}
SOLVERS = {"diagonal": ("dnpeff", nt.DNPEFF), "lowrank": ("lrm_npeff", nt.LRMNPEFF)}  # by PEF kind


@dataclasses.dataclass(frozen=True)
class Setting:
    nnz: int = 4096
    components: int = 16
    rule: str = "top_k(4)"
    group: str = "attn+mlp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pycode-4l")
    parser.add_argument("--per-group", type=int, default=60)
    parser.add_argument("--test-per-group", type=int, default=40)
    parser.add_argument("--nnz", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--selectivity-components", type=int, default=4, help="0: skip selectivity")
    parser.add_argument("--json", default=None, help="also write every row here")
    parser.add_argument("--methods", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--factors", nargs="+", default=["nnz", "components", "rule", "group"],
                        choices=["nnz", "components", "rule", "group"], help="the settings to move (default: all)")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--base-rule", default="top_k(4)", choices=list(RULES), help="the rule the other factors use")
    parser.add_argument("--include", nargs="+", default=None,
                        help="one stated parameter group (patterns) instead of the group factor's three")
    parser.add_argument("--components", type=int, nargs="+", default=None,
                        help="numbers of components to try, stated without labels (default: 1, 2 and 4 per label "
                             "group, an oracle view)")
    parser.add_argument("--no-stability", action="store_true", help="skip the split-half stability (two more fits)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    defaults = nt.RunConfig()
    groups = {"given": args.include} if args.include else GROUPS
    base = Setting(nnz=defaults.pefs.nnz, components=defaults.fit.n_components, rule=args.base_rule,
                   group="given" if args.include else "attn+mlp")
    model, data = nt.zoo.load(args.model, n_train=args.per_group, n_test=args.test_per_group)
    train = nt.LabeledExamples.from_dataset(data["train"])
    test = nt.LabeledExamples.from_dataset(data["test"])
    n_groups = len(set(train.labels))
    factors = {
        "nnz": [dataclasses.replace(base, nnz=n) for n in args.nnz],
        "components": [dataclasses.replace(base, components=c)
                       for c in (args.components or [m * n_groups for m in (1, 2, 4)])],
        "rule": [dataclasses.replace(base, rule=r) for r in args.rules],
        "group": [dataclasses.replace(base, group=g) for g in groups],
    }
    factors = {name: settings for name, settings in factors.items() if name in args.factors}
    print(f"settings_study: {args.model}, {len(train)} train / {len(test)} test examples in {n_groups} groups, "
          f"seed {args.seed}; defaults {base}")
    pefs_cache: dict[tuple, tuple] = {}
    traces_cache: dict[str, torch.Tensor] = {}
    selectivity_config = nt.SelectivityConfig(kl_targets=(0.5,), n_baseline=min(200, len(test) - 20), controls=())

    def norm_selectivity(dictionary, setting: Setting, coefficients) -> float | None:
        """Median normalised selectivity (test split) of the components with the most training mass."""
        if args.selectivity_components == 0:
            return None
        if setting.group not in traces_cache:
            traces_cache[setting.group] = nt.fisher_traces(model, test.examples, dictionary.space,
                                                           selectivity_config.trace_classes)
        mass = torch.as_tensor(dictionary.train_coefficients).double().sum(0)
        top = mass.topk(min(args.selectivity_components, len(mass))).indices.sort().values.tolist()
        result = nt.measure_selectivity(dictionary, test, components=top, coefficients=coefficients,
                                        fisher_traces=traces_cache[setting.group], config=selectivity_config,
                                        progress=False)
        return result.medians()[dictionary.name]["norm_selectivity"]

    def pefs_for(setting: Setting, kind: str):
        """(train PEFs, test PEFs, target) of a setting; D-PEFs computed once at the largest nnz, then truncated."""
        space = nt.ParamSpace(model, include=groups[setting.group])
        target = nt.Target(classes=RULES[setting.rule])
        joint = space.size * (target.classes.max_classes if kind == "lowrank" else 1)
        nnz = min(setting.nnz, joint)
        stored = min(max(args.nnz), joint) if kind == "diagonal" else nnz
        key = (kind, setting.rule, setting.group, stored)
        if key not in pefs_cache:
            start = time.perf_counter()
            pefs_cache[key] = tuple(nt.compute_pefs(model, split.examples, space, target, kind, nnz=stored,
                                                    answers=split.answers, progress=False) for split in (train, test))
            print(f"  {kind} PEFs, {setting.rule}, {setting.group}, nnz {stored}: {time.perf_counter() - start:.0f} s")
        train_pefs, test_pefs = pefs_cache[key]
        if kind == "diagonal" and nnz < stored:
            train_pefs, test_pefs = (dataclasses.replace(p, values=p.values[:, :nnz], indices=p.indices[:, :nnz])
                                     for p in (train_pefs, test_pefs))
        return train_pefs, test_pefs, target

    chosen, table = {}, []
    for kind, (method, solver) in ((k, SOLVERS[k]) for k in args.methods):
        print(f"\n{method}: {'factor':>10} {'value':>24}  " + " ".join(f"train {m:>20}" for m in METRICS) + "  "
              + f"{'train stability':>16}  " + " ".join(f"test {m:>21}" for m in METRICS)
              + f"  {'test norm. sel.':>15}  {'fit s':>6}")
        scores: dict[Setting, dict] = {}
        for factor, settings in factors.items():
            rows = []
            for setting in settings:
                if setting not in scores:
                    train_pefs, test_pefs, target = pefs_for(setting, kind)
                    start = time.perf_counter()
                    dec = solver(setting.components, seed=args.seed).fit(train_pefs, progress=False)
                    seconds = time.perf_counter() - start
                    dictionary = nt.NPEFFDictionary(model, dec, train, target, train_pefs, name=method)
                    test_coefficients = dec.fit_coefficients(test_pefs, progress=False)
                    stability = None if args.no_stability else nt.split_half_stability(
                        solver(setting.components, seed=args.seed), train_pefs, seed=args.seed).coefficient_correlation
                    scores[setting] = {
                        "train": label_metrics(dictionary, dec.W, train),
                        "stability": stability,
                        "test": label_metrics(dictionary, test_coefficients, test),
                        "norm_selectivity": norm_selectivity(dictionary, setting, test_coefficients),
                        "seconds": seconds,
                        "iterations": dec.losses[-1]["iteration"] if dec.losses else None}
                    table.append({"method": method, **dataclasses.asdict(setting), **scores[setting]})
                    if args.json:  # after every setting, so an interrupted study keeps what it measured
                        pathlib.Path(args.json).write_text(json.dumps(table, indent=1))
                rows.append((setting, scores[setting]))
            best = max(rows, key=lambda row: row[1]["train"]["purity_at_20"] or 0)[0]
            chosen[f"{method}.{factor}"] = getattr(best, factor)
            stablest = None if args.no_stability else max(rows, key=lambda row: row[1]["stability"])[0]
            if stablest is not None:
                chosen[f"{method}.{factor}.label_free"] = getattr(stablest, factor)
            for setting, s in rows:
                value = (f"{getattr(setting, factor)}" + ("*" if setting == best else "")
                         + ("+" if setting == stablest else ""))
                if factor == "components" and not args.components:
                    value += f" ({setting.components // n_groups}x groups, oracle)"
                print(f"{'':>{len(method)}}  {factor:>10} {value:>24}  "
                      + " ".join(f"{_fmt(s['train'][m]):>26}" for m in METRICS) + f"  {_fmt(s['stability']):>15}  "
                      + " ".join(f"{_fmt(s['test'][m]):>26}" for m in METRICS)
                      + f"  {_fmt(s['norm_selectivity']):>15}  {s['seconds']:>6.0f}")
    print("settings_study: " + " ".join(f"{k}={str(v).replace(' ', '')}" for k, v in chosen.items()))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
