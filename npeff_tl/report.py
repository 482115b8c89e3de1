"""``report.html``: one self-contained page (inline CSS, JS and SVG; opens from disk with no network) showing a
run directory's results: the comparison table, selectivity plots with the random controls, component x strategy
heatmaps, coefficient distributions and, per NPEFF component, its top held-out examples (target token
highlighted), its readout in TL layouts (tensors, heads, neurons) and its selectivity.

The page is built from the run directory's artifacts alone (see ``npeff_tl.pipeline``); sections whose
artifacts are missing are left out.
"""

from __future__ import annotations

import html
import math
import os
from importlib import resources
from pathlib import Path
from string import Template

import torch

from .dictionaries import top_of
from .evaluation.labels import components_by_mass, most_frequent
from .evaluation.selectivity import SelectivityConfig, load_selectivity
from .store import load_json, load_tensors, save_text

N_EXAMPLES_SHOWN = 8
MAX_COMPONENTS_SHOWN = 32  # per dictionary (wide SAEs have many features)
N_BAND_EXAMPLES = 3  # examples shown per lower quantile band of a component's held-out coefficients
BANDS = ((0.5, 0.75), (0.0, 0.25))  # quantile bands of the positive held-out coefficients, below the top examples
MIN_ACCURACY_DROP_SHOWN = 0.05  # an accuracy-drop heatmap whose cells all stay below this is left out
TABLE_FIGURES = {"n_components": "components", "ami": "AMI", "nmi": "NMI", "purity_at_20": "purity@20",
                 "multi_factor_recall": "multi-factor recall", "median_selectivity": "median selectivity",
                 "median_strategy_selectivity": "median strategy selectivity",
                 "median_norm_selectivity": "median normalised selectivity",
                 "median_norm_strategy_selectivity": "median normalised strategy selectivity"}
HIGHER_IS_BETTER = set(TABLE_FIGURES) - {"n_components"}


def write_report(out: str | os.PathLike) -> Path:
    """Write ``out/report.html`` from the run directory ``out``; returns its path."""
    out = Path(out)
    if not (out / "config.json").exists():
        raise FileNotFoundError(f"{out} is not a run directory (no config.json); run `npeff-tl pefs --out {out}` "
                                f"or `npeff-tl demo --out {out}` first")
    path = out / "report.html"
    save_text(_Report(out).render(), path)
    return path


def _asset(name: str) -> str:
    return resources.files("npeff_tl").joinpath("report_assets", name).read_text(encoding="utf-8")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


