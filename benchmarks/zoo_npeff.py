"""D-NPEFF and LRM-NPEFF on a zoo model: do components line up with the known strategies?

Run:  .venv/bin/python benchmarks/zoo_npeff.py [--model tasks-2l] [--per-task 128] [--components 16]

PEFs of the zoo's train examples (all attention and MLP weights, top-4 classes at the answer position),
then each decomposition with 3 seeds. Figures, against the ``strategy`` column: AMI and NMI of the argmax
assignment of W (baseline: a random assignment scores ~0), mean purity of each component's top-20 examples
(baseline: the largest strategy's share, 1/7 here), and seed stability (Hungarian-matched |cosine| between
the components of seed 0 and seeds 1, 2).
Last line: zoo_npeff: dnpeff_ami=<a> dnpeff_purity=<p> lrm_ami=<b> lrm_purity=<q>
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

import npeff_tl as nt


def purity_at(W: torch.Tensor, labels: list[str], k: int = 20) -> float:
    """Mean over components of the share of the most common label among the k examples with the largest
    coefficients (components with fewer than k non-zero coefficients use those)."""
    shares = []
    for j in range(W.shape[1]):
        top = [i for i in W[:, j].topk(k).indices.tolist() if W[i, j] > 0]
        if top:
            shares.append(Counter(labels[i] for i in top).most_common(1)[0][1] / len(top))
    return sum(shares) / len(shares)


def evaluate(name: str, fits: list[nt.Decomposition], labels: list[str]) -> dict[str, float]:
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    first = fits[0]
    assignment = first.W.argmax(1).tolist()
    stability = [float(nt.matched_cosines(first.components, other.components)[2].mean()) for other in fits[1:]]
    figures = {
        "ami": adjusted_mutual_info_score(labels, assignment),
        "nmi": normalized_mutual_info_score(labels, assignment),
        "purity_at_20": purity_at(first.W, labels),
        "seed_stability": sum(stability) / len(stability),
        "relative_loss": first.losses[-1]["loss"] / first.losses[0]["loss"],
    }
    print(f"{name:>10}: " + "  ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tasks-2l")
    parser.add_argument("--per-task", type=int, default=128, help="train examples per task")
    parser.add_argument("--components", type=int, default=16)
    parser.add_argument("--nnz", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, data = nt.zoo.load(args.model, n_train=args.per_task)
    rows = data["train"]
    labels = rows["strategy"]
    examples = nt.Examples.from_tokens(rows["tokens"], rows["target_pos"])
    space = nt.ParamSpace(model, include=["blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*"])
    target = nt.Target(classes=nt.TopK(4))
    print(f"zoo_npeff: {args.model}, {len(rows)} examples of {len(set(labels))} strategies, space {space.size:,}, "
          f"nnz {args.nnz}, {args.components} components, {args.threads} threads")
    results = {}
    for kind, solver in (("diagonal", nt.DNPEFF), ("lowrank", nt.LRMNPEFF)):
        start = time.perf_counter()
        pefs = nt.compute_pefs(model, examples, space, target, kind, nnz=args.nnz, progress=False)
        seconds = time.perf_counter() - start
        fits = []
        start = time.perf_counter()
        for seed in range(3):
            settings = dict(n_components=args.components, seed=seed)
            if kind == "diagonal":
                settings.update(max_iter=1000)
            fits.append(solver(**settings).fit(pefs, progress=False))
        name = "dnpeff" if kind == "diagonal" else "lrm_npeff"
        print(f"{name:>10}: PEFs {seconds:.1f} s, 3 fits {time.perf_counter() - start:.1f} s")
        results[name] = evaluate(name, fits, labels)
    d, l = results["dnpeff"], results["lrm_npeff"]
    print(f"zoo_npeff: dnpeff_ami={d['ami']:.3f} dnpeff_purity={d['purity_at_20']:.3f} "
          f"lrm_ami={l['ami']:.3f} lrm_purity={l['purity_at_20']:.3f}")


if __name__ == "__main__":
    main()
