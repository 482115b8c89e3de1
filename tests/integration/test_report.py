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
from npeff_tl.report.page import TABLE_FIGURES
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
        values = dict(zip(TABLE_FIGURES, re.findall(r'data-value="([^"]*)"', row)))  # the columns in order
        for key in ("ami", "nmi", "purity_at_20", "median_selectivity"):
            if figures[key] is None:
                assert values[key] == "-"
            else:
                assert float(values[key]) == pytest.approx(figures[key])


def test_cards_show_logit_effects_frequencies_bands_and_clean_axes(staged_run):
    """Oracles: effects.json (checked against a hand-perturbed model in test_selectivity), the saved coefficients."""
    page = _report(staged_run)
    saved = json.loads((staged_run / "selectivity" / "dnpeff" / "effects.json").read_text())
    assert saved["effects"]
    for effect in saved["effects"]:
        block = re.search(rf'<details class="component" id="dnpeff-{effect["component"]}".*?</details>', page, re.S).group(0)
        promoted = re.search(r'<p class="effects">promoted: (.*?)</p>', block).group(1)
        shown = [html.unescape(t) for t in re.findall(r'<span class="tok" title="[^"]*">([^<]*)</span>', promoted)]
        assert shown == [saved["tokens"][str(t)] for t, _ in effect["promoted"]]
        assert len(re.findall(r'<div class="example shift">', block)) == len(effect["examples"])
    coefficients = load_tensors(staged_run / "coefficients" / "dnpeff.safetensors")["test"].double()
    argmax = coefficients.argmax(1)[coefficients.max(1).values > 0]
    for j in range(coefficients.shape[1]):
        block = re.search(rf'<details class="component" id="dnpeff-{j}".*?</details>', page, re.S)
        if block is None:
            continue
        share = float((argmax == j).sum()) / len(coefficients)
        assert f"largest on {share:.0%} of test examples" in block.group(0)
        column = coefficients[:, j]
        rest = sorted((v for v in column.tolist() if v > 0), reverse=True)[8:]
        bands = re.findall(r'<h3>quantiles (\d+)%-(\d+)% of the rest</h3>(.*?)(?=<h3>|</div>)', block.group(0), re.S)
        assert len(bands) == (2 if rest else 0)
        for lo, hi, rows in bands:
            values = [float(v) for v in re.findall(r'<div class="example band"><span class="coef" data-value="([^"]*)"',
                                                   rows)]
            n = len(rest)
            allowed = rest[int(n * (1 - int(hi) / 100)): max(int(n * (1 - int(lo) / 100)), int(n * (1 - int(hi) / 100)) + 1)]
            assert values and all(v in allowed for v in values), (lo, hi, values)
    svg_text = " ".join(re.findall(r"<text[^>]*>([^<]*)</text>", page))
    assert not re.search(r"1e-?\d+\.\d", svg_text), svg_text  # axis labels like 1e0.0 are gone


def test_a_partial_run_gives_a_partial_report(own_model_and_data, tmp_path):
    root, _, _ = own_model_and_data
    out = tmp_path / "run"
    assert nt.cli.main(["fit", "--out", str(out), "--quiet", "--set", f"model.name={root / 'checkpoint'}",
                        "--set", f"data.source={root / 'prompts.jsonl'}", "--set", 'fit.methods=["dnpeff"]',
                        "--set", "fit.n_components=3", "--set", "pefs.nnz=256"]) == 0
    page = _report(nt.write_report(out).parent)
    assert '<section id="overview">' in page
    assert '<section id="comparison">' not in page and '<section id="components">' not in page
    with pytest.raises(FileNotFoundError, match="is not a run directory") as error:
        nt.write_report(tmp_path / "elsewhere")
    assert f"npeff-tl demo --out {tmp_path / 'elsewhere'}`" in str(error.value)  # both commands name the directory


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

            # links: a strip-plot dot and a heatmap row open the card they name
            dot = page.locator("section#selectivity svg a").first
            card = dot.get_attribute("href")[1:]
            assert page.locator("section#selectivity svg a title").first.text_content().count("component") == 1
            dot.click()
            assert page.evaluate(f"document.getElementById('{card}').open")
            assert page.locator(f"[id='{card}'] > summary").is_visible()
            page.get_by_role("button", name="collapse all").click()
            row = page.locator("section#heatmaps table.heat th.name a").first
            card = row.get_attribute("href")[1:]
            page.locator("section#heatmaps details.heatmap").first.evaluate("d => d.open = true")
            row.click()
            assert page.evaluate(f"document.getElementById('{card}').open")

            page.get_by_role("button", name="expand all").click()
            assert components.evaluate_all("ds => ds.filter(d => d.open).length") == components.count() > 0
            for width in (1400, 800):  # nothing sticks out of the page or its cards; wide tables scroll inside
                page.set_viewport_size({"width": width, "height": 1000})
                assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), width
                sticking_out = page.evaluate("""() => Array.from(document.querySelectorAll('main *')).filter(e => {
                    const r = e.getBoundingClientRect();
                    if (r.width === 0 || r.right <= document.documentElement.clientWidth + 1) return false;
                    for (let a = e.parentElement; a; a = a.parentElement) {
                        if (['auto', 'scroll', 'hidden'].includes(getComputedStyle(a).overflowX)) return false;
                    }
                    return true;
                }).map(e => e.tagName + '.' + e.className)""")
                assert sticking_out == [], (width, sticking_out[:5])

            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            screenshots = os.environ.get("NPEFF_TL_SCREENSHOT_DIR")
            if screenshots:
                shutil.copy(tmp_path / "report.png", Path(screenshots) / "report.png")
        finally:
            browser.close()
    assert problems == []
    assert all(url.startswith("file://") for url in requests), requests
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_cards_show_each_measured_components_circuit_as_saved(staged_run):
    """Oracle: the traces the selectivity stage saved (checked against exact patching in test_tracing)."""
    from npeff_tl.tracing import load_trace

    page = _report(staged_run)
    index = json.loads((staged_run / "selectivity" / "dnpeff" / "traces" / "index.json").read_text())
    assert index["components"] and index["method"] == "atp*"
    for j in index["components"]:
        saved = load_trace(staged_run / "selectivity" / "dnpeff" / "traces" / str(j))
        block = re.search(rf'<details class="component" id="dnpeff-{j}".*?</details>', page, re.S).group(0)
        panel = re.search(r"<h3>circuit \(atp\*, kl, (\d+) top held-out examples\)</h3>(.*?)<p class=\"note\">", block,
                          re.S)
        assert int(panel.group(1)) == len(saved)
        shown = re.findall(r'<tr><td class="name">([^<]*)</td><td class="name">([^<]*)</td>', panel.group(2))
        assert [(html.unescape(node), where) for node, where in shown] == [
            (row["node"], "target" if row["offset"] == 0 else f"target-{row['offset']}") for row in saved.top_nodes(6)]
        assert "layer 1" in block  # the residual-stream heat map
