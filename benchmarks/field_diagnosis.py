"""Why are NPEFF's components less pure than gradient clustering's? One representation changed at a time.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/field_diagnosis.py [--model smollm2-135m]
      [--per-group 16] [--test-per-group 16] [--seeds 3] [--set pefs.include=[...]] [--nnz 16384 262144]

On a model's field examples (the split ``field_compare.py`` uses) and one label-free parameter space (the pipeline's
``pefs.include`` unless ``--set`` names another), every train and held-out example gets these vectors over the
space, all from one backward pass per example:

- ``answer_grad``: the gradient of log p(answer), the text's next token (what gradient clustering clusters);
- ``answer_grad_squared``: its elementwise square (a diagonal Fisher of the answer alone: no signs);
- ``top_class_grad``: the gradient of the model's likeliest token's log-probability (no answer);
- ``dense_dpef``: the D-PEF, sum over the class rule's classes c of p_c (grad log p_c)^2 (what D-NPEFF factors);
- ``sparse_dpef_<nnz>``: the D-PEF with only its nnz largest entries kept (what D-NPEFF actually sees).

Each is compressed by one seeded count sketch (2^16 entries; inner products kept to ~0.4%), and every
representation is clustered the same way, the way gradient clustering does it: spectral clustering of the
affinity 1 - arccos(cos)/pi on the train split, coefficients of held-out examples = cosine with each cluster's
mean, clipped at 0. Scored like ``field_compare.py`` (purity@20, AMI, factor-named multi-factor recall on the
held-out split, mean over seeds of the clustering). So the rows differ in one thing each: answer vs the model's
own distribution, signs vs squares, one class vs the class rule, sparsified vs dense. D-NPEFF itself (NMF on the
sparse D-PEFs) is the ``dnpeff`` row of ``field_compare.py`` on the same split and space.

Last line: field_diagnosis: <representation>_purity=<p> ... (held-out purity@20, mean over seeds).
"""

from __future__ import annotations

import argparse
import time

import torch
import npeff_tl as nt
from npeff_tl.baselines.gradient_clustering import CountSketch, spectral_clusters
from npeff_tl.dictionaries import top_of
from npeff_tl.evaluation.metrics import label_metrics
from npeff_tl.interventions import target_log_probs
from npeff_tl.pefs import Objective, per_example_grads

METRICS = ("purity_at_20", "ami", "multi_factor_recall")
SKETCH = 2**16


class ClassesAndAnswer(Objective):
    """sqrt(p_c) log p_c for the class rule's classes (the D-PEF's factor columns), then log p(answer)."""

    def __init__(self, class_ids, weights, answers):
        self.aux = {"ids": class_ids.clamp(min=0), "scale": weights.sqrt(), "answer": answers.reshape(-1, 1)}
        self.n_outputs = class_ids.shape[1] + 1

    def __call__(self, logits, aux):
        log_probs = logits.log_softmax(-1)
        classes = log_probs.gather(-1, aux["ids"]) * aux["scale"].to(logits.dtype)
        return torch.cat([classes, log_probs.gather(-1, aux["answer"])], -1)


def representations(model, examples: nt.LabeledExamples, space, rule, sketch, nnz: list[int]) -> dict[str, torch.Tensor]:
    """Every representation of every example, as unit rows of its count sketch (float64)."""
    logits = target_log_probs(model, examples.examples)
    selection = rule.select(logits, examples.examples.identity(torch.arange(len(examples))))
    weights = torch.where(selection.class_ids >= 0, selection.weights, 0.0)
    objective = ClassesAndAnswer(selection.class_ids, weights, torch.as_tensor(examples.answers))
    k = selection.class_ids.shape[1]
    names = ["answer_grad", "answer_grad_squared", "top_class_grad", "dense_dpef", *(f"sparse_dpef_{n}" for n in nnz)]
    out = {name: torch.empty(len(examples), SKETCH, dtype=torch.float64) for name in names}
    for block in per_example_grads(model, examples.examples, space, objective, batch_size=2, progress=False):
        g = block.grads.float()
        answer, classes = g[:, k], g[:, :k]
        dpef = torch.einsum("bkn,bkn->bn", classes, classes)
        rows = {"answer_grad": answer, "answer_grad_squared": answer.square(), "top_class_grad": classes[:, 0],
                "dense_dpef": dpef}
        top = dpef.topk(min(max(nnz), dpef.shape[1]), dim=1)  # sorted: each nnz keeps a prefix
        for n in nnz:
            rows[f"sparse_dpef_{n}"] = torch.zeros_like(dpef).scatter_(1, top.indices[:, :n], top.values[:, :n])
        for name, x in rows.items():
            s = sketch(x).double()
            out[name][block.start:block.stop] = s / s.norm(dim=1, keepdim=True).clamp(min=1e-300)
    return out


class Clusters:
    """Spectral clusters of unit rows, scored as a dictionary (the label metrics need only these members)."""

    def __init__(self, name: str, train: nt.LabeledExamples, rows: torch.Tensor, n_clusters: int, seed: int):
        _, self.means = spectral_clusters(rows, n_clusters, seed)  # gradient clustering's own recipe
        self.name, self.train, self.n_components = name, train, n_clusters
        self.train_coefficients = self.coefficients(rows)

    def coefficients(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows @ self.means.T).clamp(min=0)

    def top_examples(self, j: int, k: int = 20) -> torch.Tensor:
        return top_of(self.train_coefficients[:, j], k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-group", type=int, default=16)
    parser.add_argument("--test-per-group", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--nnz", type=int, nargs="+", default=[16384, 262144])
    parser.add_argument("--set", action="append", default=[], metavar="pefs.KEY=VALUE")
    args = parser.parse_args()
    config = nt.RunConfig().with_overrides(args.set)
    model, data = nt.zoo.load(args.model, n_train=args.per_group, n_test=args.test_per_group)
    train = nt.LabeledExamples.from_dataset(data["train"])
    test = nt.LabeledExamples.from_dataset(data["test"])
    space = nt.ParamSpace(model, include=config.pefs.include, exclude=config.pefs.exclude)
    rule, r = config.pefs.class_rule(), config.fit.n_components
    sketch = CountSketch(space.size, SKETCH, seed=0)
    print(f"field_diagnosis: {args.model}, {len(train)} train / {len(test)} test examples, {space.size:,} parameters "
          f"({', '.join(config.pefs.include)}), classes {rule}, {r} clusters, {args.seeds} seeds")
    started = time.perf_counter()
    reps = {split: representations(model, examples, space, rule, sketch, args.nnz)
            for split, examples in (("train", train), ("test", test))}
    print(f"  representations: {time.perf_counter() - started:.0f} s")
    print(f"{'representation':>26} " + " ".join(f"{m:>22}" for m in METRICS))
    purity = {}
    for name in reps["train"]:
        rows = []
        for seed in range(args.seeds):
            clusters = Clusters(name, train, reps["train"][name], r, seed)
            rows.append(label_metrics(clusters, clusters.coefficients(reps["test"][name]), test))
        means = {m: sum(row[m] for row in rows) / len(rows) for m in METRICS}
        spread = {m: (min(row[m] for row in rows), max(row[m] for row in rows)) for m in METRICS}
        purity[name] = means["purity_at_20"]
        print(f"{name:>26} " + " ".join(f"{means[m]:.3f} ({spread[m][0]:.3f}-{spread[m][1]:.3f})".rjust(22)
                                       for m in METRICS))
    print("field_diagnosis: " + " ".join(f"{name}_purity={value:.3f}" for name, value in purity.items()))


if __name__ == "__main__":
    main()
