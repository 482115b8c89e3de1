"""The main job: `npeff-tl demo` end to end on a zoo model, its summary.json, stage reuse, one-line errors."""

import json
import time

from npeff_tl.cli import main

FIGURES = {"ami", "nmi", "purity_at_20", "multi_factor_recall", "median_selectivity", "median_strategy_selectivity"}
METHODS = {"dnpeff", "lrm_npeff", "sae_4", "sae_128", "gradient_clustering", "activation_kmeans"}


def test_demo_runs_end_to_end_and_reuses_finished_stages(tmp_path, capsys):
    args = ["demo", "--per-task", "32", "--components", "4", "--sae-steps", "100", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "tasks-2l" and summary["n_examples"] == 2 * 32 * 7 and summary["seconds"] > 0
    assert set(summary["methods"]) == METHODS
    assert all(set(m) == FIGURES for m in summary["methods"].values())
    assert set(summary["controls"]) == {"random", "random_support"}
    assert set(summary["controls"]["random"]) == {"median_selectivity", "median_strategy_selectivity"}
    assert summary["methods"]["dnpeff"]["median_selectivity"] > summary["controls"]["random"]["median_selectivity"]
    for artifact in ("pefs/train_diagonal", "pefs/train_lowrank", "dnpeff", "lrm_npeff", "comparison/comparison.csv"):
        assert (tmp_path / artifact).exists(), artifact
    assert "dnpeff" in capsys.readouterr().out
    start = time.perf_counter()
    assert main(args) == 0  # finished stages are reused: same summary, much faster
    assert time.perf_counter() - start < 0.5 * summary["seconds"] + 20
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_bad_arguments_give_a_one_line_error(capsys):
    assert main(["demo", "--per-task", "8", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("npeff-tl: error: --per-task 8 leaves too few held-out examples") and "\n" not in err


def test_unknown_zoo_model_is_a_one_line_error(capsys):
    assert main(["demo", "--model", "gpt-17", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("npeff-tl: error: unknown zoo model 'gpt-17'; available:") and "\n" not in err
