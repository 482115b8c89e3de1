"""The ``npeff-tl`` command.

``npeff-tl demo --out DIR`` runs the main job end to end on the embedded default, a zoo model (shipped weights,
no downloads): PEFs, D-NPEFF and LRM-NPEFF, SAE / gradient-clustering / activation k-means baselines, the
comparison with selectivity and controls, and ``DIR/summary.json``. Re-running with the same DIR reuses the
finished stages.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence

from .store import FormatError


def _print_summary(summary: dict) -> None:
    print(f"\n{summary['model']}: {summary['n_examples']} examples, {summary['seconds']:.0f} s from scratch")
    keys = ("ami", "purity_at_20", "multi_factor_recall", "median_selectivity", "median_strategy_selectivity")
    print(f"{'method':>20} " + " ".join(f"{k:>27}" for k in keys))
    rows = list(summary["methods"].items()) + [(f"control: {k}", v) for k, v in summary["controls"].items()]
    for name, figures in rows:
        cells = ("-" if figures.get(k) is None else f"{figures[k]:.4g}" for k in keys)
        print(f"{name:>20} " + " ".join(f"{c:>27}" for c in cells))


def run_demo(args: argparse.Namespace) -> None:
    from .pipeline import DemoConfig, run_demo as pipeline

    config = DemoConfig(model=args.model, per_task=args.per_task, components=args.components,
                        sae_steps=args.sae_steps)
    if config.per_task * 7 < 220:
        raise ValueError(f"--per-task {args.per_task} leaves too few held-out examples for selectivity (top 20 + "
                         "baseline 200); use --per-task 32 or more")
    out = args.out or tempfile.mkdtemp(prefix="npeff-tl-demo-")
    summary = pipeline(out, config, progress=not args.quiet)
    _print_summary(summary)
    print(f"artifacts and summary.json in {out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npeff-tl", description="NPEFF for TransformerLens models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the main job on the embedded default model (no downloads)")
    demo.add_argument("--out", help="directory for all artifacts and summary.json (re-running reuses finished "
                                    "stages); default: a new temporary directory")
    demo.add_argument("--model", default="tasks-2l", help="zoo model (default tasks-2l; see npeff_tl.zoo.list())")
    demo.add_argument("--per-task", type=int, default=64, help="train and test examples per task (default 64)")
    demo.add_argument("--components", type=int, default=16, help="components per dictionary (default 16)")
    demo.add_argument("--sae-steps", type=int, default=1000, help="SAE training steps (default 1000)")
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        run_demo(args)
    except (ValueError, FormatError, OSError) as error:
        print(f"npeff-tl: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
