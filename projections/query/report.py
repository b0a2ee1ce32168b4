"""`supervisor report`: what the projection says about a period, gathered by a few SQL
statements (each chart's statement is here, once) into a `Report`, which
`projections.query.report_html` renders as one self-contained page.

`collect` takes the way to run a statement (`Run`: a file opened read-only, or a daemon's
`POST /v1/query`), so the same statements serve both. Times are UTC. Series are bucketed
into about `BUCKETS` equal steps of a round width over the period.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

Run = Callable[[str], Sequence[Sequence[Any]]]
"""Runs one read-only statement, returning its rows."""

BUCKETS = 60
_WIDTHS_S = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400)
TOP_CODES = 6


@dataclass
class Series:
    name: str
    values: list[float | None]

    @property
    def total(self) -> float:
        return sum(v for v in self.values if v is not None)


@dataclass
class Mark:
    at: datetime
    kind: str  # "alert", "recovered", "breaker"
    label: str


@dataclass
class Chart:
    key: str
    title: str
    unit: str
    series: list[Series]
    marks: list[Mark] = field(default_factory=list)
    note: str = ""


@dataclass
class TopError:
    error_type: str
    code: str
    count: int
    example_task: str
    example_message: str


@dataclass
class Report:
    start: datetime
    end: datetime
    width_s: int
    buckets: list[datetime]
    totals: dict[str, float]
    charts: list[Chart]
    top_errors: list[TopError]
    first_seq: int | None
    last_seq: int | None


def _ts(value: Any) -> datetime:
    """A timestamp as DuckDB gives it (naive UTC), or as the HTTP API does (ISO text)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=None)


def _lit(t: datetime) -> str:
    return f"TIMESTAMP '{t.replace(tzinfo=None).isoformat(sep=' ')}'"


def bucket_width(start: datetime, end: datetime) -> int:
    """The smallest round width that cuts [start, end] into at most `BUCKETS` steps."""
    span = max((end - start).total_seconds(), 1.0)
    for w in _WIDTHS_S:
        if span / w <= BUCKETS:
            return w
    return math.ceil(span / BUCKETS / 86400) * 86400


