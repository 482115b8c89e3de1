"""The main job: `npeff-tl demo` end to end on a zoo model, its summary.json, stage reuse, one-line errors."""

import json
import shutil
import time

import pytest
import torch

from npeff_tl.cli import main

SELECTIVITY = {"median_selectivity", "median_strategy_selectivity", "median_norm_selectivity",
               "median_norm_strategy_selectivity"}
FIGURES = {"ami", "nmi", "purity_at_20", "multi_factor_recall", "multi_factor_recall_by_stratum", "factor_auc"} | SELECTIVITY
METHODS = {"dnpeff", "lrm_npeff", "sae_4", "sae_128", "gradient_clustering", "activation_kmeans"}


def test_demo_runs_end_to_end_and_reuses_finished_stages(tmp_path, capsys):
    args = ["demo", "--per-task", "32", "--components", "4", "--sae-steps", "100", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "tasks-2l" and summary["n_examples"] == 2 * 32 * 7 and summary["seconds"] > 0
    assert set(summary["methods"]) == METHODS
    assert all(set(m) == FIGURES for m in summary["methods"].values())
    assert set(summary["controls"]) == {"random", "random_support"}
    assert set(summary["controls"]["random"]) == SELECTIVITY
    assert summary["methods"]["dnpeff"]["median_selectivity"] > summary["controls"]["random"]["median_selectivity"]
    for artifact in ("pefs/train_diagonal", "pefs/train_lowrank", "dnpeff", "lrm_npeff", "comparison/comparison.csv",
                     "report.html"):
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
    assert main(["demo", "--model", "pycode-4l", "--per-task", "5", "--quiet"]) == 2  # 12 strata of the field data
    err = capsys.readouterr().err.strip()
    assert "from 12 example groups); use --per-task 15 or more" in err and "\n" not in err  # (20 + 150) / 12


def test_unknown_zoo_model_is_a_one_line_error(capsys):
    assert main(["demo", "--model", "gpt-17", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("npeff-tl: error: unknown zoo model 'gpt-17'; available:") and "\n" not in err


# -- the stage commands on a user's own model (a local checkpoint) and data (JSONL / datasets on disk) --------

def test_stages_run_on_a_local_checkpoint_and_jsonl_prompts(staged_run, own_model_and_data):
    _, model, data = own_model_and_data
    out = staged_run
    config = json.loads((out / "config.json").read_text())
    assert config["fit"]["n_components"] == 4 and config["data"]["source"].endswith("prompts.jsonl")
    examples = json.loads((out / "data" / "examples.json").read_text())
    assert len(examples["train"]) + len(examples["test"]) == 140 and len(examples["test"]) == 70
    # prompts were tokenized exactly as the zoo tokenized the same rows; text answers became the answer tokens
    by_text = {" ".join(row["tokens"]): row for row in examples["train"] + examples["test"]}
    for tokens, answer in zip(data["train"]["tokens"][:10], data["train"]["answer"][:10]):
        row = by_text[" ".join(model.to_str_tokens(torch.tensor(tokens), prepend_bos=False))]
        assert row["answer"] == model.to_str_tokens(torch.tensor([answer]), prepend_bos=False)[0]
        assert row["position"] == len(tokens) - 1
    for artifact in ("pefs/train_diagonal", "pefs/train_lowrank", "dnpeff", "lrm_npeff", "selectivity/dnpeff",
                     "coefficients/sae_8.safetensors", "comparison/comparison.json", "summary.json", "report.html"):
        assert (out / artifact).exists(), artifact
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"dnpeff", "lrm_npeff", "sae_8", "gradient_clustering", "activation_kmeans"}
    assert summary["methods"]["dnpeff"]["ami"] is not None
    assert summary["methods"]["dnpeff"]["multi_factor_recall"] is None  # no factors column in this data
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"pefs", "fit", "selectivity", "compare", "report"} and min(timings.values()) > 0


def test_a_stage_reuses_finished_work_and_runs_missing_earlier_stages(staged_run, own_model_and_data, tmp_path):
    root, _, _ = own_model_and_data
    before = {p: p.stat().st_mtime_ns for p in (staged_run / "dnpeff").iterdir()}
    assert main(["fit", "--out", str(staged_run), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (staged_run / "dnpeff").iterdir()} == before
    # `fit` on a new directory runs `pefs` first
    out = tmp_path / "fresh"
    assert main(["fit", "--out", str(out), "--quiet", "--set", f"model.name={root / 'checkpoint'}",
                 "--set", f"data.source={root / 'prompts.jsonl'}", "--set", "fit.methods=[\"dnpeff\"]",
                 "--set", "fit.n_components=3", "--set", "pefs.nnz=512"]) == 0
    assert (out / "pefs" / "train_diagonal").exists() and (out / "dnpeff" / "metadata.json").exists()
    assert not (out / "pefs" / "train_lowrank").exists()


def test_a_run_directory_with_the_earlier_names_goes_on_where_it_stopped(staged_run, tmp_path):
    """config.json and timings.json as earlier versions wrote them (section perturb, fit.components, stage
    perturb): the old command name still runs, reuses the finished selectivity, and the settings are rewritten
    under the current names."""
    old = tmp_path / "old"
    shutil.copytree(staged_run, old)
    config = json.loads((old / "config.json").read_text())
    fit, measured = config["fit"], config.pop("selectivity")
    config["fit"] = {"methods": fit["methods"], "components": fit["n_components"], "seed": fit["seed"]}
    config["perturb"] = {"n_top": measured["n_top"], "n_baseline": measured["n_baseline"],
                         "kl_targets": measured["kl_targets"], "components": measured["n_measured"],
                         "seed": measured["seed"]}
    (old / "config.json").write_text(json.dumps(config))
    timings = json.loads((old / "timings.json").read_text())
    timings["perturb"] = timings.pop("selectivity")
    (old / "timings.json").write_text(json.dumps(timings))
    result = old / "selectivity" / "dnpeff" / "selectivity.json"
    before = result.stat().st_mtime_ns
    assert main(["perturb", "--out", str(old), "--quiet"]) == 0
    assert result.stat().st_mtime_ns == before
    rewritten = json.loads((old / "config.json").read_text())
    assert "perturb" not in rewritten and rewritten["selectivity"]["n_measured"] == measured["n_measured"]
    assert rewritten["fit"]["n_components"] == fit["n_components"]
    # a finished stage under its old name still guards its settings
    assert main(["perturb", "--out", str(old), "--quiet", "--set", "perturb.n_top=6"]) == 2


def test_a_datasets_directory_is_a_data_source(own_model_and_data, tmp_path):
    from datasets import DatasetDict

    root, _, data = own_model_and_data
    DatasetDict({"train": data["train"].select(range(60)), "test": data["train"].select(range(60, 140))}).save_to_disk(
        str(tmp_path / "data"))  # token ids and target positions, in the zoo's column names
    assert main(["pefs", "--out", str(tmp_path / "run"), "--quiet", "--set", f"model.name={root / 'checkpoint'}",
                 "--set", f"data.source={tmp_path / 'data'}", "--set", "data.position=target_pos",
                 "--set", "data.label=strategy", "--set", 'fit.methods=["dnpeff"]', "--set", "pefs.nnz=256"]) == 0
    examples = json.loads((tmp_path / "run" / "data" / "examples.json").read_text())
    assert len(examples["train"]) == 60 and len(examples["test"]) == 80
    assert [row["label"] for row in examples["test"]] == data["train"]["strategy"][60:140]


@pytest.mark.parametrize("args, message", [
    (["pefs", "--set", "pefs.nzz=5"], "unknown config key pefs.nzz; pefs has include, exclude"),
    (["pefs", "--set", "modle.name=x"], "unknown config section 'modle'; the sections are model, data"),
    (["pefs", "--set", "fit.n_components=many"], "config key fit.n_components must be int, got 'many'"),
    (["pefs", "--config", "/nonexistent/settings.toml"], "config file /nonexistent/settings.toml does not exist"),
    (["pefs", "--set", "model.name=gpt-17"], "could not load 'gpt-17': not a zoo model"),  # nor on the hub
    (["pefs", "--set", "model.name=zoo:gpt-17"], "unknown zoo model 'gpt-17'"),
    (["pefs", "--set", "model.name=gpt2"], "could not load 'gpt2' from the model hub"),  # offline: no hub
    (["pefs", "--set", "data.source=/nonexistent/prompts.jsonl"], "data source /nonexistent/prompts.jsonl does not exist"),
    (["fit", "--set", "fit.methods=[\"nmf\"]"], "fit.methods ['nmf'] are unknown; choose from dnpeff, lrm_npeff"),
    (["report"], "/run is not a run directory (no config.json)"),
])
def test_user_mistakes_give_a_one_line_error_and_exit_code_2(args, message, tmp_path, capsys):
    assert main([*args, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("npeff-tl: error: ") and message in err, err
    assert "\n" not in err


def test_bad_settings_are_refused_before_anything_is_written(tmp_path, capsys):
    for setting in ('fit.methods=["nmf"]', "pefs.classes=top_p", "compare.sae_k=[1,2,3]", "compare.sae_k=[32,8]"):
        assert main(["pefs", "--out", str(tmp_path / "run"), "--set", setting]) == 2
        assert not (tmp_path / "run").exists(), setting
    err = capsys.readouterr().err
    assert "pefs.classes 'top_p' is not a class rule" in err and "needs 1 <= k <= width" in err


def test_a_bad_config_file_names_the_problem(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("[fit]\nn_components = 4\nsolver = 'x'\n")
    assert main(["pefs", "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == "npeff-tl: error: unknown config key fit.solver; fit has methods, n_components, seed, dnpeff, lrm_npeff"
    (tmp_path / "broken.toml").write_text("[fit\n")
    assert main(["pefs", "--config", str(tmp_path / "broken.toml"), "--out", str(tmp_path / "run")]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


def test_other_settings_for_a_finished_stage_are_refused(staged_run, capsys):
    assert main(["fit", "--out", str(staged_run), "--quiet", "--set", "pefs.nnz=2000"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished 'pefs' stage made with other settings (pefs.nnz: 1024 -> 2000)" in err
    assert main(["fit", "--out", str(staged_run), "--quiet", "--set", "fit.dnpeff.tol=0.001"]) == 2
    assert "finished 'fit' stage made with other settings (fit.dnpeff.tol: 1e-05 -> 0.001)" in capsys.readouterr().err


def test_config_prints_settings_that_load_back(tmp_path, capsys):
    from npeff_tl.config import RunConfig, load_config

    assert main(["config", "--set", "fit.n_components=7", "--set", "data.max_examples=50"]) == 0
    (tmp_path / "settings.toml").write_text(capsys.readouterr().out)
    loaded = load_config(tmp_path / "settings.toml")
    expected = RunConfig().with_overrides(["fit.n_components=7", "data.max_examples=50"])
    assert loaded == expected and loaded.fit.n_components == 7
    assert RunConfig().with_overrides(["data.max_examples=null"]).data.max_examples is None


def test_a_memory_budget_picks_the_batch_size_and_the_estimates_are_printed(own_model_and_data, tmp_path, capsys):
    from npeff_tl.memory import batch_size_for
    from npeff_tl.pipeline import Run

    root, _, _ = own_model_and_data
    settings = ["--set", f"model.name={root / 'checkpoint'}", "--set", f"data.source={root / 'prompts.jsonl'}",
                "--set", 'fit.methods=["dnpeff"]', "--set", "fit.n_components=3", "--set", "pefs.nnz=512",
                "--set", "pefs.memory_budget_gb=0.03"]
    assert main(["fit", "--out", str(tmp_path / "run"), *settings]) == 0
    out = capsys.readouterr().out
    run = Run(tmp_path / "run", progress=False)
    sizes = {k: v for k, v in run.pef_settings("diagonal").items() if k != "batch_size"}
    expected = batch_size_for(int(0.03 * 2**30), **sizes)
    assert f"diagonal PEFs, batch {expected}: about " in out and 1 < expected < 256
    assert "dnpeff: 3 components over " in out and " parameters, about " in out
    dictionary, = run.npeff_dictionaries  # the mixing weights reach the D-NPEFF perturbation: a grid, or one as given
    assert (dictionary.mix, dictionary.mix_grid) == ("auto", (0.1, 0.3, 0.5, 0.7, 0.9))
    run.close()
    with Run(tmp_path / "run", run.config.with_overrides(["selectivity.dnpeff_mixes=[0.3]"]), progress=False) as run:
        dictionary, = run.npeff_dictionaries
    assert dictionary.mix == 0.3


@pytest.mark.parametrize("lines, message", [
    (['{"tokens": [1, 2, 3]}', '{"tokens": [1, 2]}', '{"tokens": [1, 2, 99999]}', '{"tokens": [3, 4]}'],
     "bad.jsonl:3 has token id 99999 outside the model's vocabulary"),
    (['{"tokens": [1, 2, 3], "answer": -1}', '{"tokens": [1, 2], "answer": -1}'], "has answer=-1 outside the model"),
    (['{"tokens": [1, 2, 3]}', '{"prompt": "unterminated}'], "bad.jsonl:2 is not a JSON object (Unterminated string "
                                                             "starting at (column 12))"),
    ([], "bad.jsonl holds no rows"),
])
def test_bad_data_rows_are_named_by_their_file_line_before_any_stage_runs(lines, message, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text("".join(line + "\n" for line in lines))
    assert main(["pefs", "--out", str(tmp_path / "run"), "--quiet", "--set", "model.name=zoo:tasks-2l",
                 "--set", f"data.source={tmp_path / 'bad.jsonl'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("npeff-tl: error: ") and message in err and "\n" not in err, err
    assert not list((tmp_path / "run").glob("pefs/*"))



def test_an_nnz_beyond_the_space_is_refused_like_the_api_and_a_short_machine_is_warned(tmp_path, capsys, monkeypatch,
                                                                                      caplog):
    assert main(["pefs", "--out", str(tmp_path / "run"), "--quiet", "--set", "pefs.nnz=100000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pefs.nnz=100000000 must lie in [1," in err and "\n" not in err, err
    assert not list((tmp_path / "run").glob("pefs/*"))
    import npeff_tl.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 1024)  # a machine with 1 KiB to spare
    assert main(["pefs", "--out", str(tmp_path / "short"), "--quiet", "--set", "data.per_task=2",
                 "--set", 'fit.methods=["dnpeff"]', "--set", "pefs.nnz=64"]) == 0
    assert "the diagonal PEFs: about" in caplog.text and "but only 1.0 KiB available" in caplog.text
    printed = capsys.readouterr().err  # the command prints the library's warnings
    assert "npeff-tl: warning: " in printed and "but only 1.0 KiB available" in printed


def test_version_help_texts_and_an_interrupt_are_what_a_user_needs(capsys, monkeypatch, tmp_path):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("npeff-tl ")
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    report_help = " ".join(capsys.readouterr().out.split())
    assert "it runs no other stage" in report_help and "Runs the earlier stages" not in report_help
    descriptions = set()
    for command in ("pefs", "fit", "selectivity", "compare", "run"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        descriptions.add(capsys.readouterr().out.split("options:")[0].split("\n", 2)[-1])
    assert len(descriptions) == 5  # no shared boilerplate standing in for what each stage does
    import npeff_tl.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_stages", interrupted)
    assert main(["pefs", "--out", str(tmp_path / "run"), "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"npeff-tl: interrupted; finished stages and PEF shards in {tmp_path / 'run'} are kept: run the "
                   "same command again to resume")


def test_config_explains_every_setting(capsys):
    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    settings = [i for i, line in enumerate(lines) if line and not line.startswith(("#", "["))]
    settings += [i for i, line in enumerate(lines) if line.startswith("# ") and " =  (not set)" in line]
    assert len(settings) > 30
    for i in settings:
        assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 12, lines[i - 1:i + 1]


def test_the_demo_writes_to_a_folder_the_user_keeps_and_says_where(monkeypatch, tmp_path, capsys):
    import npeff_tl.pipeline as pipeline

    seen = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "run_all", lambda out, config, progress: seen.setdefault("out", out) and None)
    assert main(["demo"]) == 0
    assert seen["out"] == "runs/demo-tasks-2l"
    assert "writing to runs/demo-tasks-2l (re-running this command reuses what is finished there)" in \
        capsys.readouterr().out
