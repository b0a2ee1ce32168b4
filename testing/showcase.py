"""The history behind `docs/report.png`, and the screenshot itself:

    .venv/bin/python -m testing.showcase [--out docs/report.png]

Two hours and a quarter of a realistic mix (successes, user errors, timeouts retried, OOM
kills, rejections), a memory alert and its recovery, a burst of 150 refused specs with the
breaker opening and closing, a quiet twenty minutes, and a container left leaking;
projected into a DuckDB file, rendered by `supervisor report`, shot by a headless
Chromium. Deterministic (seeded)."""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

from schemas import BreakerTransition, Event, ResourceAlert, ResourceRecovered
from testing.browser import screenshot
from testing.projection import project
from testing.synthetic import AttemptPlan, HistoryBuilder

_TIMEOUT = AttemptPlan(error="EXECUTION_TIMEOUT", exit_code=137, kill_reason="timeout")
_MIX: list[tuple[tuple[AttemptPlan, ...] | None, int]] = [
    ((AttemptPlan(),), 70),
    ((AttemptPlan(error="NONZERO_EXIT", exit_code=1),), 10),
    ((_TIMEOUT, AttemptPlan()), 8),
    ((_TIMEOUT, _TIMEOUT, _TIMEOUT), 3),
    ((AttemptPlan(error="OOM_KILLED", exit_code=137),), 4),
    (None, 5),
]


def showcase_history(seed: int = 2026) -> list[Event]:
    rnd = random.Random(seed)
    b = HistoryBuilder(id_prefix="shot", tick=timedelta(milliseconds=700))
    for i in range(900):
        plans = rnd.choices([m for m, _ in _MIX], [w for _, w in _MIX])[0]
        if plans is None:
            b.submit(f"t-{i}")
            b.reject(f"t-{i}", "INVALID_SPEC")
        else:
            b.run_task(f"t-{i}", *plans)
        if i == 300:
            b.emit(ResourceAlert, metric="memory_pct", value=93.0, threshold=90.0)
        if i == 340:
            b.emit(ResourceRecovered, metric="memory_pct", value=70.0, threshold=90.0)
        if i == 450:
            b.wait(timedelta(minutes=20))
        if i == 600:
            for j in range(150):
                b.submit(f"bad-{j}")
                b.reject(f"bad-{j}", "INVALID_SPEC")
            b.emit(BreakerTransition, from_state="closed", to_state="open", reason="5 failures")
        if i == 620:
            b.emit(BreakerTransition, from_state="open", to_state="closed", reason="probe ok")
        if i == 700:
            b.run_task("leaky", AttemptPlan(leak_container=True))
    return b.events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/report.png", help="the PNG to write")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="showcase-"))
    try:
        db = project(showcase_history(), tmp / "p.duckdb")
        page = tmp / "report.html"
        cmd = [sys.executable, "-m", "supervisor", "report", "--db", str(db), "--out", str(page)]
        subprocess.run(cmd, check=True)
        screenshot(page, tmp, Path(args.out).resolve(), size=(1280, 1760))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
