"""The ``npeff-tl`` command.

``npeff-tl demo`` runs the main job on the embedded default, a zoo model (shipped weights, no downloads). Until
the decompositions land, it computes diagonal and low-rank PEFs of zoo examples and prints a summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from .pefs import PEFs, compute_pefs
from .store import FormatError


def _fisher_shares(pefs: PEFs) -> list[tuple[str, float]]:
    """Share of the dataset-level Fisher's mass in each TL parameter tensor, largest first."""
    named = pefs.space.to_named(pefs.dataset_fisher)
    total = float(pefs.dataset_fisher.sum())
    return sorted(((name, float(t.sum()) / total) for name, t in named.items()), key=lambda x: -x[1])


def run_demo(args: argparse.Namespace) -> None:
    from . import Examples, ParamSpace, Target, TopK, zoo

    model, data = zoo.load(args.model)
    train = data["train"]
    if not 1 <= args.n_examples <= len(train):
        raise ValueError(f"--n-examples must lie in [1, {len(train)}] for {args.model}, got {args.n_examples}")
    rows = train.select(range(args.n_examples))
    examples = Examples.from_tokens(rows["tokens"], rows["target_pos"])
    space = ParamSpace(model, include=["blocks.*.attn.W_[QKV]", "blocks.*.mlp.W_*"])
    target = Target(position="last", classes=TopK(4))
    strategies = sorted(set(rows["strategy"]))
    print(f"model: zoo {args.model} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}); "
          f"{args.n_examples} examples of {len(strategies)} strategies")
    print(f"parameter space: {space.size:,} parameters in {len(space.names)} tensors; target: the answer "
          "position, top-4 classes")
    for kind in ("diagonal", "lowrank"):
        store = f"{args.out}/pefs_{kind}" if args.out else None
        start = time.perf_counter()
        pefs = compute_pefs(model, examples, space, target, kind, nnz=args.nnz, batch_size=args.batch_size,
                            store=store, answers=torch.tensor(rows["answer"]), progress=not args.quiet)
        seconds = time.perf_counter() - start
        print(f"\n{kind} PEFs: {len(pefs)} examples x {pefs.nnz} entries in {seconds:.1f} s "
              f"({len(pefs) / seconds:.0f} examples/s){f', saved to {store}' if store else ''}")
        norms = ", ".join(
            f"{s} {pefs.norms[[i for i, t in enumerate(rows['strategy']) if t == s]].median():.2e}" for s in strategies
        )
        print(f"  median PEF norm by strategy: {norms}")
        kept = pefs.values.double().square().sum(1) / pefs.norms.square().clamp(min=1e-300)
        if kind == "diagonal":
            print(f"  share of each PEF's squared norm kept by the top {pefs.nnz}: median {kept.median():.3f}")
        print("  dataset-level Fisher by parameter tensor:")
        for name, share in _fisher_shares(pefs)[:5]:
            print(f"    {name:<24} {share:6.1%}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npeff-tl", description="NPEFF for TransformerLens models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the main job on the embedded default model (no downloads)")
    demo.add_argument("--out", help="directory for the results (re-running resumes); default: keep in memory")
    demo.add_argument("--n-examples", type=int, default=256, help="number of examples (default 256)")
    demo.add_argument("--nnz", type=int, default=4096, help="entries kept per PEF (default 4096)")
    demo.add_argument("--batch-size", type=int, default=16, help="examples per batch (default 16)")
    demo.add_argument("--model", default="tasks-2l", help="zoo model (default tasks-2l; see npeff_tl.zoo.list())")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        run_demo(args)
    except (ValueError, FormatError, OSError) as error:
        print(f"npeff-tl: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
