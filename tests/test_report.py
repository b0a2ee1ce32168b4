"""`supervisor report`: one self-contained HTML file, opened in a real headless Chromium;
the screenshot is not blank and every figure the page states equals the SQL over the same
projection file."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import duckdb
from PIL import Image

from schemas import BreakerTransition, ResourceAlert
from testing.browser import dump_dom, screenshot
from testing.projection import project
from testing.synthetic import AttemptPlan, HistoryBuilder, mixed_history


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
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "report", "--db", str(db), "--out", str(page)],
        capture_output=True,
        text=True,
        timeout=120,
    )
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
        by_type = con.execute("SELECT error_type, count(*) FROM errors GROUP BY ALL").fetchall()
        assert by_type and all(float(shown[f"errors_by_type.{t}"]) == n for t, n in by_type)
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


def test_report_refuses_what_it_cannot_do(tmp_dir: Path) -> None:
    def report(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "supervisor", "report", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    missing = report("--db", str(tmp_dir / "none.duckdb"), "--out", str(tmp_dir / "r.html"))
    assert missing.returncode == 3 and "no such projection file" in missing.stderr
    nowhere = report("--db", str(tmp_dir / "none.duckdb"), "--out", "/nonexistent/dir/r.html")
    assert nowhere.returncode == 2 and "does not exist" in nowhere.stderr
    db = project(mixed_history(50), tmp_dir / "p.duckdb")
    bad = report("--db", str(db), "--out", str(tmp_dir / "r.html"), "--since", "soon")
    assert bad.returncode == 2 and "since" in bad.stderr
    assert not (tmp_dir / "r.html").exists()
