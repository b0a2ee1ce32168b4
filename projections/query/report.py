"""`supervisor report`: what the projection says about a period, gathered by a few SQL
statements (each chart's statement is here, once) into a `Report`, which
`projections.query.report_html` renders as one self-contained page.

`collect` takes the way to run a statement (`Run`: a file opened read-only, or a daemon's
`POST /v1/query`), so the same statements serve both. Times are UTC. Series are bucketed
into about `BUCKETS` equal steps of a round width over the period.
"""

from __future__ import annotations

import math
import re
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


# Each chart's statements, once. `{i:COL}` is the bucket index of column COL, `{in:COL}`
# keeps the rows whose COL falls in the period, `{origin}` is the first bucket's start
# (`_Span.sql` fills them in; the values are timestamps and integers the report made).
_PERIOD = "SELECT min(seq), max(seq), min(occurred_at), max(occurred_at) FROM events WHERE {lo}"
# A spec refused at admission (attempt 0, validation or security) is bad input, not a run
# that failed: hundreds of them would flatten the runs' errors, so they have a chart apart.
_REFUSED = "attempt = 0 AND error_type IN ('validation', 'security')"
_ERRORS_BY_TYPE = (
    "SELECT error_type, {i:occurred_at} AS i, count(*) FROM errors "
    f"WHERE {{in:occurred_at}} AND NOT ({_REFUSED}) GROUP BY ALL"
)
_REFUSED_BY_CODE = (
    "SELECT code, {i:occurred_at} AS i, count(*) FROM errors "
    f"WHERE {{in:occurred_at}} AND {_REFUSED} GROUP BY ALL"
)
_TOP_ERRORS = (
    "SELECT error_type, code, count(*) AS n, arg_max(task_id, seq), arg_max(message, seq) "
    "FROM errors WHERE {in:occurred_at} GROUP BY ALL ORDER BY n DESC, code LIMIT 10"
)
_ERRORS_BY_CODE = (
    "SELECT code, {i:occurred_at} AS i, count(*) FROM errors "
    f"WHERE {{in:occurred_at}} AND NOT ({_REFUSED}) AND code IN ({{codes}}) GROUP BY ALL"
)
_LATENCY = (  # `task_latencies` is the one definition of a task's latency
    "SELECT {i:finished_at} AS i, quantile_cont(latency_s, [0.5, 0.95, 0.99]) "
    "FROM task_latencies WHERE {in:finished_at} GROUP BY ALL"
)
_CLEANUP = (
    "SELECT 'success rate', {i:occurred_at} AS i, "
    "count(*) FILTER (WHERE outcome = 'succeeded') / count(*) "
    "FROM cleanups WHERE {in:occurred_at} GROUP BY ALL"
)
# A level over time (leaks, the queue) from the intervals `{intervals}` (columns s, e):
# +1 at each start, -1 at each end; the level before the period, then each bucket's change.
_STEPS = "WITH r AS ({intervals}), d AS (SELECT s AS t, 1 AS d FROM r UNION ALL SELECT e, -1 FROM r WHERE e IS NOT NULL) "
_LEVEL_BEFORE = _STEPS + "SELECT coalesce(sum(d), 0) FROM d WHERE t < {origin}"
_LEVEL_CHANGES = _STEPS + "SELECT {i:t} AS i, sum(d) FROM d WHERE {in:t} GROUP BY ALL"
_LEAKS = "SELECT leaked_since AS s, leaked_until AS e FROM leak_intervals"
# A task waits from its submission to its first attempt's start (or its end, if it never
# started).
_QUEUED = (
    "SELECT t.submitted_at AS s, coalesce(a.started_at, t.finished_at) AS e "
    "FROM tasks t LEFT JOIN attempts a ON a.task_id = t.task_id AND a.attempt = 1 "
    "WHERE t.submitted_at IS NOT NULL"
)
_ALERTS = (
    "SELECT occurred_at, kind, metric FROM alerts WHERE {in:occurred_at} ORDER BY seq LIMIT 200"
)
_BREAKER = (
    "SELECT occurred_at, payload->>'to_state' FROM events "
    "WHERE type = 'breaker.transition' AND {in:occurred_at} ORDER BY seq LIMIT 200"
)
_OUTCOMES = (
    "SELECT outcome, count(*) FROM tasks WHERE outcome IS NOT NULL AND {in:finished_at} "
    "GROUP BY ALL"
)
_CLEANUP_TOTALS = (
    "SELECT count(*), count(*) FILTER (WHERE outcome = 'succeeded') FROM cleanups "
    "WHERE {in:occurred_at}"
)
_ERROR_COUNT = "SELECT count(*) FROM errors WHERE {in:occurred_at}"
_LEAKED_NOW = "SELECT count(*) FROM leaked_resources"
_WARM = (  # attempts that adopted a warm pool's container, of all attempts started
    "SELECT count(*) FILTER (WHERE type = 'pool.adopted'), "
    "count(*) FILTER (WHERE type = 'attempt.started') FROM events "
    "WHERE type IN ('pool.adopted', 'attempt.started') AND {in:occurred_at}"
)
_PLACEHOLDER = re.compile(r"\{(i|in):(\w+)\}")


