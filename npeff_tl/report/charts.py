"""The report's building blocks: escaping and number formats, tables, heat maps and inline SVG charts (no
libraries, so the page opens from disk with no network)."""

from __future__ import annotations

import html
import math

import torch


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def selectivity_table(records: dict) -> str:
    if not records:
        return ""
    keys = ("selectivity", "strategy_selectivity", "norm_selectivity", "norm_strategy_selectivity")
    rows = "".join(f'<tr><td class="name">{escape(m)}</td>' + "".join(f"<td>{fmt(r.get(k))}</td>" for k in keys)
                   + "</tr>" for m, r in records.items())
    return ('<h3>selectivity (this component and its controls)</h3><table><thead><tr><th class="name">method</th>'
            '<th>coefficient</th><th>strategy</th><th>normalised coefficient</th><th>normalised strategy</th>'
            f'</tr></thead><tbody>{rows}</tbody></table>')


def readout_bars(readout) -> str:
    tensors = sorted(readout.tensors.items(), key=lambda kv: -kv[1])[:6]
    bars = "".join(f'<tr><td class="name">{escape(name)}</td><td class="name"><span class="bar" '
                   f'style="width:{max(1, round(140 * share))}px"></span> {share:.1%}</td></tr>'
                   for name, share in tensors)
    out = f'<h3>mass per parameter tensor</h3><table class="bars">{bars}</table>'
    if readout.heads.numel() and float(readout.heads.sum()) > 0:
        labels = [f"L{layer}" for layer in range(readout.heads.shape[0])]
        heads = [f"H{h}" for h in range(readout.heads.shape[1])]
        out += f'<h3>mass per attention head</h3>{heat_table(readout.heads, labels, heads, log=False, percent=True)}'
    if readout.groups.numel() and float(readout.groups.sum()) > 0:
        per_group = readout.heads.shape[1] // readout.groups.shape[1]
        groups = [f"H{g * per_group}-{(g + 1) * per_group - 1}" for g in range(readout.groups.shape[1])]
        out += (f'<h3>mass per key/value group</h3><p class="note">grouped-query attention: query heads '
                f'{", ".join(groups)} share one key/value head each; a group\'s mass is its query heads\' and its '
                f'key/value head\'s (the table above spreads each key/value head over its query heads)</p>'
                f'{heat_table(readout.groups, labels, groups, log=False, percent=True)}')
    if readout.neurons.numel() and float(readout.neurons.sum()) > 0:
        flat = readout.neurons.flatten()
        top = flat.topk(min(5, flat.numel()))
        d_mlp = readout.neurons.shape[1]
        cells = ", ".join(f"L{i // d_mlp}.N{i % d_mlp} {v:.1%}" for i, v in zip(top.indices.tolist(), top.values.tolist()))
        gated = any(name.endswith(("mlp.W_gate", "mlp.b_gate")) for name in readout.tensors)
        parts = "gate, input and output weights" if gated else "input and output weights"
        out += f'<p class="note">top MLP neurons ({parts} of each neuron): {cells}</p>'
    return out


def color(t: float) -> tuple[str, str]:
    """Background and text colour for t in [0, 1] (white to deep blue)."""
    t = min(max(t, 0.0), 1.0)
    stops = [(255, 255, 255), (165, 216, 255), (51, 154, 240), (24, 100, 171), (16, 50, 110)]
    x = t * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    f = x - i
    rgb = [round(a + (b - a) * f) for a, b in zip(stops[i], stops[i + 1])]
    return "#%02x%02x%02x" % tuple(rgb), ("#fff" if t > 0.55 else "#1d2330")


def heat_table(matrix: torch.Tensor, rows: list[str], columns, log: bool, percent: bool = False,
                links: list[str] | None = None) -> str:
    M = matrix.double()
    finite = M[torch.isfinite(M)]
    if log:
        positive = finite[finite > 0]
        lo, hi = (float(positive.min().log10()), float(positive.max().log10())) if positive.numel() else (0.0, 1.0)
    else:
        lo, hi = 0.0, max(float(finite.abs().max()) if finite.numel() else 0.0, 0.1)  # shares / accuracy drops
    span = (hi - lo) or 1.0
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for r, (label, row) in enumerate(zip(rows, M.tolist())):
        cells = []
        for v in row:
            if not math.isfinite(v):
                cells.append("<td>-</td>")
                continue
            t = ((math.log10(v) if v > 0 else lo) - lo) / span if log else abs(v) / span
            background, ink = color(t)
            text = f"{v:.1%}" if percent else fmt(v)
            cells.append(f'<td style="background:{background};color:{ink}">{text}</td>')
        name = f'<a href="{escape(links[r])}">{escape(label)}</a>' if links else escape(label)
        body.append(f'<tr><th class="name">{name}</th>{"".join(cells)}</tr>')
    return f'<table class="heat"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def dot_plot(rows: list[tuple[str, list[tuple[float, str]]]]) -> str:
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
        parts.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{escape(name)}</text>')
        colour = "#868e96" if control else "#3b5bdb"
        for v, card in dots:
            component = card.rsplit("-", 1)[1]
            parts.append(f'<a href="#{escape(card)}"><circle cx="{x(v):.1f}" cy="{y}" r="4" fill="{colour}" '
                         f'fill-opacity="0.55"><title>{escape(name)}, component {component}: {fmt(v)}</title>'
                         '</circle></a>')
        values = [v for v, _ in dots]
        median = sorted(values)[len(values) // 2] if len(values) % 2 else \
            (sorted(values)[len(values) // 2 - 1] * sorted(values)[len(values) // 2]) ** 0.5
        parts.append(f'<line x1="{x(median):.1f}" x2="{x(median):.1f}" y1="{y - 9}" y2="{y + 9}" stroke="#1d2330" '
                     'stroke-width="3"/>')
    parts.append("</svg>")
    return "".join(parts)


def histogram(values: torch.Tensor, bins: int = 24, lo: float = -4.0, width: int = 300, height: int = 130) -> str:
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
    parts.append(f'<text x="{width}" y="{height - 6}" text-anchor="end">{power_of_ten(hi)}</text>')
    parts.append(f'<text x="2" y="12">{int(peak)}</text></svg>')
    return "".join(parts)


def power_of_ten(exponent: float) -> str:
    """10**exponent as an axis label: "1", "1e-3", or 3 significant digits between."""
    if abs(exponent - round(exponent)) < 0.05:
        return "1" if round(exponent) == 0 else f"1e{round(exponent)}"
    return f"{10 ** exponent:.3g}"
