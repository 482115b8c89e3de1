"""The page itself: ``_Report`` reads a run directory's artifacts and renders each section of report.html."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from string import Template

import torch

from ..dictionaries import top_of
from ..evaluation.labels import components_by_mass, most_frequent
from ..evaluation.selectivity import load_selectivity
from ..config import RunConfig
from ..layout import RunLayout
from ..store import load_json, load_tensors
from ..tracing import load_trace
from .charts import dot_plot, escape, fmt, heat_table, histogram, readout_bars, selectivity_table


N_EXAMPLES_SHOWN = 8
MAX_COMPONENTS_SHOWN = 32  # per dictionary (wide SAEs have many features)
N_BAND_EXAMPLES = 3  # examples shown per lower quantile band of a component's held-out coefficients
BANDS = ((0.5, 0.75), (0.0, 0.25))  # quantile bands of the positive held-out coefficients, below the top examples
N_CIRCUIT_NODES = 6  # top nodes listed in a component's circuit panel
N_CIRCUIT_OFFSETS = 12  # positions (before the target) in its heat map
MIN_ACCURACY_DROP_SHOWN = 0.05  # an accuracy-drop heatmap whose cells all stay below this is left out
TABLE_FIGURES = {"n_components": "components", "ami": "AMI", "nmi": "NMI", "purity_at_20": "purity@20",
                 "multi_factor_recall": "multi-factor recall", "factor_auc": "factor AUC",
                 "median_selectivity": "median selectivity",
                 "median_strategy_selectivity": "median strategy selectivity",
                 "median_norm_selectivity": "median normalised selectivity",
                 "median_norm_strategy_selectivity": "median normalised strategy selectivity"}
HIGHER_IS_BETTER = set(TABLE_FIGURES) - {"n_components"}


def _asset(name: str) -> str:
    return resources.files("npeff_tl.report").joinpath("assets", name).read_text(encoding="utf-8")


class _Report:
    def __init__(self, out: Path):
        from ..decomp import load_decomposition

        layout = RunLayout(out)
        self.config = RunConfig.from_dict(load_json(layout.config))
        self.summary = _json(layout.summary)
        self.timings = _json(layout.timings) or {}
        self.display = _json(layout.examples)
        comparison = _json(layout.comparison / "comparison.json")
        self.rows = comparison["rows"] if comparison else []
        order = self.config.fit.methods + [r["method"] for r in self.rows]
        self.selectivity = _ordered({name: load_selectivity(layout.selectivity(name)) for name in layout.measured()},
                                    order)
        self.coefficients = _ordered({name: load_tensors(layout.coefficients(name))
                                      for name in layout.with_coefficients()}, order)
        self.decompositions = {m: load_decomposition(layout.decomposition(m)) for m in self.config.fit.methods
                               if layout.has_decomposition(m)}
        self.effects = {name: load_json(layout.effects(name)) for name in layout.measured()
                        if layout.has_effects(name)}
        self.circuits = {name: {j: load_trace(layout.traces(name) / str(j))
                                for j in load_json(layout.traces(name) / "index.json")["components"]}
                         for name in layout.measured() if layout.has_traces(name)}

    def render(self) -> str:
        from .. import __version__

        sections = [("overview", "Overview", self._overview()),
                    ("comparison", "Comparison", self._comparison()),
                    ("selectivity", "Selectivity", self._selectivity()),
                    ("heatmaps", "Component x strategy", self._heatmaps()),
                    ("coefficients", "Coefficients", self._coefficient_plots()),
                    ("components", "Components", self._components())]
        sections = [(key, title, body) for key, title, body in sections if body]
        model = self.summary["model"] if self.summary else self.config.model.name
        subtitle = ("Non-Negative Per-Example Fisher Factorization (Matena &amp; Raffel, arXiv 2310.04649) with "
                    "npeff_tl: components of per-example Fishers, the parameter perturbations they define, and "
                    "baselines on held-out examples.")
        return Template(_asset("template.html")).substitute(
            version=escape(__version__), model=escape(model), subtitle=subtitle, css=_asset("report.css"),
            js=_asset("report.js"),
            nav="".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections),
            sections="\n".join(f'<section id="{key}"><h2>{title}</h2>\n{body}</section>'
                               for key, title, body in sections))

    # -- overview -------------------------------------------------------------------------------------------

    def _overview(self) -> str:
        facts = [("model", self.config.model.name), ("data", self.config.data.source)]
        if self.display:
            facts.append(("examples", f"{len(self.display['train']):,} train / {len(self.display['test']):,} test"))
        if self.decompositions:
            dec = next(iter(self.decompositions.values()))
            facts.append(("parameters", f"{dec.space.size:,} ({', '.join(self.config.pefs.include)})"))
            facts.append(("class rule", str(dec.metadata.get("target", {}).get("classes", self.config.pefs.classes))))
            facts.append(("components", f"{self.config.fit.n_components} per method"))
        if self.summary:
            facts.append(("wall time", f"{self.summary['seconds']:.0f} s from scratch"))
        elif self.timings:
            facts.append(("wall time", f"{sum(self.timings.values()):.0f} s so far"))
        rows = "".join(f'<tr><td class="name">{escape(k)}</td><td class="name">{escape(v)}</td></tr>' for k, v in facts)
        measured = self.config.selectivity
        return (f'<div class="card"><table>{rows}</table></div>'
                f'<p class="note">Coefficient selectivity: mean KL on a component\'s {measured.n_top} highest '
                f'held-out examples divided by mean KL on {measured.n_baseline} other held-out examples, with the '
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
        header = "".join(f'<th class="sortable" title="{k}">{escape(label)}</th>' for k, label in TABLE_FIGURES.items())
        body = []
        for r in self.rows:
            control = "/" in r["method"]
            cells = []
            for k in TABLE_FIGURES:
                v = r.get(k)
                mark = ' class="best"' if not control and v is not None and v == best.get(k) else ""
                cells.append(f'<td{mark} data-value="{escape("-" if v is None else v)}">{fmt(v)}</td>')
            title = escape(r.get("description") or "")
            body.append(f'<tr class="{"control" if control else "method"}"><td class="name" title="{title}">'
                        f'{escape(r["method"])}</td>{"".join(cells)}</tr>')
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
                plots.append(f'<div class="card"><h3>{title} per component (log scale)</h3>{dot_plot(rows)}</div>')
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
                            f'{heat_table(drop, labels, result.strategies, log=False, links=links)}</div>')
            else:
                accuracy = (f'<p class="note">Accuracy changes by less than {MIN_ACCURACY_DROP_SHOWN:.0%} for every '
                            'component and strategy at this KL target, so its heatmap is left out.</p>')
            pair = (f'<div class="heat-pair"><div><h3>mean KL (nats)</h3>'
                    f'{heat_table(result.kl_matrix[name], labels, result.strategies, log=True, links=links)}</div>'
                    f'{accuracy}</div>')
            npeff = name in self.config.fit.methods
            cards.append(f'<details class="component heatmap" id="heatmap-{escape(name)}"{" open" if npeff else ""}>'
                         f'<summary><b>{escape(name)}</b></summary><div class="card">{pair}</div></details>')
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
            cards.append(f'<div class="card"><h3>{escape(name)}</h3>{histogram(positive.log10())}'
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
            parts.append(f"<h3>{escape(method)}{more}</h3>")
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
            tags.append(f"strategy {escape(strategy)}")
        if own.get("selectivity") is not None:
            tags.append(f'selectivity {fmt(own["selectivity"])}x')
        if own.get("strategy_selectivity") is not None:
            tags.append(f'strategy selectivity {fmt(own["strategy_selectivity"])}x')
        summary = (f'<summary><b>{escape(method)} component {j}</b>'
                   + "".join(f'<span class="tag">{t}</span>' for t in tags) + "</summary>")
        readout = readout_bars(dec.component(j).readout()) if dec is not None else ""
        scale = float(train.double().max())
        positive = test.double()[test > 0] / scale if scale > 0 else test.double()[:0]
        distribution = (f'<h3>held-out coefficients</h3>{histogram(positive.log10(), width=260, height=100)}'
                        f'<p class="note">{positive.numel():,} of {len(test):,} positive; log10 relative to the '
                        'largest training coefficient</p>')
        return (f'<details class="component" id="{escape(method)}-{j}"{" open" if open_ else ""}>{summary}'
                f'<div class="body"><div>{self._examples(test)}{self._bands(test)}</div>'
                f'<div>{distribution}{self._effects(method, j)}{self._circuit(method, j)}{readout}'
                f'{selectivity_table(records)}</div></div>'
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
            return "".join(f'<span class="tok" title="{v:+.3f} nats">{escape(text[str(t)])}</span> ' for t, v in pairs)

        shifts = "".join(
            f'<div class="example shift"><span class="tok">{escape(text[str(b)])}</span> {pb:.0%} &rarr; '
            f'<span class="tok">{escape(text[str(a)])}</span> {pa:.0%}</div>'
            for (b, pb), (a, pa) in zip(effect["before"], effect["after"]))
        sign = "+" if effect["sign"] == 1 else "-"
        return (f'<h3>logit effects ({sign} direction, on its {len(effect["examples"])} top held-out examples)</h3>'
                f'<p class="effects">promoted: {tokens(effect["promoted"])}</p>'
                f'<p class="effects">suppressed: {tokens(effect["suppressed"])}</p>'
                f'<p class="note">top prediction before &rarr; after, per example:</p>{shifts}')

    def _circuit(self, method: str, j: int) -> str:
        """Where the component's intervention travels (``npeff_tl.trace``): its top nodes and a layer x position
        map of the residual stream, where the run traced it."""
        result = self.circuits.get(method, {}).get(j)
        if result is None:
            return ""
        where = lambda offset: "target" if offset == 0 else f"target-{offset}"  # noqa: E731
        rows = "".join(f'<tr><td class="name">{escape(row["node"])}</td><td class="name">{where(row["offset"])}</td>'
                       f'<td>{fmt(row["effect"])}</td></tr>' for row in result.top_nodes(N_CIRCUIT_NODES))
        heat = result.heatmap()[:, :N_CIRCUIT_OFFSETS]
        table = heat_table(heat, [f"layer {layer}" for layer in range(heat.shape[0])],
                           [where(o).replace("target", "t") for o in range(heat.shape[1])], log=True)
        return (f'<h3>circuit ({escape(result.method)}, {escape(result.metric)}, {len(result)} top held-out examples)'
                f'</h3><table class="bars">{rows}</table>'
                f'<p class="note">Nodes whose activation, patched from the perturbed run into the original run, moves '
                f'the prediction most (mean over the examples); below, the same for the residual stream after each '
                f'block, by position before the target.</p>{table}')

    def _strategy(self, train: torch.Tensor) -> str | None:
        """The label most frequent among the component's top training examples (as selectivity assigns it)."""
        if not self.display or any(row.get("label") is None for row in self.display["train"]):
            return None
        top = top_of(train, self.config.selectivity.n_top_train)
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
        tokens = "".join(f'<span class="tok{" target" if t == row["position"] else ""}">{escape(tok)}</span>'
                         for t, tok in enumerate(row["tokens"][: row["position"] + 1]))
        answer = f' <span class="answer">&rarr; {escape(row["answer"])}</span>' if row.get("answer") is not None else ""
        return (f'<div class="{css}"><span class="coef" data-value="{value!r}">{value:.3g}</span>'
                f'<span class="label">{escape(row.get("label") or "")}</span>{tokens}{answer}</div>')


def _json(path: Path):
    return load_json(path) if path.exists() else None


def _ordered(items: dict, order: list[str]) -> dict:
    """``items`` with the names in ``order`` first (NPEFF methods, then the comparison's rows), then the rest."""
    rank = {name: i for i, name in reversed(list(enumerate(order)))}
    return dict(sorted(items.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))
