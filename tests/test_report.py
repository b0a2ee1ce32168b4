"""`supervisor report`: one self-contained HTML file, opened in a real headless Chromium;
the screenshot is not blank and every figure the page states equals the SQL over the same
projection file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import timedelta
from html import unescape as html_unescape
from pathlib import Path

import duckdb
from PIL import Image

from schemas import BreakerTransition, ResourceAlert
from testing.browser import dump_dom, screenshot
from testing.projection import project
from testing.synthetic import AttemptPlan, HistoryBuilder, mixed_history


def _report(*args: str) -> subprocess.CompletedProcess[str]:
    """`supervisor report ARGS` in a new process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "report", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _history() -> list:  # type: ignore[type-arg]
    events = mixed_history(3000)
    b = HistoryBuilder(start=events[-1].occurred_at + timedelta(seconds=1), id_prefix="extra")
    b.run_task("leaky", AttemptPlan(leak_container=True))
    b.emit(ResourceAlert, metric="memory_pct", value=93.0, threshold=90.0)
    b.emit(BreakerTransition, from_state="closed", to_state="open", reason="5 failures")
    b.run_task("after", AttemptPlan(error="NONZERO_EXIT", exit_code=2))
    return [*events, *b.events]


def test_the_report_shows_what_the_sql_says(tmp_dir: Path) -> None:
    db = project(_history(), tmp_dir / "p.duckdb")
    page = tmp_dir / "report.html"
    done = _report("--db", str(db), "--out", str(page))
    assert done.returncode == 0, done.stderr
    html = page.read_text()
    assert not re.search(r"<script|<link|src=|href=|@import|url\(", html)  # self-contained

    dom = dump_dom(page, tmp_dir)
    shown = {k: v for k, v in re.findall(r'data-k="([^"]+)">([^<]*)<', dom)}
    con = duckdb.connect(str(db), read_only=True)
    try:

        def one(sql: str) -> float:
            return float(con.execute(sql).fetchone()[0])  # type: ignore[index]

        assert float(shown["tasks"]) == one("SELECT count(*) FROM tasks WHERE outcome IS NOT NULL")
        for outcome in ("succeeded", "failed", "rejected"):
            assert float(shown[outcome]) == one(
                f"SELECT count(*) FROM tasks WHERE outcome = '{outcome}'"
            ), outcome
        assert float(shown["errors"]) == one("SELECT count(*) FROM errors")
        assert float(shown["leaked_now"]) == one("SELECT count(*) FROM leaked_resources") == 1
        assert float(shown["cleanup_success_pct"]) == round(
            100 * one("SELECT avg((outcome = 'succeeded')::INT) FROM cleanups"), 2
        )
        adopted, started = (
            one(f"SELECT count(*) FROM events WHERE type = '{t}'")
            for t in ("pool.adopted", "attempt.started")
        )
        assert float(shown["warm_start_pct"]) == round(100 * adopted / started, 1)
        runs = "NOT (attempt = 0 AND error_type IN ('validation', 'security'))"
        by_type = con.execute(
            f"SELECT error_type, count(*) FROM errors WHERE {runs} GROUP BY ALL"
        ).fetchall()
        assert by_type and all(float(shown[f"errors_by_type.{t}"]) == n for t, n in by_type)
        refused = con.execute(
            f"SELECT code, count(*) FROM errors WHERE NOT {runs} GROUP BY ALL"
        ).fetchall()
        assert refused and all(float(shown[f"refused.{c}"]) == n for c, n in refused)
        top = con.execute(
            "SELECT code, count(*) AS n FROM errors GROUP BY ALL ORDER BY n DESC LIMIT 10"
        ).fetchall()
        assert all(float(shown[f"top.{code}"]) == n for code, n in top)
    finally:
        con.close()
    assert "breaker: open" in dom and "alert: memory_pct" in dom  # the marks on the queue chart

    shot = Image.open(screenshot(page, tmp_dir, tmp_dir / "shot.png")).convert("RGB")
    small = shot.resize((320, 375))
    colors = small.getcolors(maxcolors=1 << 16) or []
    background = max(colors)[1]
    drawn = sum(n for n, c in colors if c != background) / (320 * 375)
    assert len(colors) > 50 and drawn > 0.05, (len(colors), drawn)


