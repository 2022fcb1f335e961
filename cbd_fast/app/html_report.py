"""``report.html``: the purification report as ONE self-contained file.

Every figure is an inline SVG drawn here (no matplotlib, no JavaScript, no external fonts, styles or
images), so the file opens anywhere, offline, and survives being mailed or attached to a ticket.
It shows:

- the run at a glance: model, features purified, data, time, throughput, final health, ACC/ASR;
- the loss terms per logged step (``history[i]["steps"]``; per epoch when a history has no steps);
- throughput per logged step and per epoch;
- the label-free health figures per epoch (k-NN agreement, CKA, rank and spread ratios) with the
  thresholds of the config;
- the before/after feature picture (the 2-D PCA projection of :func:`cbd_fast.app.report.project_2d`);
- the ACC/ASR table when labels were given, the evocation diagnostic's numbers;
- the purification record's hashes (when written), the config, versions and build, notes.

:func:`render_html` returns the page; :func:`cbd_fast.app.report.write_report` writes it beside
``report.json``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["render_html", "line_chart", "bar_chart", "scatter_panels", "step_series", "PALETTE"]

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_SET_COLORS = {"clean": "#1f77b4", "adversarial": "#ff7f0e", "triggered": "#d62728"}
_LOSS_KEYS = ("loss", "loss_pull", "loss_clean", "attack_loss")
_HEALTH = (
    ("health_knn", "k-NN agreement", "health_min_knn"),
    ("health_cka", "CKA", None),
    ("health_rank", "effective rank ratio", "health_min_rank"),
    ("health_spread", "spread ratio", "health_min_spread"),
    ("health_drift", "feature drift (0 = unchanged)", "health_max_drift"),
    ("health_flip", "pseudo-class changes (0 = none)", "health_max_flip"),
    ("health_head_change", "changed predictions of the head (0 = none)", "health_max_head_change"),
)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: Any) -> str:
    v = _num(value)
    if v is None:
        return _e(value)
    if float(v).is_integer() and abs(v) < 1e12:
        return str(int(v))
    return f"{v:.4g}"


# ------------------------------------------------------------------------------------------ SVG


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


class _Frame:
    """A plotting frame: data ranges mapped to an SVG box with margins for axes and labels."""

    def __init__(
        self,
        width: int,
        height: int,
        xr: tuple[float, float],
        yr: tuple[float, float],
        *,
        left: int = 62,
        right: int = 16,
    ) -> None:
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = left, right, 34, 46
        self.x0, self.x1 = xr
        self.y0, self.y1 = yr
        if self.x1 <= self.x0:
            self.x0, self.x1 = self.x0 - 0.5, self.x0 + 0.5
        if self.y1 <= self.y0:
            self.y0, self.y1 = self.y0 - 0.5, self.y0 + 0.5
        slack_x, slack_y = 1e-9 * (self.x1 - self.x0), 1e-9 * (self.y1 - self.y0)
        self.xt = [t for t in _nice_ticks(self.x0, self.x1) if self.x0 - slack_x <= t <= self.x1 + slack_x]
        self.yt = [t for t in _nice_ticks(self.y0, self.y1) if self.y0 - slack_y <= t <= self.y1 + slack_y]

    def x(self, v: float) -> float:
        return self.left + (v - self.x0) / (self.x1 - self.x0) * (self.w - self.left - self.right)

    def y(self, v: float) -> float:
        return self.h - self.bottom - (v - self.y0) / (self.y1 - self.y0) * (self.h - self.top - self.bottom)

    def axes(self, title: str, xlabel: str, ylabel: str) -> list[str]:
        out = [
            f'<rect x="{self.left}" y="{self.top}" width="{self.w - self.left - self.right}" '
            f'height="{self.h - self.top - self.bottom}" fill="#fbfbfd" stroke="#bbb"/>'
        ]
        for t in self.yt:
            y = self.y(t)
            out.append(
                f'<line x1="{self.left}" x2="{self.w - self.right}" y1="{y:.1f}" y2="{y:.1f}" '
                'stroke="#e4e4ea"/>'
            )
            out.append(
                f'<text x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
                f"{_tick_label(t)}</text>"
            )
        for t in self.xt:
            x = self.x(t)
            out.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.top}" y2="{self.h - self.bottom}" '
                'stroke="#eeeef3"/>'
            )
            out.append(
                f'<text x="{x:.1f}" y="{self.h - self.bottom + 16}" text-anchor="middle" class="tick">'
                f"{_tick_label(t)}</text>"
            )
        out.append(f'<text x="{self.w / 2:.0f}" y="20" text-anchor="middle" class="title">{_e(title)}</text>')
        out.append(
            f'<text x="{(self.left + self.w - self.right) / 2:.0f}" y="{self.h - 8}" text-anchor="middle" '
            f'class="label">{_e(xlabel)}</text>'
        )
        cy = (self.top + self.h - self.bottom) / 2
        out.append(
            f'<text x="14" y="{cy:.0f}" text-anchor="middle" class="label" '
            f'transform="rotate(-90 14 {cy:.0f})">{_e(ylabel)}</text>'
        )
        return out


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{_e(label)}">' + "".join(body) + "</svg>"
    )


def _legend(items: Sequence[tuple[str, str]], x: float, y: float, *, box: bool = True) -> list[str]:
    out = []
    if box and items:
        w = 24 + 7 * max(len(label) for label, _ in items)
        out.append(
            f'<rect x="{x - 5:.0f}" y="{y - 13:.0f}" width="{w}" height="{15 * len(items) + 6}" '
            'fill="#ffffff" fill-opacity="0.85" stroke="#ccc"/>'
        )
    for i, (label, color) in enumerate(items):
        yy = y + 15 * i
        out.append(f'<rect x="{x:.0f}" y="{yy - 8:.0f}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{x + 14:.0f}" y="{yy + 1:.0f}" class="legend">{_e(label)}</text>')
    return out


def line_chart(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    hlines: Sequence[tuple[str, float]] = (),
    width: int = 720,
    height: int = 320,
    markers: bool = False,
) -> str:
    """An SVG line chart: ``series`` of ``(label, xs, ys)`` (None/NaN points are skipped), dashed
    horizontal reference lines ``hlines`` of ``(label, y)``, a legend inside the plot."""
    pts = [
        [(float(x), float(y)) for x, y in zip(xs, ys) if _num(x) is not None and _num(y) is not None]
        for _, xs, ys in series
    ]
    allx = [p[0] for s in pts for p in s]
    ally = [p[1] for s in pts for p in s] + [float(v) for _, v in hlines]
    if not allx:
        return _svg(width, 60, [f'<text x="10" y="30" class="label">{_e(title)}: no data</text>'], title)
    pad = 0.05 * ((max(ally) - min(ally)) or abs(max(ally)) or 1.0)
    xpad = 0.02 * ((max(allx) - min(allx)) or 1.0)
    legend_width = 28 + 7 * max(len(label) for label, _, _ in series)
    frame = _Frame(
        width,
        height,
        (min(allx) - xpad, max(allx) + xpad),
        (min(ally) - pad, max(ally) + pad),
        right=legend_width + 12,
    )
    body = frame.axes(title, xlabel, ylabel)
    for i, (label, v) in enumerate(hlines):
        y = frame.y(float(v))
        body.append(
            f'<line x1="{frame.left}" x2="{width - frame.right}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="#888" stroke-dasharray="5 4"/>'
        )
        body.append(
            f'<text x="{width - frame.right - 4}" y="{y - 4 - 12 * i:.1f}" text-anchor="end" '
            f'class="legend">{_e(label)}</text>'
        )
    legend = []
    for i, ((label, _, _), points) in enumerate(zip(series, pts)):
        color = PALETTE[i % len(PALETTE)]
        legend.append((label, color))
        if not points:
            continue
        path = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in points)
        body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        if markers or len(points) == 1:
            body += [
                f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="3.5" fill="{color}"/>'
                for x, y in points
            ]
    body += _legend(legend, width - frame.right + 14, frame.top + 14, box=False)
    return _svg(width, height, body, title)


def bar_chart(
    labels: Sequence[str], values: Sequence[float], *, title: str, xlabel: str, ylabel: str, width: int = 720
) -> str:
    """An SVG bar chart of ``values`` (one bar per label)."""
    vals = [_num(v) or 0.0 for v in values]
    height = 280
    if not vals:
        return _svg(width, 60, [f'<text x="10" y="30" class="label">{_e(title)}: no data</text>'], title)
    frame = _Frame(width, height, (0.0, float(len(vals))), (0.0, max(vals) * 1.12 or 1.0), right=40)
    frame.xt = []  # categorical axis: labels under the bars instead of numeric ticks
    body = frame.axes(title, xlabel, ylabel)
    slot = (width - frame.left - frame.right) / len(vals)
    for i, (label, v) in enumerate(zip(labels, vals)):
        x = frame.left + slot * (i + 0.2)
        y = frame.y(v)
        body.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.6:.1f}" height="{frame.y(0) - y:.1f}" '
            'fill="#2ca02c"/>'
        )
        body.append(
            f'<text x="{x + slot * 0.3:.1f}" y="{height - frame.bottom + 16}" text-anchor="middle" '
            f'class="tick">{_e(label)}</text>'
        )
        body.append(
            f'<text x="{x + slot * 0.3:.1f}" y="{y - 4:.1f}" text-anchor="middle" class="tick">{v:.3g}</text>'
        )
    return _svg(width, height, body, title)


def scatter_panels(
    panels: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    title: str,
    xlabel: str = "PC1",
    ylabel: str = "PC2",
    size: int = 420,
    max_points: int = 600,
) -> str:
    """Side-by-side SVG scatter plots sharing one axis range: ``panels`` of ``(title, {set: [n, 2]})``
    (arrays or nested lists); each set keeps at most ``max_points`` evenly spaced points."""
    sets = [
        (t, {k: [(float(p[0]), float(p[1])) for p in v] for k, v in d.items() if v is not None})
        for t, d in panels
    ]
    allp = [p for _, d in sets for v in d.values() for p in v]
    width = size * max(len(sets), 1)
    if not allp:
        return _svg(width, 60, [f'<text x="10" y="30" class="label">{_e(title)}: no data</text>'], title)
    xs, ys = [p[0] for p in allp], [p[1] for p in allp]
    px = 0.05 * ((max(xs) - min(xs)) or 1.0)
    py = 0.05 * ((max(ys) - min(ys)) or 1.0)
    body: list[str] = []
    for i, (ptitle, d) in enumerate(sets):
        frame = _Frame(size, size, (min(xs) - px, max(xs) + px), (min(ys) - py, max(ys) + py), left=52)
        panel = frame.axes(ptitle, xlabel, ylabel)
        legend = []
        for name in sorted(d, key=lambda k: (list(_SET_COLORS).index(k) if k in _SET_COLORS else 9, k)):
            color = _SET_COLORS.get(name, PALETTE[(len(legend) + 4) % len(PALETTE)])
            pts = d[name]
            stride = max(1, math.ceil(len(pts) / max_points))
            legend.append((f"{name} ({len(pts)})", color))
            panel += [
                f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="2.6" fill="{color}" '
                'fill-opacity="0.6"/>'
                for x, y in pts[::stride]
            ]
        panel += _legend(legend, frame.left + 8, frame.top + 14)
        body.append(f'<g transform="translate({size * i},0)">' + "".join(panel) + "</g>")
    return _svg(width, size, body, title)


# ------------------------------------------------------------------------------------------ page parts


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None, *, cls: str = "") -> str:
    out = [f'<table class="{cls}">' if cls else "<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _kv_table(mapping: Mapping[str, Any]) -> str:
    rows = []
    for k, v in mapping.items():
        text = _fmt(v) if not isinstance(v, (dict, list)) else _e(json.dumps(v, default=str))
        rows.append((f"<code>{_e(k)}</code>", text))
    return _table(rows, ("setting", "value"), cls="kv")


def step_series(history: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[Mapping[str, Any]]]:
    """(x = fractional epoch, rows) of every logged step; per-epoch rows when there are none."""
    xs: list[float] = []
    rows: list[Mapping[str, Any]] = []
    for i, entry in enumerate(history):
        epoch = _num(entry.get("epoch")) or float(i + 1)
        steps = entry.get("steps")
        total = _num(entry.get("batches"))
        if isinstance(steps, list) and steps and total:
            for s in steps:
                b = _num(s.get("batch")) or total
                xs.append(epoch - 1 + b / total)
                rows.append(s)
        else:
            xs.append(epoch)
            rows.append(entry)
    return xs, rows


def _loss_section(history: Sequence[Mapping[str, Any]]) -> str:
    xs, rows = step_series(history)
    per_step = any(isinstance(h.get("steps"), list) and h.get("steps") for h in history)
    keys = [k for k in _LOSS_KEYS if any(_num(r.get(k)) is not None for r in rows)]
    series = [(k, xs, [r.get(k) for r in rows]) for k in keys]
    where = f"{len(rows)} logged steps" if per_step else f"{len(rows)} epochs"
    chart = line_chart(
        series,
        title=f"CBD loss terms per logged step ({where})" if per_step else "CBD loss terms per epoch",
        xlabel="epoch (fraction done)" if per_step else "epoch",
        ylabel="loss",
        markers=not per_step or len(rows) <= 40,
    )
    note = (
        "Each point is the mean over the images of the batches since the previous logged step "
        "(every <code>log_every</code> batches and the last batches of each epoch). "
        "<code>loss</code> = <code>loss_pull</code> + <code>clean_weight</code> &times; "
        "<code>loss_clean</code>; <code>attack_loss</code> is the NT-Xent the adversary reached."
    )
    return f"<h2>Loss</h2>{chart}<p class='note'>{note}</p>"


def _throughput_section(history: Sequence[Mapping[str, Any]]) -> str:
    xs, rows = step_series(history)
    parts = ["<h2>Throughput</h2>"]
    if any(_num(r.get("images_per_s")) is not None for r in rows) and len(rows) > len(history):
        parts.append(
            line_chart(
                [("images/s", xs, [r.get("images_per_s") for r in rows])],
                title="images per second per logged step",
                xlabel="epoch (fraction done)",
                ylabel="images / s",
                markers=len(rows) <= 40,
                height=260,
            )
        )
    rates = [h.get("images_per_s") for h in history]
    if any(_num(r) is not None for r in rates):
        labels = [f"epoch {_fmt(h.get('epoch', i + 1))}" for i, h in enumerate(history)]
        parts.append(
            bar_chart(labels, rates, title="images per second per epoch", xlabel="", ylabel="images / s")
        )
    return "".join(parts) if len(parts) > 1 else ""


def _health_section(history: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> str:
    keys = [(k, label, t) for k, label, t in _HEALTH if any(_num(h.get(k)) is not None for h in history)]
    if not keys:
        return "<h2>Health</h2><p>The label-free health check was off (<code>health='off'</code>).</p>"
    xs = [_num(h.get("epoch")) or float(i + 1) for i, h in enumerate(history)]
    hlines = [
        (f"{'max' if t.startswith('health_max') else 'min'} {label} {config[t]:.2g}", float(config[t]))
        for _, label, t in keys
        if t and _num(config.get(t)) is not None
    ]
    chart = line_chart(
        [(label, xs, [h.get(k) for h in history]) for k, label, _ in keys],
        title="label-free health per epoch (vs the original encoder; ratios 1 = unchanged, drift 0)",
        xlabel="epoch",
        ylabel="ratio / agreement",
        hlines=hlines,
        markers=True,
    )
    rows = [
        [_fmt(h.get("epoch", i + 1))] + [_fmt(h.get(k)) for k, _, _ in keys] for i, h in enumerate(history)
    ]
    table = _table(rows, ["epoch"] + [label for _, label, _ in keys])
    return f"<h2>Health</h2>{chart}{table}"


def _projection_section(points: Mapping[str, Any] | None, projection: Mapping[str, Any] | None) -> str:
    if not points:
        return ""
    ev = (projection or {}).get("explained_variance") or [0.0, 0.0]
    panels = [(f"{phase} purification", points[phase]) for phase in ("before", "after") if phase in points]
    chart = scatter_panels(
        panels,
        title="features in 2-D",
        xlabel=f"PC1 ({100 * (ev[0] or 0):.0f}% of clean variance)",
        ylabel=f"PC2 ({100 * (ev[1] or 0):.0f}%)",
    )
    rows = []
    for phase, stats in ((projection or {}).get("stats") or {}).items():
        for key, value in stats.items():
            if isinstance(value, Mapping):
                value = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
            rows.append((_e(phase), _e(key), _fmt(value) if not isinstance(value, str) else _e(value)))
    note = (
        "PCA of the L2-normalised features, fitted on the clean features before purification and applied "
        "unchanged to every set, so both panels share axes. Adversarial = the contrastive PGD of the run's "
        "config against each encoder in turn."
    )
    return f"<h2>Features before / after</h2>{chart}<p class='note'>{note}</p>" + (
        _table(rows, ("phase", "statistic", "value")) if rows else ""
    )


def _pct(v: Any) -> str:
    n = _num(v)
    return "" if n is None else f"{100 * n:.2f}%"


def _evaluation_section(evaluation: Mapping[str, Any] | None) -> str:
    if not evaluation:
        return ""
    rows = []
    for phase in ("before", "after"):
        r = evaluation.get(phase)
        if isinstance(r, Mapping):
            rows.append((phase, _pct(r.get("acc")), _pct(r.get("asr")), _fmt(r.get("n"))))
    extra = ""
    first = next(
        (evaluation.get(p) for p in ("before", "after") if isinstance(evaluation.get(p), Mapping)), None
    )
    if first and first.get("trigger"):
        extra = (
            f"<p class='note'>ASR of trigger <code>{_e(first['trigger'])}</code>, "
            f"target {_e(first.get('target'))}.</p>"
        )
    return (
        "<h2>Evaluation (labelled; never used to purify)</h2>"
        + _table(rows, ("model", "ACC (clean accuracy)", "ASR (attack success)", "images"), cls="eval")
        + extra
    )


def _record_section(record: Mapping[str, Any] | None) -> str:
    if not record:
        return ""
    rows = []
    for label, entries in (
        ("input", (record.get("input_model") or {}).get("files", [])),
        ("output", (record.get("output_model") or {}).get("files", [])),
        ("data", ((record.get("data") or {}).get("files") or [])[:10]),
    ):
        for e in entries:
            rows.append(
                (
                    _e(f"{label} {e.get('role', '')}".strip()),
                    _e(e.get("path")),
                    f"<code>{_e(e.get('sha256'))}</code>",
                )
            )
    data = record.get("data") or {}
    if data.get("tensor_sha256"):
        rows.append(
            (
                "data tensor",
                _e(f"{data.get('count')} x {data.get('shape')} {data.get('dtype')}"),
                f"<code>{_e(data['tensor_sha256'])}</code>",
            )
        )
    path = record.get("path")
    note = (
        f"<p class='note'>Record: <code>{_e(path)}</code> "
        "(check with <code>cbd-fast verify-record</code>).</p>"
        if path
        else ""
    )
    return "<h2>Purification record</h2>" + _table(rows, ("file", "path", "SHA-256"), cls="hashes") + note


def _summary(doc: Mapping[str, Any]) -> str:
    extra = doc.get("extra") or {}
    timings = doc.get("timings") or {}
    history = doc.get("history") or []
    last = history[-1] if history else {}
    model = extra.get("model") or {}
    data = extra.get("data") or {}
    cards = [
        ("model", f"{_e(model.get('class', ''))} <span class='dim'>{_e(model.get('source', ''))}</span>"),
        ("features", _e(extra.get("features") or "")),
        (
            "data",
            f"{_fmt(data.get('count'))} images {_e(data.get('shape', ''))} "
            f"<span class='dim'>{_e(data.get('source', ''))}</span>",
        ),
        ("epochs / time", f"{_fmt(timings.get('epochs'))} epochs, {_fmt(timings.get('total_seconds'))} s"),
        ("throughput", f"{_fmt(timings.get('images_per_s_mean'))} images/s (mean of epochs)"),
    ]
    if "health_knn" in last:
        cards.append(
            (
                "final health",
                f"k-NN {_fmt(last.get('health_knn'))}, CKA {_fmt(last.get('health_cka'))}, "
                f"drift {_fmt(last.get('health_drift'))}, "
                f"pseudo-class changes {_fmt(last.get('health_flip'))}"
                + (
                    f", changed predictions {_fmt(last.get('health_head_change'))}"
                    if "health_head_change" in last
                    else ""
                ),
            )
        )
    ev = doc.get("evaluation") or {}
    if isinstance(ev.get("after"), Mapping):
        cards.append(
            (
                "ACC / ASR after",
                f"{_pct(ev['after'].get('acc'))} / {_pct(ev['after'].get('asr')) or '&ndash;'}",
            )
        )
    cards = [(k, v) for k, v in cards if v.strip()]
    return (
        "<div class='cards'>"
        + "".join(
            f"<div class='card'><div class='k'>{_e(k)}</div><div class='v'>{v}</div></div>" for k, v in cards
        )
        + "</div>"
    )


_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1120px;
  color:#222;background:#fff;padding:0 16px}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:19px;margin:28px 0 8px;border-bottom:2px solid #e5e5ee;padding-bottom:4px}
.sub{color:#666;margin-bottom:16px}
.dim{color:#888;font-size:12px}
.note{color:#555;font-size:13px;max-width:900px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#f3f5fa;border-left:4px solid #1f77b4;padding:8px 12px;min-width:200px}
.card .k{font-size:12px;color:#666;text-transform:uppercase}
.card .v{font-size:15px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #dde;padding:4px 8px;text-align:left}
th{background:#eef1f8}
table.eval td{font-size:15px}
code{font-size:12px}
svg{display:block;margin:8px 0;max-width:100%;height:auto}
svg .tick{font-size:11px;fill:#555}
svg .label{font-size:12px;fill:#333}
svg .title{font-size:14px;font-weight:600;fill:#222}
svg .legend{font-size:12px;fill:#222}
ul.notes li{color:#8a4b00}
"""