class _Report:
    def __init__(self, out: Path):
        self.out = out
        self.config = load_json(out / "config.json")
        self.summary = self._json("summary.json")
        self.timings = self._json("timings.json") or {}
        self.display = self._json("data/examples.json")
        comparison = self._json("comparison/comparison.json")
        self.rows = comparison["rows"] if comparison else []
        order = self.config["fit"]["methods"] + [r["method"] for r in self.rows]
        self.selectivity = _ordered({p.parent.name: load_selectivity(p.parent)
                                     for p in (out / "selectivity").glob("*/selectivity.json")}, order)
        self.coefficients = _ordered({p.stem: load_tensors(p) for p in (out / "coefficients").glob("*.safetensors")},
                                     order)
        from .decomp import load_decomposition

        self.decompositions = {m: load_decomposition(out / m) for m in self.config["fit"]["methods"]
                               if (out / m / "metadata.json").exists()}
        self.effects = {p.parent.name: load_json(p) for p in (out / "selectivity").glob("*/effects.json")}

    def _json(self, name: str):
        return load_json(self.out / name) if (self.out / name).exists() else None

    def render(self) -> str:
        from . import __version__

        sections = [("overview", "Overview", self._overview()),
                    ("comparison", "Comparison", self._comparison()),
                    ("selectivity", "Selectivity", self._selectivity()),
                    ("heatmaps", "Component x strategy", self._heatmaps()),
                    ("coefficients", "Coefficients", self._coefficient_plots()),
                    ("components", "Components", self._components())]
        sections = [(key, title, body) for key, title, body in sections if body]
        model = self.summary["model"] if self.summary else self.config["model"]["name"]
        subtitle = ("Non-Negative Per-Example Fisher Factorization (Matena &amp; Raffel, arXiv 2310.04649) with "
                    "npeff_tl: components of per-example Fishers, the parameter perturbations they define, and "
                    "baselines on held-out examples.")
        return Template(_asset("template.html")).substitute(
            version=_e(__version__), model=_e(model), subtitle=subtitle, css=_asset("report.css"),
            js=_asset("report.js"),
            nav="".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections),
            sections="\n".join(f'<section id="{key}"><h2>{title}</h2>\n{body}</section>'
                               for key, title, body in sections))

    # -- overview -------------------------------------------------------------------------------------------

    def _overview(self) -> str:
        facts = [("model", self.config["model"]["name"]), ("data", self.config["data"]["source"])]
        if self.display:
            facts.append(("examples", f"{len(self.display['train']):,} train / {len(self.display['test']):,} test"))
        if self.decompositions:
            dec = next(iter(self.decompositions.values()))
            facts.append(("parameters", f"{dec.space.size:,} ({', '.join(self.config['pefs']['include'])})"))
            facts.append(("class rule", str(dec.metadata.get("target", {}).get("classes", self.config["pefs"]["classes"]))))
            facts.append(("components", f"{self.config['fit']['components']} per method"))
        if self.summary:
            facts.append(("wall time", f"{self.summary['seconds']:.0f} s from scratch"))
        elif self.timings:
            facts.append(("wall time", f"{sum(self.timings.values()):.0f} s so far"))
        rows = "".join(f'<tr><td class="name">{_e(k)}</td><td class="name">{_e(v)}</td></tr>' for k, v in facts)
        perturb = self.config["perturb"]
        return (f'<div class="card"><table>{rows}</table></div>'
                f'<p class="note">Coefficient selectivity: mean KL on a component\'s {perturb["n_top"]} highest '
                f'held-out examples divided by mean KL on {perturb["n_baseline"]} other held-out examples, with the '
                'perturbation scaled so the top set '
                'moves by the first KL target. Strategy selectivity: mean KL on held-out examples of the '
                'component\'s strategy divided by that on all others. Normalised: each ratio divided by the ratio of '
                'the two sets\' mean Fisher traces (a random step moves an example in proportion to its trace, so a '
                'random direction scores about 1). Controls are random directions of the same '
                'norm (anywhere, or on the component\'s support) at the same magnitudes.</p>')

    # -- comparison table -----------------------------------------------------------------------------------

    def _comparison(self) -> str:
        if not self.rows:
            return ""
        methods = [r for r in self.rows if "/" not in r["method"]]
        best = {}
        for key in HIGHER_IS_BETTER:
            values = [r.get(key) for r in methods if isinstance(r.get(key), (int, float))]
            best[key] = max(values) if values else None
        header = "".join(f'<th class="sortable" title="{k}">{_e(label)}</th>' for k, label in TABLE_FIGURES.items())
        body = []
        for r in self.rows:
            control = "/" in r["method"]
            cells = []
            for k in TABLE_FIGURES:
                v = r.get(k)
                mark = ' class="best"' if not control and v is not None and v == best.get(k) else ""
                cells.append(f'<td{mark} data-value="{_e("-" if v is None else v)}">{_fmt(v)}</td>')
            title = _e(r.get("description") or "")
            body.append(f'<tr class="{"control" if control else "method"}"><td class="name" title="{title}">'
                        f'{_e(r["method"])}</td>{"".join(cells)}</tr>')
        return (f'<div class="scroll"><table class="sortable" id="comparison-table"><thead><tr>'
                f'<th class="name sortable">method</th>{header}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
                '<p class="note">On the test split. Bold: the best method per column. Italic rows: random-direction '
                'controls of the parameter-space method before the slash. Click a header to sort.</p>')

    # -- selectivity ----------------------------------------------------------------------------------------

    def _selectivity(self) -> str:
        if not self.selectivity:
            return ""
        plots = []
        for key, title in (("selectivity", "coefficient selectivity"),
                           ("strategy_selectivity", "strategy selectivity"),
                           ("norm_selectivity", "normalised coefficient selectivity"),
                           ("norm_strategy_selectivity", "normalised strategy selectivity")):
            rows = []
            for name, result in self.selectivity.items():
                first = result.settings["kl_targets"][0]
                for method in result.methods:
                    dots = [(r[key], f"{name}-{r['component']}") for r in result.records
                            if r["method"] == method and r["kl_target"] == first and r.get(key) is not None]
                    if dots:
                        rows.append((method if method in self.selectivity else f"{result.methods[0]}/{method}",
                                     dots))
            if rows:
                plots.append(f'<div class="card"><h3>{title} per component (log scale)</h3>{_dot_plot(rows)}</div>')
        return ('<div class="grid">' + "".join(plots) + '</div><p class="note">One dot per component (hover for its '
                'value, click for its card); the bar is the median; the dashed line is 1 (no selectivity).</p>')

    # -- heatmaps -------------------------------------------------------------------------------------------

    def _heatmaps(self) -> str:
        cards = []
        for name, result in self.selectivity.items():
            if not result.strategies or name not in result.kl_matrix:
                continue
            strategy = {r["component"]: r["strategy"] for r in result.records if r["method"] == name}
            labels = [f"{j} ({strategy.get(j) or '?'})" for j in result.components]
            links = [f"#{name}-{j}" for j in result.components]
            drop = result.accuracy_drop[name]
            finite = drop[torch.isfinite(drop)]
            if finite.numel() and float(finite.abs().max()) >= MIN_ACCURACY_DROP_SHOWN:
                accuracy = (f'<div><h3>accuracy drop</h3>'
                            f'{_heat_table(drop, labels, result.strategies, log=False, links=links)}</div>')
            else:
                accuracy = (f'<p class="note">Accuracy changes by less than {MIN_ACCURACY_DROP_SHOWN:.0%} for every '
                            'component and strategy at this KL target, so its heatmap is left out.</p>')
            pair = (f'<div class="heat-pair"><div><h3>mean KL (nats)</h3>'
                    f'{_heat_table(result.kl_matrix[name], labels, result.strategies, log=True, links=links)}</div>'
                    f'{accuracy}</div>')
            npeff = name in self.config["fit"]["methods"]
            cards.append(f'<details class="component heatmap" id="heatmap-{_e(name)}"{" open" if npeff else ""}>'
                         f'<summary><b>{_e(name)}</b></summary><div class="card">{pair}</div></details>')
        if not cards:
            return ""
        return ('<p class="note">Rows: components (with the strategy most frequent among their top training '
                'examples); columns: held-out examples by ground-truth strategy; each component perturbed at its '
                'calibrated magnitude. A selective component lights up one column.</p>' + "".join(cards))

    # -- coefficient distributions --------------------------------------------------------------------------

    def _coefficient_plots(self) -> str:
        cards = []
        for name, tensors in self.coefficients.items():
            scale = tensors["train"].double().max(0).values
            alive = scale > 0  # components never active on train have no scale
            W = tensors["test"].double()[:, alive] / scale[alive]
            positive = W[W > 0]
            zero_share = 1 - positive.numel() / max(W.numel(), 1)
            dead = f", {int((~alive).sum())} components never active on train" if not bool(alive.all()) else ""
            cards.append(f'<div class="card"><h3>{_e(name)}</h3>{_histogram(positive.log10())}'
                         f'<p class="note">{zero_share:.0%} of test coefficients are zero{dead}</p></div>')
        if not cards:
            return ""
        return ('<p class="note">Positive test coefficients relative to each component\'s largest training '
                'coefficient, log10; the first bar holds everything at or below 1e-4. A dictionary whose mass sits '
                'near 1e0 uses few, strong coefficients per example.</p><div class="grid">' + "".join(cards) + "</div>")

    # -- per component --------------------------------------------------------------------------------------

    def _components(self) -> str:
        parts = []
        for method, tensors in self.coefficients.items():
            W_train, W_test = tensors["train"], tensors["test"]
            records = {}
            if method in self.selectivity:
                result = self.selectivity[method]
                first = result.settings["kl_targets"][0]
                for r in result.records:
                    if r["kl_target"] == first:
                        records.setdefault(r["component"], {})[r["method"]] = r
            order = components_by_mass(W_train)
            left_out = len(order) - MAX_COMPONENTS_SHOWN
            order = order[:MAX_COMPONENTS_SHOWN]
            largest = torch.bincount(W_test.double().argmax(1)[W_test.double().max(1).values > 0],
                                     minlength=W_test.shape[1]).double() / max(len(W_test), 1)
            dec = self.decompositions.get(method)
            more = f" (the {len(order)} with the most training mass; {left_out} more)" if left_out > 0 else ""
            parts.append(f"<h3>{_e(method)}{more}</h3>")
            for rank, j in enumerate(order):
                parts.append(self._component(method, dec, j, W_train[:, j], W_test[:, j], records.get(j, {}),
                                             dec is not None and rank < 2, float(largest[j])))
        if not parts:
            return ""
        return ('<div class="toolbar"><button data-toggle-components="open">expand all</button>'
                '<button data-toggle-components="close">collapse all</button></div>'
                '<p class="note">Per dictionary, components ordered by training mass: the top held-out examples by '
                'coefficient (the highlighted token is the target position; the prediction made there follows '
                'the arrow), examples from lower bands of its held-out coefficients, the distribution of those '
                'coefficients, what its intervention does to predictions and, for NPEFF, where the component\'s '
                'Fisher mass sits. A component\'s strategy is the label most frequent among its top training '
                'examples. Tokens are not shaded by attribution: an NPEFF coefficient comes from a non-negative fit '
                'to the example\'s whole Fisher, not from a differentiable read-out of the tokens, so it has no '
                'per-token gradient to show; the logit effects say instead what the component does.</p>'
                + "".join(parts))

    def _component(self, method: str, dec, j: int, train: torch.Tensor, test: torch.Tensor, records: dict,
                   open_: bool, largest: float) -> str:
        own = records.get(method, {})
        tags = [f"largest on {largest:.0%} of test examples"]
        strategy = own.get("strategy") or self._strategy(train)
        if strategy:
            tags.append(f"strategy {_e(strategy)}")
        if own.get("selectivity") is not None:
            tags.append(f'selectivity {_fmt(own["selectivity"])}x')
        if own.get("strategy_selectivity") is not None:
            tags.append(f'strategy selectivity {_fmt(own["strategy_selectivity"])}x')
        summary = (f'<summary><b>{_e(method)} component {j}</b>'
                   + "".join(f'<span class="tag">{t}</span>' for t in tags) + "</summary>")
        readout = _readout(dec.component(j).readout()) if dec is not None else ""
        scale = float(train.double().max())
        positive = test.double()[test > 0] / scale if scale > 0 else test.double()[:0]
        histogram = (f'<h3>held-out coefficients</h3>{_histogram(positive.log10(), width=260, height=100)}'
                     f'<p class="note">{positive.numel():,} of {len(test):,} positive; log10 relative to the largest '
                     'training coefficient</p>')
        return (f'<details class="component" id="{_e(method)}-{j}"{" open" if open_ else ""}>{summary}'
                f'<div class="body"><div>{self._examples(test)}{self._bands(test)}</div>'
                f'<div>{histogram}{self._effects(method, j)}{readout}{_selectivity_table(records)}</div></div>'
                '</details>')

    def _bands(self, coefficients: torch.Tensor) -> str:
        """A few examples from lower quantile bands of the positive held-out coefficients."""
        if not self.display:
            return ""
        positive = torch.nonzero(coefficients > 0).flatten()
        if len(positive) <= N_EXAMPLES_SHOWN:
            return ""
        ordered = positive[coefficients[positive].argsort(descending=True)][N_EXAMPLES_SHOWN:]  # below the top
        parts, n = [], len(ordered)
        for lo, hi in BANDS:
            first = int(n * (1 - hi))  # ordered is descending: quantile hi comes first
            band = ordered[first: max(int(n * (1 - lo)), first + 1)]
            picks = band[torch.linspace(0, len(band) - 1, min(N_BAND_EXAMPLES, len(band))).round().long()]
            rows = "".join(self._example(int(i), float(coefficients[i]), "example band") for i in picks.tolist())
            parts.append(f'<h3>quantiles {lo:.0%}-{hi:.0%} of the rest</h3>{rows}')
        return "".join(parts)

    def _effects(self, method: str, j: int) -> str:
        """The component's logit effects (``npeff_tl.effects``), where the run measured them."""
        saved = self.effects.get(method)
        effect = next((e for e in saved["effects"] if e["component"] == j), None) if saved else None
        if effect is None:
            return ""
        text = saved["tokens"]

        def tokens(pairs):
            return "".join(f'<span class="tok" title="{v:+.3f} nats">{_e(text[str(t)])}</span> ' for t, v in pairs)

        shifts = "".join(
            f'<div class="example shift"><span class="tok">{_e(text[str(b)])}</span> {pb:.0%} &rarr; '
            f'<span class="tok">{_e(text[str(a)])}</span> {pa:.0%}</div>'
            for (b, pb), (a, pa) in zip(effect["before"], effect["after"]))
        sign = "+" if effect["sign"] == 1 else "-"
        return (f'<h3>logit effects ({sign} direction, on its {len(effect["examples"])} top held-out examples)</h3>'
                f'<p class="effects">promoted: {tokens(effect["promoted"])}</p>'
                f'<p class="effects">suppressed: {tokens(effect["suppressed"])}</p>'
                f'<p class="note">top prediction before &rarr; after, per example:</p>{shifts}')

    def _strategy(self, train: torch.Tensor) -> str | None:
        """The label most frequent among the component's top training examples (as selectivity assigns it)."""
        if not self.display or any(row.get("label") is None for row in self.display["train"]):
            return None
        top = top_of(train, SelectivityConfig().n_top_train)  # the pipeline measures at the default
        found = most_frequent(self.display["train"][i]["label"] for i in top.tolist())
        return found[0] if found else None

    def _examples(self, coefficients: torch.Tensor) -> str:
        if not self.display:
            return ""
        top = coefficients.topk(min(N_EXAMPLES_SHOWN, len(coefficients)))
        lines = [self._example(i, value) for i, value in zip(top.indices.tolist(), top.values.tolist()) if value > 0]
        return "<h3>top held-out examples</h3>" + ("".join(lines) or '<p class="note">no positive coefficients</p>')

    def _example(self, i: int, value: float, css: str = "example") -> str:
        row = self.display["test"][i]
        tokens = "".join(f'<span class="tok{" target" if t == row["position"] else ""}">{_e(tok)}</span>'
                         for t, tok in enumerate(row["tokens"][: row["position"] + 1]))
        answer = f' <span class="answer">&rarr; {_e(row["answer"])}</span>' if row.get("answer") is not None else ""
        return (f'<div class="{css}"><span class="coef" data-value="{value!r}">{value:.3g}</span>'
                f'<span class="label">{_e(row.get("label") or "")}</span>{tokens}{answer}</div>')


