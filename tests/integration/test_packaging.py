"""The wheel carries everything the main job needs (zoo weights, tokenizer, report assets): built, installed into a fresh
virtual environment outside the checkout, and run there. The GPU check script says so when it has no GPU."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, cwd, env=None):
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def _build_isolation() -> list[str]:
    """Build with this environment's setuptools when it is new enough for pyproject's license string (>= 77),
    else let pip fetch one into an isolated build environment."""
    try:
        import setuptools

        new_enough = int(setuptools.__version__.split(".")[0]) >= 77
    except ImportError:
        new_enough = False
    return ["--no-build-isolation"] if new_enough else []


def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", *_build_isolation(), "--quiet", "-w", tmp_path / "dist",
         ROOT, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("npeff_tl-*.whl"))
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    # The dependencies come from this environment's site-packages (added as a plain path, so its editable
    # npeff_tl finder is not loaded): the package itself must come from the wheel.
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    location = _run(python, "-c", "import npeff_tl; print(npeff_tl.__file__)", cwd=tmp_path).strip()
    assert location.startswith(str(venv)), location
    assert (Path(location).parent / "py.typed").is_file()  # the package says it is typed (PEP 561)
    requires = _run(python, "-c", "import importlib.metadata as m; print(*m.requires('npeff-tl'), sep='\\n')",
                    cwd=tmp_path).splitlines()
    sae_lens = [r for r in requires if r.startswith("sae-lens")]
    assert sae_lens and all('extra == "sae"' in r for r in sae_lens), requires  # SAE-Lens only with [sae]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    _run(venv / "bin" / "npeff-tl", "demo", "--per-task", "32", "--components", "2", "--sae-steps", "20", "--quiet",
         "--out", tmp_path / "demo", cwd=tmp_path, env=env)
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["model"] == "tasks-2l" and "dnpeff" in summary["methods"]
    field = _run(python, "-c", "import npeff_tl as nt; m, d = nt.zoo.load('pycode-4l', n_train=1, n_test=1); "
                               "print(m.cfg.d_vocab, len(d['test']), m.to_str_tokens('def f', prepend_bos=False))",
                 cwd=tmp_path, env=env)
    assert field.split(None, 2)[:2] == ["4096", "12"], field  # the field model, its examples and tokenizer
    report = (tmp_path / "demo" / "report.html").read_text()  # its stylesheet and script come from the wheel
    assert "details.component" in report and "data-report-ready" in report


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the whole GPU check")
def test_the_gpu_check_script_refuses_a_machine_without_cuda_in_one_line():
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env={**os.environ, "PYTHON": sys.executable},
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "has no torch that sees a CUDA device" in result.stderr
