"""report.html: self-contained, built from the run directory's artifacts (checked against them), and working in a
real headless Chromium (no console errors, key sections present, sorting and expand/collapse work)."""

import html
import json
import os
import re
import shutil
from pathlib import Path

import pytest

import npeff_tl as nt
from npeff_tl.store import load_tensors

SECTIONS = ("overview", "comparison", "selectivity", "heatmaps", "coefficients", "components")
REQUIRE_BROWSER = "NPEFF_TL_REQUIRE_BROWSER"  # set by .ci/run: a missing browser fails instead of skipping


def _report(run: Path) -> str:
    return (run / "report.html").read_text()


def test_the_report_is_self_contained(staged_run):
    page = _report(staged_run)
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    # nothing is fetched: no external scripts, styles, images or fonts; links only to anchors in the page
    assert not re.search(r"<(link|img|iframe|object|embed)\b", page)
    assert not re.search(r"<script\b[^>]*\bsrc=", page)
    assert re.findall(r'href="([^"]*)"', page) and all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', page))
    assert "url(" not in page and "@import" not in page


@pytest.mark.parametrize("name", ["dnpeff", "sae_8"])
def test_the_top_examples_shown_are_the_largest_test_coefficients(staged_run, name):
    """Oracle: the saved test coefficients, sorted by hand, and the examples file."""
    page = _report(staged_run)
    coefficients = load_tensors(staged_run / "coefficients" / f"{name}.safetensors")
    examples = json.loads((staged_run / "data" / "examples.json").read_text())["test"]
    if name == "dnpeff":
        assert (coefficients["train"] == nt.load_decomposition(staged_run / "dnpeff").W.float()).all()
    used = (coefficients["train"].sum(0) > 0).nonzero().flatten().tolist()
    assert used and len(re.findall(rf'<details class="component" id="{name}-', page)) == len(used)
    for j in used:
        block = re.search(rf'<details class="component" id="{name}-{j}".*?</details>', page, re.S).group(0)
        shown = re.findall(r'<div class="example"><span class="coef" data-value="([^"]*)">[^<]*</span>'
                           r'<span class="label">([^<]*)</span>(.*?)</div>', block)
        column = coefficients["test"][:, j].tolist()
        expected = sorted(((v, i) for i, v in enumerate(column) if v > 0), key=lambda t: -t[0])[:8]
        assert len(shown) == len(expected)
        for (coef, label, tokens), (value, i) in zip(shown, expected):
            assert float(coef) == value
            assert html.unescape(label) == examples[i]["label"]
            target = re.findall(r'<span class="tok target">([^<]*)</span>', tokens)
            assert [html.unescape(t) for t in target] == [examples[i]["tokens"][examples[i]["position"]]]
            assert html.unescape(re.search(r"&rarr; ([^<]*)</span>", tokens).group(1)) == examples[i]["answer"]


def test_the_report_shows_the_summary_figures(staged_run):
    page = _report(staged_run)
    summary = json.loads((staged_run / "summary.json").read_text())
    table = re.search(r'<table class="sortable" id="comparison-table">.*?</table>', page, re.S).group(0)
    for method, figures in summary["methods"].items():
        row = re.search(rf'<tr class="method"><td class="name"[^>]*>{method}</td>(.*?)</tr>', table).group(1)
        values = dict(zip(("n_components", "ami", "nmi", "purity_at_20", "multi_factor_recall", "median_selectivity",
                           "median_strategy_selectivity"), re.findall(r'data-value="([^"]*)"', row)))
        for key in ("ami", "nmi", "purity_at_20", "median_selectivity"):
            if figures[key] is None:
                assert values[key] == "-"
            else:
                assert float(values[key]) == pytest.approx(figures[key])


def test_a_partial_run_gives_a_partial_report(own_model_and_data, tmp_path):
    root, _, _ = own_model_and_data
    out = tmp_path / "run"
    assert nt.cli.main(["fit", "--out", str(out), "--quiet", "--set", f"model.name={root / 'checkpoint'}",
                        "--set", f"data.source={root / 'prompts.jsonl'}", "--set", 'fit.methods=["dnpeff"]',
                        "--set", "fit.components=3", "--set", "pefs.nnz=256"]) == 0
    page = _report(nt.write_report(out).parent)
    assert '<section id="overview">' in page
    assert '<section id="comparison">' not in page and '<section id="components">' not in page
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        nt.write_report(tmp_path / "elsewhere")


def _chromium() -> str | None:
    found = os.environ.get("NPEFF_TL_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if found is None:
        if os.environ.get(REQUIRE_BROWSER):
            pytest.fail(f"no Chromium found and {REQUIRE_BROWSER} is set: install Debian's chromium package "
                        "(.ci/run does) or point NPEFF_TL_CHROMIUM at a binary")
        pytest.skip("no Chromium binary on this machine (.ci/run installs one and requires it)")
    return found


def test_the_report_in_a_headless_browser(staged_run, tmp_path):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    problems, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: m.type in ("error", "warning") and problems.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((staged_run / "report.html").as_uri())
            page.wait_for_selector("body[data-report-ready=true]")
            for section in SECTIONS:
                assert page.locator(f"section#{section} h2").is_visible(), section
            assert page.locator("section#selectivity svg circle").count() > 0
            assert page.locator("section#components .tok.target").count() > 0

            # sorting: a click on the AMI header orders the method rows by AMI, largest first
            page.locator("#comparison-table th", has_text="AMI").click()
            ami = [float(v) for v in page.locator("#comparison-table tbody tr.method td:nth-child(3)")
                   .evaluate_all("cells => cells.map(c => c.getAttribute('data-value'))") if v != "-"]
            assert ami == sorted(ami, reverse=True) and len(ami) >= 3

            components = page.locator("section#components details.component")
            page.get_by_role("button", name="collapse all").click()
            assert components.evaluate_all("ds => ds.filter(d => d.open).length") == 0
            page.get_by_role("button", name="expand all").click()
            assert components.evaluate_all("ds => ds.filter(d => d.open).length") == components.count() > 0

            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            screenshots = os.environ.get("NPEFF_TL_SCREENSHOT_DIR")
            if screenshots:
                shutil.copy(tmp_path / "report.png", Path(screenshots) / "report.png")
        finally:
            browser.close()
    assert problems == []
    assert all(url.startswith("file://") for url in requests), requests
    assert (tmp_path / "report.png").stat().st_size > 10_000
