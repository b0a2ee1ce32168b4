"""`supervisor report` over a large projection, against raw DuckDB running the same
statements, in one run.

    .venv/bin/python bench/bench_report.py [--events 1000000] [--runs 3]

A projection file is made from a synthetic history of N events (`testing.synthetic`: the
realistic mix of successes, user errors, timeouts, OOM kills and refusals), applied as the
projector would. Then, R times each, alternated: the report as `supervisor report --db`
makes it (the statements checked read-only and run through `projections.query`, the HTML
rendered), and the same statements executed by a bare `duckdb` connection with their rows
fetched (no checks, no page). Prints the medians and the ratio report / raw.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not installed

from projections.query import report, report_html
from projections.query.query import open_readonly, run_query
from testing.projection import project
from testing.synthetic import mixed_history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-report-"))
    try:
        db = tmp / "p.duckdb"
        t = time.monotonic()
        history = mixed_history(args.events)
        project(history, db)
        del history
        print(f"projection of {args.events:,} events made in {time.monotonic() - t:.1f}s")
        statements: list[str] = []
        ours: list[float] = []
        raw: list[float] = []
        size = 0
        for i in range(args.runs):
            t = time.monotonic()
            con = open_readonly(db)
            try:

                def run(sql: str, con: Any = con, first: bool = i == 0) -> list[tuple[Any, ...]]:
                    if first:
                        statements.append(sql)
                    return run_query(con, sql, max_rows=100_000, timeout_s=600).rows

                page = report_html.render(report.collect(run))
            finally:
                con.close()
            (tmp / "report.html").write_text(page)
            size = len(page)
            ours.append(round(time.monotonic() - t, 3))

            t = time.monotonic()
            bare = duckdb.connect(str(db), read_only=True)
            try:
                for sql in statements:
                    bare.execute(sql).fetchall()
            finally:
                bare.close()
            raw.append(round(time.monotonic() - t, 3))
        mo, mr = statistics.median(ours), statistics.median(raw)
        print(f"report (collect + render, {size:,} bytes): median {mo:.2f}s of {ours}")
        print(f"raw duckdb, the same {len(statements)} statements: median {mr:.2f}s of {raw}")
        print(f"ratio report / raw: {mo / mr:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