@dataclass(frozen=True)
class _Span:
    """The period cut into `n` buckets of `width` seconds from `origin` (naive UTC)."""

    origin: datetime
    end: datetime
    width: int
    n: int

    def sql(self, template: str, **values: str) -> str:
        def fill(m: re.Match[str]) -> str:
            col = m.group(2)
            if m.group(1) == "i":
                return (
                    f"CAST(floor((epoch({col}) - epoch({_lit(self.origin)})) / {self.width})"
                    " AS BIGINT)"
                )
            return f"{col} >= {_lit(self.origin)} AND {col} <= {_lit(self.end)}"

        text = _PLACEHOLDER.sub(fill, template)
        return text.format(origin=_lit(self.origin), **values)

    def series(self, rows: Sequence[Sequence[Any]], fill: float | None = 0.0) -> dict[str, Series]:
        """(name, bucket, value) rows as one series a name."""
        out: dict[str, Series] = {}
        for name, i, v in rows:
            s = out.setdefault(str(name), Series(str(name), [fill] * self.n))
            if 0 <= int(i) < self.n:
                s.values[int(i)] = None if v is None else float(v)
        return out

    def level(self, run: Run, intervals: str) -> list[float | None]:
        """How many of `intervals` are open at the end of each bucket."""
        deltas = [0.0] * self.n
        for i, d in run(self.sql(_LEVEL_CHANGES, intervals=intervals)):
            if 0 <= int(i) < self.n:
                deltas[int(i)] += float(d)
        level = _one(run(self.sql(_LEVEL_BEFORE, intervals=intervals)))
        out: list[float | None] = []
        for d in deltas:
            level += d
            out.append(level)
        return out


def collect(run: Run, since: datetime | None = None, now: datetime | None = None) -> Report:
    """Everything the report shows, for the events since `since` (None: all)."""
    first_seq, last_seq, start, end = _period(run, since, now)
    span = _span(start, end)
    top = [
        TopError(str(t), str(c), int(k), str(ex), str(m))
        for t, c, k, ex, m in run(span.sql(_TOP_ERRORS))
    ]
    run_codes = run(
        span.sql(
            "SELECT code, count(*) AS n FROM errors "
            f"WHERE {{in:occurred_at}} AND NOT ({_REFUSED}) GROUP BY ALL ORDER BY n DESC, code "
            f"LIMIT {TOP_CODES}"
        )
    )
    codes = [str(c) for c, _ in run_codes]
    by_code = span.series(run(span.sql(_ERRORS_BY_CODE, codes=_in(codes)))) if codes else {}
    per = f"errors per {_w(span.width)}"
    charts = [
        Chart(
            "errors_by_type",
            "Errors of runs by type",
            per,
            [*span.series(run(span.sql(_ERRORS_BY_TYPE))).values()],
        ),
        Chart(
            "errors_by_code",
            f"Errors of runs by code (top {len(codes)})",
            per,
            [by_code[c] for c in codes if c in by_code],
        ),
        Chart(
            "refused",
            "Specs refused at admission, by code",
            f"refusals per {_w(span.width)}",
            [*span.series(run(span.sql(_REFUSED_BY_CODE))).values()],
        ),
        Chart("latency", "Task latency, submitted to finished", "seconds", _latency(run, span)),
        Chart(
            "cleanup",
            "Cleanup success rate",
            "succeeded / attempted",
            [*span.series(run(span.sql(_CLEANUP)), None).values()],
        ),
        Chart(
            "leaks", "Leaked resources", "resources", [Series("leaked", span.level(run, _LEAKS))]
        ),
        Chart(
            "queue",
            "Queue depth, with alerts and breaker transitions",
            "tasks waiting",
            [Series("queued", span.level(run, _QUEUED))],
            _marks(run, span),
        ),
    ]
    return Report(
        start=start,
        end=end,
        width_s=span.width,
        buckets=[span.origin + timedelta(seconds=span.width * i) for i in range(span.n)],
        totals=_totals(run, span),
        charts=charts,
        top_errors=top,
        first_seq=None if first_seq is None else int(first_seq),
        last_seq=None if last_seq is None else int(last_seq),
    )