def _flood_history() -> list:  # type: ignore[type-arg]
    """Two hours: a few runs that fail now and then, 433 specs refused at admission, and a
    quiet hour in the middle with no task at all."""
    b = HistoryBuilder(id_prefix="fl", tick=timedelta(seconds=2))
    for i in range(40):
        b.run_task(f"r-{i}", *((AttemptPlan(error="NONZERO_EXIT", exit_code=1),) if i % 7 else ()))
        if i == 20:
            b.wait(timedelta(hours=1))
    for i in range(433):
        b.submit(f"bad-{i}")
        b.reject(f"bad-{i}")
    return b.events


def test_refusals_do_not_flatten_the_runs_and_the_plots_fill_their_cards(tmp_dir: Path) -> None:
    """433 refused specs have a chart of their own, so the runs' errors keep their scale;
    the latency line joins the windows around the quiet hour instead of breaking; every
    plot has its axes' titles and fills its card's width (measured by Chromium's layout)."""
    db = project(_flood_history(), tmp_dir / "p.duckdb")
    page = tmp_dir / "report.html"
    done = _report("--db", str(db), "--out", str(page))
    assert done.returncode == 0, done.stderr
    html = page.read_text()
    probe = tmp_dir / "probe.html"
    probe.write_text(
        html.replace(
            "</body>",
            "<script>document.body.dataset.fill = JSON.stringify([...document.querySelectorAll"
            "('.panel')].map(p => [p.id, p.querySelector('svg').getBoundingClientRect().width"
            " / p.clientWidth]))</script></body>",
        )
    )
    dom = dump_dom(probe, tmp_dir)
    fill = json.loads(html_unescape(re.search(r'data-fill="([^"]*)"', dom).group(1)))  # type: ignore[union-attr]
    assert len(fill) == 7 and all(ratio > 0.9 for _, ratio in fill), fill

    def panel(key: str) -> str:
        return re.search(rf'<div class=panel id="{key}">(.*?)</div></div>', html, re.S).group(1)  # type: ignore[union-attr]

    for key, _ in fill:
        assert panel(key).count("class=axis-title") == 2, key
    ticks = [
        float(t) for t in re.findall(r'fill="#6b7280">([\d.]+)</text>', panel("errors_by_type"))
    ]
    refusal_ticks = [
        float(t) for t in re.findall(r'fill="#6b7280">([\d.]+)</text>', panel("refused"))
    ]
    assert max(ticks) <= 25 < 50 <= max(refusal_ticks), (ticks, refusal_ticks)  # own scales
    assert 'data-k="refused.INVALID_SPEC">433<' in html
    assert panel("latency").count("<polyline") == 3  # p50, p95, p99: one line each


def test_report_refuses_what_it_cannot_do(tmp_dir: Path) -> None:
    missing = _report("--db", str(tmp_dir / "none.duckdb"), "--out", str(tmp_dir / "r.html"))
    assert missing.returncode == 3 and "no such projection file" in missing.stderr
    nowhere = _report("--db", str(tmp_dir / "none.duckdb"), "--out", "/nonexistent/dir/r.html")
    assert nowhere.returncode == 2 and "does not exist" in nowhere.stderr
    db = project(mixed_history(50), tmp_dir / "p.duckdb")
    bad = _report("--db", str(db), "--out", str(tmp_dir / "r.html"), "--since", "soon")
    assert bad.returncode == 2 and "since" in bad.stderr
    assert not (tmp_dir / "r.html").exists()
