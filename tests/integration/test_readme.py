"""The README's API tour runs as written (so it cannot rot), and produces what its comments say."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_api_tour_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python block"
    monkeypatch.chdir(tmp_path)  # it writes runs/...
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["dec"].W.shape == (64, 16) and len(namespace["kl"]) == 64
    assert set(namespace["result"].medians()) == {"dnpeff", "random", "random_support"}
    assert (tmp_path / "runs" / "selectivity" / "selectivity.json").exists()
    table = namespace["table"]
    assert list(table["method"]) == ["dnpeff", "sae_64", "gradient_clustering", "activation_kmeans"]
    assert (tmp_path / "runs" / "compare" / "comparison.csv").exists()
    circuit = namespace["circuit"]
    assert circuit.method == "atp*" and len(circuit) == 8 and len(circuit.top_nodes(5)) == 5
    assert circuit.heatmap().shape[0] == 2


def test_every_results_section_names_the_benchmarks_its_figures_come_from():
    """README figures are either what the demo prints or come from a named benchmark script that exists."""
    text = README.read_text()
    sections = re.findall(r"^## (Results[^\n]*)\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert len(sections) >= 2
    root = README.parent
    for title, body in sections:
        scripts = re.findall(r"benchmarks/\w+\.py", body)
        assert scripts, f"README section {title!r} does not name the benchmark its figures come from"
        assert all((root / s).is_file() for s in scripts), scripts
    assert "differ from what the demo prints" in " ".join(text.split())