def render_html(doc: Mapping[str, Any], points: Mapping[str, Any] | None = None) -> str:
    """The report page for a report document (what ``report.json`` holds).

    Args:
        doc: the report document: ``config``, ``history`` (with per-step ``steps``), ``timings``,
            ``evaluation``, ``diagnostic``, ``projection``, ``versions``, ``build``, ``notes``,
            ``extra`` (``model``, ``data``, ``features``, ``record``...); missing parts are left out.
        points: the 2-D projection ``{"before": {set: [n, 2]}, "after": {...}}`` (from
            ``project_2d(...)["points"]``), or None.

    Returns:
        the HTML text (UTF-8, self-contained).
    """
    history = list(doc.get("history") or [])
    config = dict(doc.get("config") or {})
    extra = dict(doc.get("extra") or {})
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<title>cbd_fast purification report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>cbd_fast purification report</h1>",
        f"<div class='sub'>{_e(doc.get('created', ''))} &middot; label-free Contrastive Backdoor Defense"
        f" &middot; <code>{_e(' '.join(map(str, doc.get('command') or [])))}</code></div>",
        _summary(doc),
        _evaluation_section(doc.get("evaluation")),
        _loss_section(history) if history else "<p>No epochs were run.</p>",
        _health_section(history, config) if history else "",
        _throughput_section(history) if history else "",
        _projection_section(points, doc.get("projection")),
    ]
    diagnostic = doc.get("diagnostic")
    if diagnostic:
        parts.append("<h2>Evocation diagnostic (original model)</h2>")
        parts.append(f"<pre>{_e(json.dumps(diagnostic, indent=1, default=str)[:6000])}</pre>")
    parts.append(_record_section(extra.get("record")))
    parts.append("<h2>Configuration</h2>" + _kv_table(config))
    versions = doc.get("versions") or {}
    if versions:
        parts.append("<h2>Versions</h2>" + _kv_table(versions))
    build = doc.get("build") or {}
    if build:
        keep = {
            k: v for k, v in build.items() if not isinstance(v, (dict, list)) or k in ("backends_compiled",)
        }
        parts.append("<h2>Build</h2>" + _kv_table(keep))
    notes = doc.get("notes") or []
    if notes:
        parts.append(
            "<h2>Notes</h2><ul class='notes'>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"
        )
    parts.append("</body></html>\n")
    return "".join(p for p in parts if p)
