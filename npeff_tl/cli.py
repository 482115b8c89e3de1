"""The ``npeff-tl`` command.

``npeff-tl demo`` runs the main job on the embedded default. Until the model zoo and the decompositions land,
it computes diagonal and low-rank PEFs of a small HookedTransformer built from a config (random weights, no
downloads) and prints a summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from .pefs import PEFs, compute_pefs
from .store import FormatError


def demo_model(seed: int = 0):
    """A 2-layer HookedTransformer with random weights, built offline from a config."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=64, d_head=16, n_heads=4, d_mlp=256, d_vocab=128, n_ctx=32,
        act_fn="gelu", normalization_type="LN", device="cpu", seed=seed, model_name="npeff-tl-demo",
    )
    return HookedTransformer(cfg).eval()


def _fisher_shares(pefs: PEFs) -> list[tuple[str, float]]:
    """Share of the dataset-level Fisher's mass in each TL parameter tensor, largest first."""
    named = pefs.space.to_named(pefs.dataset_fisher)
    total = float(pefs.dataset_fisher.sum())
    return sorted(((name, float(t.sum()) / total) for name, t in named.items()), key=lambda x: -x[1])


def run_demo(args: argparse.Namespace) -> None:
    from . import ParamSpace, Target, TopK

    torch.manual_seed(args.seed)
    model = demo_model(args.seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (args.n_examples, 24), generator=torch.Generator().manual_seed(args.seed))
    space = ParamSpace(model, include=["blocks.*.attn.W_[QKV]", "blocks.*.mlp.W_*"])
    target = Target(position="last", classes=TopK(4))
    print(f"model: {model.cfg.model_name} (2 layers, d_model 64, random weights); {args.n_examples} examples")
    print(f"parameter space: {space.size:,} parameters in {len(space.names)} tensors; target: last token, top-4 classes")
    for kind in ("diagonal", "lowrank"):
        store = f"{args.out}/pefs_{kind}" if args.out else None
        start = time.perf_counter()
        pefs = compute_pefs(model, tokens, space, target, kind, nnz=args.nnz, batch_size=args.batch_size,
                            store=store, progress=not args.quiet)
        seconds = time.perf_counter() - start
        print(f"\n{kind} PEFs: {len(pefs)} examples x {pefs.nnz} entries in {seconds:.1f} s "
              f"({len(pefs) / seconds:.0f} examples/s){f', saved to {store}' if store else ''}")
        print(f"  PEF norm: median {pefs.norms.median():.3e}, max {pefs.norms.max():.3e}")
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
    demo.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default 0)")
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