def _ordered(items: dict, order: list[str]) -> dict:
    """``items`` with the names in ``order`` first (NPEFF methods, then the comparison's rows), then the rest."""
    rank = {name: i for i, name in reversed(list(enumerate(order)))}
    return dict(sorted(items.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def _selectivity_table(records: dict) -> str:
    if not records:
        return ""
    keys = ("selectivity", "strategy_selectivity", "norm_selectivity", "norm_strategy_selectivity")
    rows = "".join(f'<tr><td class="name">{_e(m)}</td>' + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys)
                   + "</tr>" for m, r in records.items())
    return ('<h3>selectivity (this component and its controls)</h3><table><thead><tr><th class="name">method</th>'
            '<th>coefficient</th><th>strategy</th><th>normalised coefficient</th><th>normalised strategy</th>'
            f'</tr></thead><tbody>{rows}</tbody></table>')


def _readout(readout) -> str:
    tensors = sorted(readout.tensors.items(), key=lambda kv: -kv[1])[:6]
    bars = "".join(f'<tr><td class="name">{_e(name)}</td><td class="name"><span class="bar" '
                   f'style="width:{max(1, round(140 * share))}px"></span> {share:.1%}</td></tr>'
                   for name, share in tensors)
    out = f'<h3>mass per parameter tensor</h3><table class="bars">{bars}</table>'
    if readout.heads.numel() and float(readout.heads.sum()) > 0:
        labels = [f"L{layer}" for layer in range(readout.heads.shape[0])]
        heads = [f"H{h}" for h in range(readout.heads.shape[1])]
        out += f'<h3>mass per attention head</h3>{_heat_table(readout.heads, labels, heads, log=False, percent=True)}'
    if readout.neurons.numel() and float(readout.neurons.sum()) > 0:
        flat = readout.neurons.flatten()
        top = flat.topk(min(5, flat.numel()))
        d_mlp = readout.neurons.shape[1]
        cells = ", ".join(f"L{i // d_mlp}.N{i % d_mlp} {v:.1%}" for i, v in zip(top.indices.tolist(), top.values.tolist()))
        out += f'<p class="note">top MLP neurons: {cells}</p>'
    return out


def _color(t: float) -> tuple[str, str]:
    """Background and text colour for t in [0, 1] (white to deep blue)."""
    t = min(max(t, 0.0), 1.0)
    stops = [(255, 255, 255), (165, 216, 255), (51, 154, 240), (24, 100, 171), (16, 50, 110)]
    x = t * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    f = x - i
    rgb = [round(a + (b - a) * f) for a, b in zip(stops[i], stops[i + 1])]
    return "#%02x%02x%02x" % tuple(rgb), ("#fff" if t > 0.55 else "#1d2330")


def _heat_table(matrix: torch.Tensor, rows: list[str], columns, log: bool, percent: bool = False,
                links: list[str] | None = None) -> str:
    M = matrix.double()
    finite = M[torch.isfinite(M)]
    if log:
        positive = finite[finite > 0]
        lo, hi = (float(positive.min().log10()), float(positive.max().log10())) if positive.numel() else (0.0, 1.0)
    else:
        lo, hi = 0.0, max(float(finite.abs().max()) if finite.numel() else 0.0, 0.1)  # shares / accuracy drops
    span = (hi - lo) or 1.0
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for r, (label, row) in enumerate(zip(rows, M.tolist())):
        cells = []
        for v in row:
            if not math.isfinite(v):
                cells.append("<td>-</td>")
                continue
            t = ((math.log10(v) if v > 0 else lo) - lo) / span if log else abs(v) / span
            background, ink = _color(t)
            text = f"{v:.1%}" if percent else _fmt(v)
            cells.append(f'<td style="background:{background};color:{ink}">{text}</td>')
        name = f'<a href="{_e(links[r])}">{_e(label)}</a>' if links else _e(label)
        body.append(f'<tr><th class="name">{name}</th>{"".join(cells)}</tr>')
    return f'<table class="heat"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _dot_plot(rows: list[tuple[str, list[tuple[float, str]]]]) -> str:
    """An SVG strip plot, one row per method, x = log10(value); each dot (value, card id) links to its card."""
    logs = [math.log10(max(v, 1e-6)) for _, dots in rows for v, _ in dots]
    lo, hi = math.floor(min(logs + [0.0])), math.ceil(max(logs + [0.0]))
    hi = hi if hi > lo else lo + 1
    left = 16 + 6 * max(len(name) for name, _ in rows)  # room for the longest name at 11 px
    width, step = 420, 28
    height = step * len(rows) + 34

    def x(value: float) -> float:
        return left + (math.log10(max(value, 1e-6)) - lo) / (hi - lo) * width

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" height="{height}" role="img">']
    for tick in range(lo, hi + 1):
        px = left + (tick - lo) / (hi - lo) * width
        parts.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="6" y2="{height - 24}" stroke="#e3e7ee"/>')
        parts.append(f'<text x="{px:.1f}" y="{height - 8}" text-anchor="middle">1e{tick}</text>')
    one = x(1.0)
    parts.append(f'<line x1="{one:.1f}" x2="{one:.1f}" y1="6" y2="{height - 24}" stroke="#c92a2a" '
                 'stroke-dasharray="4 3"/>')
    for i, (name, dots) in enumerate(rows):
        y = 20 + i * step
        control = "/" in name
        parts.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{_e(name)}</text>')
        colour = "#868e96" if control else "#3b5bdb"
        for v, card in dots:
            component = card.rsplit("-", 1)[1]
            parts.append(f'<a href="#{_e(card)}"><circle cx="{x(v):.1f}" cy="{y}" r="4" fill="{colour}" '
                         f'fill-opacity="0.55"><title>{_e(name)}, component {component}: {_fmt(v)}</title>'
                         '</circle></a>')
        values = [v for v, _ in dots]
        median = sorted(values)[len(values) // 2] if len(values) % 2 else \
            (sorted(values)[len(values) // 2 - 1] * sorted(values)[len(values) // 2]) ** 0.5
        parts.append(f'<line x1="{x(median):.1f}" x2="{x(median):.1f}" y1="{y - 9}" y2="{y + 9}" stroke="#1d2330" '
                     'stroke-width="3"/>')
    parts.append("</svg>")
    return "".join(parts)


def _histogram(values: torch.Tensor, bins: int = 24, lo: float = -4.0, width: int = 300, height: int = 130) -> str:
    """An SVG histogram of ``values`` (log10 relative coefficients) from ``lo`` (values below go in the first
    bar) to the largest value."""
    left, bottom = 30, 22
    if values.numel() == 0:
        return '<p class="note">no positive coefficients</p>'
    hi = max(float(values.max()), 0.0)
    counts = torch.histc(values.double().clamp(min=lo), bins=bins, min=lo, max=hi)
    peak = float(counts.max()) or 1.0
    bar = (width - left) / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for i, c in enumerate(counts.tolist()):
        h = (height - bottom - 6) * c / peak
        parts.append(f'<rect x="{left + i * bar:.1f}" y="{height - bottom - h:.1f}" width="{bar - 1:.1f}" '
                     f'height="{h:.1f}" fill="#3b5bdb"/>')
    parts.append(f'<text x="{left}" y="{height - 6}">&#8804;1e{lo:.0f}</text>')
    parts.append(f'<text x="{width}" y="{height - 6}" text-anchor="end">{_power_of_ten(hi)}</text>')
    parts.append(f'<text x="2" y="12">{int(peak)}</text></svg>')
    return "".join(parts)


def _power_of_ten(exponent: float) -> str:
    """10**exponent as an axis label: "1", "1e-3", or 3 significant digits between."""
    if abs(exponent - round(exponent)) < 0.05:
        return "1" if round(exponent) == 0 else f"1e{round(exponent)}"
    return f"{10 ** exponent:.3g}"
