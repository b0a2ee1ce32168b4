"""`GET /v1/tasks`: the filters a listing of tasks takes, checked once, and its SQL. Pure.

Filters (all optional, as query parameters): `state` (a task state), `outcome`
(`succeeded`, `failed`, `rejected`), `correlation_id`, `since` (an ISO time, or a
duration back from now: `90s`, `10m`, `2h`, `7d`; tasks first seen at or after it),
`limit` (1 to `MAX_LIMIT`, default `DEFAULT_LIMIT`) and `cursor` (the `next_cursor` of the
page before). Tasks come in the order they were first seen in the stream, so a cursor
walks the whole list once, whatever arrives meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, get_args

from projections.errors import QueryRefused
from schemas.lifecycle import TaskState
from schemas.params import point_in_time, whole_number

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
OUTCOMES: Final = ("succeeded", "failed", "rejected")
STATES: Final = tuple(get_args(TaskState))
COLUMNS: Final = (
    "task_id, state, outcome, priority, image, node_id, correlation_id, attempts, "
    "submitted_at, finished_at, exit_code, error_type, error_code, duration_s"
)
_KNOWN: Final = frozenset({"state", "outcome", "correlation_id", "since", "limit", "cursor"})


@dataclass(frozen=True)
class TaskFilter:
    state: str | None = None
    outcome: str | None = None
    correlation_id: str | None = None
    since: datetime | None = None
    limit: int = DEFAULT_LIMIT
    after_seq: int = 0


def parse_filter(params: dict[str, str], now: datetime) -> TaskFilter:
    """The filter `params` name; QueryRefused (400) naming what is wrong."""
    unknown = sorted(set(params) - _KNOWN)
    if unknown:
        raise QueryRefused(
            f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN))}"
        )
    state, outcome = params.get("state"), params.get("outcome")
    if state is not None and state not in STATES:
        raise QueryRefused(f"state {state!r}: one of {', '.join(STATES)}")
    if outcome is not None and outcome not in OUTCOMES:
        raise QueryRefused(f"outcome {outcome!r}: one of {', '.join(OUTCOMES)}")
    return TaskFilter(
        state=state,
        outcome=outcome,
        correlation_id=params.get("correlation_id"),
        since=parse_since(params["since"], now) if "since" in params else None,
        limit=_int(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
        after_seq=_int(params, "cursor", 0, 0, 2**62),
    )


def _int(params: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    try:
        return whole_number(name, text, lo, hi)
    except ValueError as e:
        raise QueryRefused(str(e)) from None


def parse_since(text: str, now: datetime) -> datetime:
    """`since` (`schemas.params.point_in_time`) as a naive UTC time, as the projection
    stores them. QueryRefused naming it."""
    try:
        return point_in_time("since", text, now).replace(tzinfo=None)
    except ValueError as e:
        raise QueryRefused(str(e)) from None


def listing_sql(f: TaskFilter) -> tuple[str, dict[str, Any]]:
    """The SELECT of one page (one row more than the page: whether another follows)."""
    where = ["first_seq > $after"]
    params: dict[str, Any] = {"after": f.after_seq, "n": f.limit + 1}
    for column, value in (
        ("state", f.state),
        ("outcome", f.outcome),
        ("correlation_id", f.correlation_id),
    ):
        if value is not None:
            where.append(f"{column} = ${column}")
            params[column] = value
    if f.since is not None:
        where.append("coalesce(submitted_at, last_event_at) >= $since")
        params["since"] = f.since
    sql = (
        f"SELECT {COLUMNS}, first_seq FROM tasks WHERE {' AND '.join(where)} "
        "ORDER BY first_seq LIMIT $n"
    )
    return sql, params
