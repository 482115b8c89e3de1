"""Every tutorial runs as written (so none can rot), and leaves what it says it computes."""

import runpy
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[2] / "tutorials").glob("*.py"))


def test_there_are_tutorials():
    assert [t.name for t in TUTORIALS] == ["01_quickstart.py", "02_npeff_vs_sae.py", "03_your_own_model.py",
                                           "04_hugging_face_model.py"]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # tutorials may write runs/...
    namespace = runpy.run_path(str(path), run_name="__main__")
    if path.stem == "01_quickstart":
        medians = namespace["result"].medians()
        assert medians["dnpeff"]["selectivity"] > medians["random"]["selectivity"]
    elif path.stem == "02_npeff_vs_sae":
        assert list(namespace["table"]["method"]) == ["dnpeff", "sae_8"]
    elif path.stem == "03_your_own_model":
        assert (tmp_path / "runs" / "my_model_lrm" / "metadata.json").exists()
    else:  # a bridge: heads and neurons read out in TL layouts, the perturbation moved predictions
        readout = namespace["readout"]
        assert readout.heads.shape == (2, 4) and float(readout.heads.sum()) > 0 and float(readout.neurons.sum()) > 0
        assert float(namespace["kl_top"]) > 0