def collect(run: Run, since: datetime | None = None, now: datetime | None = None) -> Report:
    """Everything the report shows, for the events since `since` (None: all)."""
    lo = "TRUE" if since is None else f"occurred_at >= {_lit(since)}"
    first_seq, last_seq, t0, t1 = run(
        f"SELECT min(seq), max(seq), min(occurred_at), max(occurred_at) FROM events WHERE {lo}"
    )[0]
    end = _ts(t1) if t1 is not None else (now or datetime.now(UTC)).replace(tzinfo=None)
    start = _ts(t0) if t0 is not None else end - timedelta(hours=1)
    if since is not None:
        start = max(start, since.replace(tzinfo=None))
    width = bucket_width(start, end)
    origin = datetime.fromtimestamp(
        start.replace(tzinfo=UTC).timestamp() // width * width, UTC
    ).replace(tzinfo=None)
    n = int((end - origin).total_seconds() // width) + 1
    buckets = [origin + timedelta(seconds=width * i) for i in range(n)]

    def b(col: str) -> str:
        return f"CAST(floor((epoch({col}) - epoch({_lit(origin)})) / {width}) AS BIGINT)"

    def where(col: str) -> str:
        return f"{col} >= {_lit(origin)} AND {col} <= {_lit(end)}"

    def series(rows: Sequence[Sequence[Any]], fill: float | None = 0.0) -> dict[str, Series]:
        out: dict[str, Series] = {}
        for name, i, v in rows:
            s = out.setdefault(str(name), Series(str(name), [fill] * n))
            if 0 <= int(i) < n:
                s.values[int(i)] = None if v is None else float(v)
        return out

    def running(rows: Sequence[Sequence[Any]], before: float) -> list[float | None]:
        deltas = [0.0] * n
        for i, d in rows:
            if 0 <= int(i) < n:
                deltas[int(i)] += float(d)
        out: list[float | None] = []
        level = before
        for d in deltas:
            level += d
            out.append(level)
        return out

    # Error rate, by type and by the most frequent codes.
    by_type = series(
        run(
            f"SELECT error_type, {b('occurred_at')} AS i, count(*) FROM errors "
            f"WHERE {where('occurred_at')} GROUP BY ALL"
        )
    )
    top_rows = run(
        f"SELECT error_type, code, count(*) AS n, arg_max(task_id, seq), arg_max(message, seq) "
        f"FROM errors WHERE {where('occurred_at')} GROUP BY ALL ORDER BY n DESC, code LIMIT 10"
    )
    top = [TopError(str(t), str(c), int(k), str(ex), str(m)) for t, c, k, ex, m in top_rows]
    codes = [e.code for e in top[:TOP_CODES]]
    by_code = series(
        run(
            f"SELECT code, {b('occurred_at')} AS i, count(*) FROM errors "
            f"WHERE {where('occurred_at')} AND code IN ({_in(codes)}) GROUP BY ALL"
        )
        if codes
        else []
    )
    # Task latency (submitted to finished) by when the task finished.
    lat = run(
        f"SELECT {b('finished_at')} AS i, quantile_cont(l, [0.5, 0.95, 0.99]) FROM ("
        "SELECT finished_at, date_diff('microsecond', submitted_at, finished_at) / 1e6 AS l "
        f"FROM tasks WHERE outcome IS NOT NULL AND submitted_at IS NOT NULL "
        f"AND {where('finished_at')}) GROUP BY ALL"
    )
    latency = {q: Series(q, [None] * n) for q in ("p50", "p95", "p99")}
    for i, qs in lat:
        for q, v in zip(("p50", "p95", "p99"), qs, strict=True):
            latency[q].values[int(i)] = float(v)
    # Cleanup steps that succeeded, of those attempted.
    clean = run(
        f"SELECT 'success rate', {b('occurred_at')} AS i, "
        "count(*) FILTER (WHERE outcome = 'succeeded') / count(*) "
        f"FROM cleanups WHERE {where('occurred_at')} GROUP BY ALL"
    )
    # Leaked resources: a container or workspace that outlived its attempt, from the
    # attempt's end until its removal (if any).
    leak_sql = (
        "WITH r AS ("
        "SELECT a.finished_at AS s, c.removed_at AS e FROM containers c JOIN attempts a "
        "USING (task_id, attempt) WHERE a.finished_at IS NOT NULL "
        "AND (c.removed_at IS NULL OR c.removed_at > a.finished_at) UNION ALL "
        "SELECT a.finished_at, w.removed_at FROM workspaces w JOIN attempts a "
        "USING (task_id, attempt) WHERE a.finished_at IS NOT NULL "
        "AND (w.removed_at IS NULL OR w.removed_at > a.finished_at)), "
        "d AS (SELECT s AS t, 1 AS d FROM r UNION ALL SELECT e, -1 FROM r WHERE e IS NOT NULL)"
    )
    leaks = running(
        run(f"{leak_sql} SELECT {b('t')} AS i, sum(d) FROM d WHERE {where('t')} GROUP BY ALL"),
        _one(run(f"{leak_sql} SELECT coalesce(sum(d), 0) FROM d WHERE t < {_lit(origin)}")),
    )
    # Queue depth: a task waits from its submission to its first attempt's start (or its
    # end, if it never started).
    q_sql = (
        "WITH q AS (SELECT t.submitted_at AS s, coalesce(a.started_at, t.finished_at) AS e "
        "FROM tasks t LEFT JOIN attempts a ON a.task_id = t.task_id AND a.attempt = 1 "
        "WHERE t.submitted_at IS NOT NULL), "
        "d AS (SELECT s AS t, 1 AS d FROM q UNION ALL SELECT e, -1 FROM q WHERE e IS NOT NULL)"
    )
    queue = running(
        run(f"{q_sql} SELECT {b('t')} AS i, sum(d) FROM d WHERE {where('t')} GROUP BY ALL"),
        _one(run(f"{q_sql} SELECT coalesce(sum(d), 0) FROM d WHERE t < {_lit(origin)}")),
    )
    marks = [
        Mark(_ts(t), str(kind), f"{kind}: {metric}")
        for t, kind, metric in run(
            f"SELECT occurred_at, kind, metric FROM alerts WHERE {where('occurred_at')} "
            "ORDER BY seq LIMIT 200"
        )
    ] + [
        Mark(_ts(t), "breaker", f"breaker: {to}")
        for t, to in run(
            "SELECT occurred_at, payload->>'to_state' FROM events "
            f"WHERE type = 'breaker.transition' AND {where('occurred_at')} ORDER BY seq LIMIT 200"
        )
    ]
    outcome_rows = run(
        f"SELECT outcome, count(*) FROM tasks WHERE outcome IS NOT NULL AND {where('finished_at')} "
        "GROUP BY ALL"
    )
    outcomes = {str(o): int(k) for o, k in outcome_rows}
    cleanup_total, cleanup_ok = run(
        "SELECT count(*), count(*) FILTER (WHERE outcome = 'succeeded') FROM cleanups "
        f"WHERE {where('occurred_at')}"
    )[0]
    totals: dict[str, float] = {
        "tasks": sum(outcomes.values()),
        "succeeded": outcomes.get("succeeded", 0),
        "failed": outcomes.get("failed", 0),
        "rejected": outcomes.get("rejected", 0),
        "errors": _one(run(f"SELECT count(*) FROM errors WHERE {where('occurred_at')}")),
        "cleanup_steps": int(cleanup_total),
        "cleanup_success_pct": round(100 * cleanup_ok / cleanup_total, 2)
        if cleanup_total
        else 100.0,
        "leaked_now": _one(run("SELECT count(*) FROM leaked_resources")),
    }
    charts = [
        Chart(
            "errors_by_type", "Errors by type", f"errors per {_w(width)}", list(by_type.values())
        ),
        Chart(
            "errors_by_code",
            f"Errors by code (top {len(codes)})",
            f"errors per {_w(width)}",
            [by_code[c] for c in codes if c in by_code],
        ),
        Chart("latency", "Task latency, submitted to finished", "seconds", list(latency.values())),
        Chart(
            "cleanup",
            "Cleanup success rate",
            "succeeded / attempted",
            list(series(clean, None).values()),
        ),
        Chart("leaks", "Leaked resources", "resources", [Series("leaked", leaks)]),
        Chart(
            "queue",
            "Queue depth, with alerts and breaker transitions",
            "tasks waiting",
            [Series("queued", queue)],
            marks,
        ),
    ]
    return Report(
        start=start,
        end=end,
        width_s=width,
        buckets=buckets,
        totals=totals,
        charts=charts,
        top_errors=top,
        first_seq=None if first_seq is None else int(first_seq),
        last_seq=None if last_seq is None else int(last_seq),
    )


def _one(rows: Sequence[Sequence[Any]]) -> float:
    return float(rows[0][0] or 0)


def _in(values: list[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def _w(width: int) -> str:
    for unit, s in (("d", 86400), ("h", 3600), ("min", 60)):
        if width % s == 0:
            return f"{width // s} {unit}"
    return f"{width} s"