def _period(
    run: Run, since: datetime | None, now: datetime | None
) -> tuple[Any, Any, datetime, datetime]:
    """(first seq, last seq, start, end) of the events since `since`; an empty history is
    the hour before `now`."""
    lo = "TRUE" if since is None else f"occurred_at >= {_lit(since)}"
    first_seq, last_seq, t0, t1 = run(_PERIOD.format(lo=lo))[0]
    end = _ts(t1) if t1 is not None else (now or datetime.now(UTC)).replace(tzinfo=None)
    start = _ts(t0) if t0 is not None else end - timedelta(hours=1)
    if since is not None:
        start = max(start, since.replace(tzinfo=None))
    return first_seq, last_seq, start, end


def _span(start: datetime, end: datetime) -> _Span:
    width = bucket_width(start, end)
    origin = datetime.fromtimestamp(
        start.replace(tzinfo=UTC).timestamp() // width * width, UTC
    ).replace(tzinfo=None)
    return _Span(origin, end, width, int((end - origin).total_seconds() // width) + 1)


def _latency(run: Run, span: _Span) -> list[Series]:
    """p50, p95 and p99 of the latency of the tasks that finished in each bucket."""
    names = ("p50", "p95", "p99")
    latency = {q: Series(q, [None] * span.n) for q in names}
    for i, qs in run(span.sql(_LATENCY)):
        for q, v in zip(names, qs, strict=True):
            latency[q].values[int(i)] = float(v)
    return list(latency.values())


def _marks(run: Run, span: _Span) -> list[Mark]:
    alerts = [
        Mark(_ts(t), str(kind), f"{kind}: {metric}") for t, kind, metric in run(span.sql(_ALERTS))
    ]
    breaker = [Mark(_ts(t), "breaker", f"breaker: {to}") for t, to in run(span.sql(_BREAKER))]
    return alerts + breaker


def _totals(run: Run, span: _Span) -> dict[str, float]:
    outcomes = {str(o): int(k) for o, k in run(span.sql(_OUTCOMES))}
    cleanup_total, cleanup_ok = run(span.sql(_CLEANUP_TOTALS))[0]
    adopted, started = run(span.sql(_WARM))[0]
    return {
        "tasks": sum(outcomes.values()),
        "succeeded": outcomes.get("succeeded", 0),
        "failed": outcomes.get("failed", 0),
        "rejected": outcomes.get("rejected", 0),
        "errors": _one(run(span.sql(_ERROR_COUNT))),
        "cleanup_steps": int(cleanup_total),
        "cleanup_success_pct": round(100 * cleanup_ok / cleanup_total, 2)
        if cleanup_total
        else 100.0,
        "leaked_now": _one(run(_LEAKED_NOW)),
        "warm_start_pct": round(100 * adopted / started, 1) if started else 0.0,
    }


def _one(rows: Sequence[Sequence[Any]]) -> float:
    return float(rows[0][0] or 0)


def _in(values: list[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def _w(width: int) -> str:
    for unit, s in (("d", 86400), ("h", 3600), ("min", 60)):
        if width % s == 0:
            return f"{width // s} {unit}"
    return f"{width} s"
