"""A `Report` as one self-contained HTML page: inline CSS and SVG charts, no script and no
link, so it opens anywhere without a network. Every figure the page states carries a
`data-k` attribute naming it (a summary card, a cell of the top errors, a series' total),
so a test can read the page back and hold it to SQL."""

from __future__ import annotations

import math
from datetime import datetime
from html import escape

from projections.query.report import Chart, Report

W, H = 560, 240
PAD_L, PAD_R, PAD_T, PAD_B = 66, 12, 12, 44
COLORS = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")
MARK_COLORS = {"alert": "#dc2626", "recovered": "#16a34a", "breaker": "#7c3aed"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#111827;background:#f9fafb}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0 0 8px}.sub{color:#6b7280;margin:0 0 20px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:20px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:10px 16px;min-width:120px}
.card b{display:block;font-size:22px}.card span{color:#6b7280;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(580px,1fr));gap:16px}
.panel{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:12px 14px}
.legend{font-size:12px;color:#374151;margin-top:4px}.legend i{display:inline-block;width:10px;
height:10px;border-radius:2px;margin:0 4px 0 10px}
table{border-collapse:collapse;width:100%;background:#fff}td,th{border-bottom:1px solid #e5e7eb;
padding:6px 8px;text-align:left;font-size:13px}th{background:#f3f4f6}td.n{text-align:right}
.empty{color:#9ca3af;font-style:italic}
.panel svg{display:block;width:100%;height:auto}
"""


def render(report: Report, *, title: str = "Container supervisor report") -> str:
    t = report.totals
    cards = [
        ("tasks", "tasks ended", f"{t['tasks']:.0f}"),
        ("succeeded", "succeeded", f"{t['succeeded']:.0f}"),
        ("failed", "failed", f"{t['failed']:.0f}"),
        ("rejected", "rejected", f"{t['rejected']:.0f}"),
        ("errors", "errors", f"{t['errors']:.0f}"),
        ("cleanup_success_pct", "cleanup success %", f"{t['cleanup_success_pct']:g}"),
        ("leaked_now", "leaked now", f"{t['leaked_now']:.0f}"),
        ("warm_start_pct", "warm starts %", f"{t['warm_start_pct']:g}"),
    ]
    seqs = (
        f"events {report.first_seq}-{report.last_seq}"
        if report.first_seq is not None
        else "no events"
    )
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p class=sub>{_t(report.start)} to {_t(report.end)} UTC · {seqs} · one point per "
        f"{report.width_s} s</p>",
        "<div class=cards>",
        *(
            f'<div class=card><b data-k="{k}">{v}</b><span>{escape(label)}</span></div>'
            for k, label, v in cards
        ),
        "</div><div class=grid>",
        *(_panel(c, report) for c in report.charts),
        "</div>",
        _top_errors(report),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _t(d: datetime) -> str:
    return d.strftime("%Y-%m-%d %H:%M:%S")


def _panel(chart: Chart, report: Report) -> str:
    legend = "".join(
        f'<i style="background:{COLORS[i % len(COLORS)]}"></i>{escape(s.name)} '
        f'(<span data-k="{chart.key}.{escape(s.name)}">{s.total:g}</span>)'
        if chart.key.startswith(("errors", "refused"))
        else f'<i style="background:{COLORS[i % len(COLORS)]}"></i>{escape(s.name)}'
        for i, s in enumerate(chart.series)
    )
    marks = "".join(
        f'<i style="background:{MARK_COLORS.get(k, "#000")}"></i>{k}'
        for k in sorted({m.kind for m in chart.marks})
    )
    return (
        f'<div class=panel id="{chart.key}"><h2>{escape(chart.title)}</h2>'
        f"{_svg(chart, report)}<div class=legend>{legend}{marks}"
        f" <span style=color:#6b7280>· {escape(chart.unit)}</span></div></div>"
    )


def _nice(top: float) -> float:
    """The round number (1, 2, 2.5 or 5 times a power of ten) at or above `top`."""
    if top <= 0:
        return 1.0
    mag = 10.0 ** math.floor(math.log10(top))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if top <= m * mag * (1 + 1e-9))


def _svg(chart: Chart, report: Report) -> str:
    n = len(report.buckets)
    values = [v for s in chart.series for v in s.values if v is not None]
    if not values:
        return (
            f'<svg viewBox="0 0 {W} {H}" role=img>'
            f'<text x={W // 2} y={H // 2} text-anchor=middle fill="#9ca3af">no data</text></svg>'
        )
    top = _nice(max(values))
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def x(i: int) -> float:
        return PAD_L + (pw * i / (n - 1) if n > 1 else pw / 2)

    def y(v: float) -> float:
        return PAD_T + ph - ph * v / top

    out = [
        f'<svg viewBox="0 0 {W} {H}" role=img>',
        # The axes' titles: the unit up the left, the time along the bottom.
        f"<text class=axis-title x=14 y={PAD_T + ph / 2:.1f} font-size=12 text-anchor=middle "
        f'fill="#374151" transform="rotate(-90 14 {PAD_T + ph / 2:.1f})">{escape(chart.unit)}</text>',
        f"<text class=axis-title x={PAD_L + pw / 2:.1f} y={H - 4} font-size=12 "
        f'text-anchor=middle fill="#374151">time (UTC)</text>',
    ]
    for k in range(5):
        tick = top * k / 4
        out.append(
            f'<line x1={PAD_L} x2={W - PAD_R} y1={y(tick):.1f} y2={y(tick):.1f} stroke="#e5e7eb"/>'
            f"<text x={PAD_L - 6} y={y(tick) + 4:.1f} font-size=11 text-anchor=end "
            f'fill="#6b7280">{tick:g}</text>'
        )
    fmt = "%H:%M:%S" if report.width_s < 60 else "%m-%d %H:%M"
    for i in sorted({0, n // 2, n - 1}):
        anchor = "start" if i == 0 else "end" if i == n - 1 else "middle"
        out.append(
            f'<text x={x(i):.1f} y={H - 24} font-size=11 text-anchor={anchor} fill="#6b7280">'
            f"{report.buckets[i].strftime(fmt)}</text>"
        )
    span = max((report.buckets[-1] - report.buckets[0]).total_seconds(), 1.0)
    for m in chart.marks:
        at = (m.at - report.buckets[0]).total_seconds() / span * (n - 1)
        mx = x(0) + (x(n - 1) - x(0)) * at / max(n - 1, 1)
        color = MARK_COLORS.get(m.kind, "#000")
        out.append(
            f'<line x1={mx:.1f} x2={mx:.1f} y1={PAD_T} y2={PAD_T + ph} stroke="{color}" '
            f'stroke-dasharray="4 3"><title>{escape(m.label)} at {_t(m.at)}</title></line>'
        )
    for si, s in enumerate(chart.series):
        # One line through the windows that have a value (a window with no task has none:
        # the line joins its neighbours rather than breaking into fragments), a dot on each.
        points = [f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(s.values) if v is not None]
        out.append(_line(points, COLORS[si % len(COLORS)], dots=chart.key == "latency"))
    out.append("</svg>")
    return "".join(out)


def _line(points: list[str], color: str, *, dots: bool) -> str:
    marks = "".join(
        f'<circle cx={p.split(",")[0]} cy={p.split(",")[1]} r=2 fill="{color}"/>'
        for p in (points if dots or len(points) == 1 else ())
    )
    if len(points) < 2:
        return marks
    line = f'<polyline fill=none stroke="{color}" stroke-width=1.8 points="{" ".join(points)}"/>'
    return line + marks


def _top_errors(report: Report) -> str:
    if not report.top_errors:
        return "<h2 style=margin-top:20px>Top error codes</h2><p class=empty>no errors</p>"
    rows = "".join(
        f"<tr><td>{escape(e.error_type)}</td><td>{escape(e.code)}</td>"
        f'<td class=n data-k="top.{escape(e.code)}">{e.count}</td>'
        f"<td><code>{escape(e.example_task)}</code></td><td>{escape(e.example_message)}</td></tr>"
        for e in report.top_errors
    )
    return (
        '<h2 style="margin-top:20px">Top error codes</h2><table><tr><th>type</th><th>code</th>'
        f"<th>errors</th><th>example task</th><th>its message</th></tr>{rows}</table>"
    )
