from npeff_tl.cli import main
from npeff_tl import load_pefs


def test_demo_runs_and_resumes(tmp_path, capsys):
    args = ["demo", "--n-examples", "6", "--nnz", "64", "--batch-size", "4", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "model: zoo tasks-2l (2 layers, d_model 64); 6 examples of 6 strategies" in out
    assert "diagonal PEFs: 6 examples x 64 entries" in out and "lowrank PEFs: 6 examples x 64 entries" in out
    assert "dataset-level Fisher by parameter tensor" in out
    stored = load_pefs(tmp_path / "pefs_lowrank")
    assert len(stored) == 6 and stored.nnz == 64
    assert main(args) == 0  # finished stores are reused


def test_bad_arguments_give_a_one_line_error(capsys):
    assert main(["demo", "--n-examples", "4", "--nnz", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("npeff-tl: error: nnz=0 must lie in [1,") and "\n" not in err


def test_unknown_zoo_model_is_a_one_line_error(capsys):
    assert main(["demo", "--model", "gpt-17", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("npeff-tl: error: unknown zoo model 'gpt-17'; available:") and "\n" not in err
