"""The current-state rows of a small batch, computed in Python. Pure: no I/O.

A live batch holds a few events, and the `MERGE`s of `projections.store.apply` cost their
planning whatever their input: tens of milliseconds each, which is most of a live batch.
So for a small batch the store reads the stored rows of the keys the batch touches, and
this module computes their new rows; the store then replaces them (one `DELETE` and one
Arrow insert per table). Large batches (a replay) keep the set-based `MERGE`s.

Each `fold_<table>` is the `MERGE` of the same table, term for term: the batch's events of
a key are aggregated (first, last, counts, "first non-null" as DuckDB's `arg_min` skips a
NULL argument) and combined with the stored row by the same rules. The two are kept equal
by `tests/test_fold.py`, which projects the same histories both ways, cut anywhere, and
compares every row.

A batch folded here also skips the staging tables when it can: the fact tables `errors`,
`cleanups` and `alerts` get their rows from `fact_rows` (the `INSERT`s of
`projections.store.apply`, column for column), and `events` the batch's Arrow table itself.

Events are dicts: the envelope of `STAGING["batch"]` merged with the row of the event's
own staging kind, named by `_kind` (their column names do not overlap); timestamps are
naive UTC, as DuckDB returns them. A row is a dict of the table's columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, Final

from projections.store.apply import ATTEMPT_CATEGORIES, CONTAINER_STEPS
from projections.store.machine import (
    TASK_TARGET_STATE,
    TERMINAL_TASK_TYPES,
    attempt_finish_applies,
    progress_state,
    terminal_applies,
)
from schemas import NO_TASK

Event = dict[str, Any]
Row = dict[str, Any]

_EPOCH: Final = datetime(1970, 1, 1)
_TERMINAL: Final = frozenset(TERMINAL_TASK_TYPES)


def _first(events: list[Event], where: Callable[[Event], bool]) -> Event | None:
    return next((e for e in events if where(e)), None)


def _last(events: list[Event], where: Callable[[Event], bool]) -> Event | None:
    return next((e for e in reversed(events) if where(e)), None)


def _first_value(events: list[Event], where: Callable[[Event], bool], column: str) -> Any:
    """`arg_min(column, seq) FILTER (WHERE where)`: DuckDB skips NULL arguments."""
    return next((e[column] for e in events if where(e) and e[column] is not None), None)


def _last_value(events: list[Event], where: Callable[[Event], bool], column: str) -> Any:
    return next((e[column] for e in reversed(events) if where(e) and e[column] is not None), None)


def _get(event: Event | None, column: str) -> Any:
    return None if event is None else event[column]


def _kept(o: Row, guard: str, column: str, new: Any) -> Any:
    """A "first" column: the stored row's when it has `guard` (its first such event),
    else the batch's `new`."""
    return o[column] if o.get(guard) is not None else new


def _coalesce(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _is(event_type: str) -> Callable[[Event], bool]:
    return lambda e: e["type"] == event_type


def group(events: Iterable[Event], key: Callable[[Event], Any]) -> dict[Any, list[Event]]:
    """The events of each key, in stream order (`events` is)."""
    out: dict[Any, list[Event]] = {}
    for e in events:
        out.setdefault(key(e), []).append(e)
    return out


# --- the fact tables ----------------------------------------------------------------------

FACT_KINDS: Final[dict[str, str]] = {"errors": "error", "cleanups": "cleanup", "alerts": "alert"}
"""Each fact table `fact_rows` fills, and the staging kind it is made of."""

_SUFFIX: Final[dict[str, str]] = {"cleanups": "outcome", "alerts": "kind"}
"""The column that is `split_part(type, '.', 2)` (`cleanup.failed` -> `failed`)."""


def fact_rows(table: str, columns: list[str], events: Iterable[Event]) -> list[Row]:
    """The rows `INSERT_ERRORS`, `INSERT_CLEANUPS` or `INSERT_ALERTS` would add: one per
    event of the table's kind, its envelope and its kind's columns."""
    kind, suffix = FACT_KINDS[table], _SUFFIX.get(table)
    out = []
    for e in events:
        if e["_kind"] == kind:
            row = {c: e[c] for c in columns if c != suffix}
            if suffix is not None:
                parts = e["type"].split(".")
                row[suffix] = parts[1] if len(parts) > 1 else ""
            out.append(row)
    return out


# --- which events each table reads (the `WITH` of its MERGE) -----------------------------


def task_events(events: Iterable[Event]) -> dict[str, list[Event]]:
    return group((e for e in events if e["task_id"] != NO_TASK), lambda e: e["task_id"])


def attempt_events(events: Iterable[Event]) -> dict[tuple[str, int], list[Event]]:
    return group(
        (
            e
            for e in events
            if e["attempt"] > 0 and e["type"].split(".", 1)[0] in ATTEMPT_CATEGORIES
        ),
        lambda e: (e["task_id"], e["attempt"]),
    )


def container_events(events: Iterable[Event]) -> dict[str, list[Event]]:
    def of(e: Event) -> str | None:
        if e["_kind"] == "container":
            return str(e["container_id"])
        if e["_kind"] == "cleanup" and e["step"] in CONTAINER_STEPS:
            return str(e["resource"])
        return None

    return group((e for e in events if of(e) is not None), of)


def workspace_events(events: Iterable[Event]) -> dict[str, list[Event]]:
    def of(e: Event) -> str | None:
        if e["_kind"] == "workspace":
            return str(e["path"])
        if e["_kind"] == "cleanup" and e["step"] == "remove_workspace":
            return str(e["resource"])
        return None

    return group((e for e in events if of(e) is not None), of)


def instance_events(events: Iterable[Event]) -> dict[str, list[Event]]:
    return group(events, lambda e: e["instance_id"])


# --- the rows ------------------------------------------------------------------------------


AttemptRows = Callable[[str, int], "Row | None"]
"""The current row of an attempt (after the batch), by task id and attempt number."""


def fold_task(task_id: str, o: Row | None, ev: list[Event], attempt_row: AttemptRows) -> Row:
    """`projections.store.apply.MERGE_TASKS` for one task; `attempt_row` gives the attempts'
    rows, already folded for this batch."""
    states = [
        TASK_TARGET_STATE[e["type"]]
        for e in ev
        if e["type"] in TASK_TARGET_STATE and e["type"] not in _TERMINAL
    ]
    sub = _first(ev, lambda e: e["_kind"] == "submitted")

    def applies(e: Event) -> bool:
        if e["_kind"] != "terminal":
            return False
        at = attempt_row(task_id, e["attempt"]) if e["attempt"] > 0 else None
        return terminal_applies(
            e["attempt"],
            e["instance_id"],
            e["seq"],
            _get(at, "instance_id"),
            _get(at, "finished_seq"),
        )

    fin = _first(ev, applies)
    known = o is not None
    old_sub = known and o["submitted_seq"] is not None  # type: ignore[index]
    old_fin = known and o["finished_seq"] is not None  # type: ignore[index]
    oo: Row = o or {}
    fin_outcome = TASK_TARGET_STATE[fin["type"]] if fin is not None else None

    def sub_or_old(column: str, sub_column: str) -> Any:
        return oo[column] if old_sub else _get(sub, sub_column)

    def fin_or_old(column: str, fin_column: str) -> Any:
        return oo[column] if old_fin else _get(fin, fin_column)

    return {
        "task_id": task_id,
        "state": _coalesce(
            oo.get("outcome"), fin_outcome, states[-1] if states else None, oo.get("state")
        ),
        "outcome": _coalesce(oo.get("outcome"), fin_outcome),
        "priority": sub_or_old("priority", "priority"),
        "image": sub_or_old("image", "image"),
        "node_id": oo["node_id"] if known else ev[0]["node_id"],
        "correlation_id": oo["correlation_id"] if known else ev[0]["correlation_id"],
        "max_attempts": sub_or_old("max_attempts", "max_attempts"),
        "attempts": (oo.get("attempts") or 0) + sum(e["type"] == "attempt.started" for e in ev),
        "submitted_at": sub_or_old("submitted_at", "occurred_at"),
        "submitted_seq": sub_or_old("submitted_seq", "seq"),
        "finished_at": fin_or_old("finished_at", "occurred_at"),
        "finished_seq": fin_or_old("finished_seq", "seq"),
        "exit_code": fin_or_old("exit_code", "exit_code"),
        "error_type": fin_or_old("error_type", "error_type"),
        "error_code": fin_or_old("error_code", "error_code"),
        "duration_s": fin_or_old("duration_s", "duration_s"),
        "terminal_events": (oo.get("terminal_events") or 0)
        + sum(e["type"] in _TERMINAL for e in ev),
        "first_seq": _coalesce(oo.get("first_seq"), ev[0]["seq"]),
        "last_seq": ev[-1]["seq"],
        "last_event_at": ev[-1]["occurred_at"],
        "events": (oo.get("events") or 0) + len(ev),
    }


def fold_attempt(key: tuple[str, int], o: Row | None, ev: list[Event]) -> Row:
    """`projections.store.apply.MERGE_ATTEMPTS` for one attempt."""
    st = _first(ev, _is("attempt.started"))
    known = o is not None
    oo: Row = o or {}
    starter = oo["instance_id"] if known else ev[0]["instance_id"]
    fin = _first(
        ev,
        lambda e: (
            e["type"] == "attempt.finished"
            and attempt_finish_applies(e["instance_id"], starter, e["error_type"])
        ),
    )
    old_st = known and oo["started_seq"] is not None
    old_fin = known and oo["finished_seq"] is not None
    started_seq = oo["started_seq"] if old_st else _get(st, "seq")
    finished_seq = oo["finished_seq"] if old_fin else _get(fin, "seq")

    def fin_or_old(column: str, fin_column: str) -> Any:
        return oo[column] if old_fin else _get(fin, fin_column)

    state = (
        "finished"
        if finished_seq is not None
        else ("running" if started_seq is not None else "unknown")
    )
    return {
        "task_id": key[0],
        "attempt": key[1],
        "state": state,
        "outcome": fin_or_old("outcome", "outcome"),
        "node_id": oo["node_id"] if known else ev[0]["node_id"],
        "instance_id": starter,
        "max_attempts": oo["max_attempts"] if old_st else _get(st, "max_attempts"),
        "started_at": oo["started_at"] if old_st else _get(st, "occurred_at"),
        "started_seq": started_seq,
        "finished_at": fin_or_old("finished_at", "occurred_at"),
        "finished_seq": finished_seq,
        "exit_code": fin_or_old("exit_code", "exit_code"),
        "error_type": fin_or_old("error_type", "error_type"),
        "error_code": fin_or_old("error_code", "error_code"),
        "duration_s": fin_or_old("duration_s", "duration_s"),
        "container_id": _coalesce(
            oo.get("container_id"), _first_value(ev, _is("container.created"), "container_id")
        ),
        "workspace": _coalesce(
            oo.get("workspace"), _first_value(ev, lambda e: e["_kind"] == "workspace", "path")
        ),
        "kill_reason": _coalesce(
            oo.get("kill_reason"), _first_value(ev, _is("container.kill_issued"), "kill_reason")
        ),
        "first_seq": _coalesce(oo.get("first_seq"), ev[0]["seq"]),
        "last_seq": ev[-1]["seq"],
        "events": (oo.get("events") or 0) + len(ev),
    }


def _deadline(seconds: float | None) -> datetime | None:
    """`CASE WHEN deadline > 0 THEN make_timestamp((deadline * 1e6)::BIGINT) END` (the cast
    rounds half to even, as `round` does)."""
    if seconds is None or not seconds > 0:
        return None
    return _EPOCH + timedelta(microseconds=round(seconds * 1e6))


def _removed(e: Event) -> bool:
    return bool(e["type"] == "cleanup.succeeded")


def _failed(e: Event) -> bool:
    return bool(e["type"] == "cleanup.failed")


def _owner(o: Row | None, ev: list[Event]) -> Row:
    """task_id, attempt, node_id, instance_id: the stored row's, or the first event's."""
    src = o if o is not None else ev[0]
    return {c: src[c] for c in ("task_id", "attempt", "node_id", "instance_id")}


def _removal(oo: Row, ev: list[Event], rm: Event | None) -> Row:
    """The columns a container and a workspace share: their removal (`rm`, the first
    `cleanup.succeeded`), failed cleanups, and the span of their events."""
    old_rm = oo.get("removed_seq") is not None
    return {
        "removed_at": oo["removed_at"] if old_rm else _get(rm, "occurred_at"),
        "removed_seq": oo["removed_seq"] if old_rm else _get(rm, "seq"),
        "already_gone": oo["already_gone"] if old_rm else _get(rm, "already_gone"),
        "cleanup_failures": (oo.get("cleanup_failures") or 0) + sum(map(_failed, ev)),
        "last_cleanup_error": _coalesce(
            _last_value(ev, _failed, "reason"), oo.get("last_cleanup_error")
        ),
        "first_seq": _coalesce(oo.get("first_seq"), ev[0]["seq"]),
        "last_seq": ev[-1]["seq"],
    }


def fold_container(container_id: str, o: Row | None, ev: list[Event]) -> Row:
    """`projections.store.apply.MERGE_CONTAINERS` for one container."""
    oo: Row = o or {}
    cr = _first(ev, _is("container.created"))
    ex = _first(ev, _is("container.exited"))
    rm = _first(ev, lambda e: _removed(e) and e["step"] == "remove_container")
    old_cr = oo.get("created_seq") is not None
    old_ex = oo.get("exited_at") is not None
    created_seq = oo["created_seq"] if old_cr else _get(cr, "seq")
    started = _coalesce(
        oo.get("started_at"), _first_value(ev, _is("container.started"), "occurred_at")
    )
    exited_at = oo["exited_at"] if old_ex else _get(ex, "occurred_at")
    removal = _removal(oo, ev, rm)
    state = progress_state(
        "container",
        {
            "removed_seq": removal["removed_seq"],
            "exited_at": exited_at,
            "started": started,
            "created_seq": created_seq,
        },
    )
    return {
        "container_id": container_id,
        "state": state,
        **_owner(o, ev),
        "image": oo["image"] if old_cr else _get(cr, "image"),
        "deadline": oo["deadline"] if old_cr else _deadline(_get(cr, "deadline")),
        "created_at": oo["created_at"] if old_cr else _get(cr, "occurred_at"),
        "created_seq": created_seq,
        "started_at": started,
        "exited_at": exited_at,
        "exit_code": oo["exit_code"] if old_ex else _get(ex, "exit_code"),
        "oom_killed": oo["oom_killed"] if old_ex else _get(ex, "oom_killed"),
        "kill_reason": _coalesce(
            oo.get("kill_reason"), _first_value(ev, _is("container.kill_issued"), "kill_reason")
        ),
        **removal,
    }


def fold_workspace(path: str, o: Row | None, ev: list[Event]) -> Row:
    """`projections.store.apply.MERGE_WORKSPACES` for one workspace."""
    oo: Row = o or {}
    cr = _first(ev, _is("workspace.created"))
    rm = _first(ev, _removed)
    old_cr = oo.get("created_seq") is not None
    created_seq = oo["created_seq"] if old_cr else _get(cr, "seq")
    removal = _removal(oo, ev, rm)
    state = progress_state(
        "workspace", {"removed_seq": removal["removed_seq"], "created_seq": created_seq}
    )
    return {
        "path": path,
        "state": state,
        **_owner(o, ev),
        "files": oo["files"] if old_cr else _get(cr, "files"),
        "bytes": oo["bytes"] if old_cr else _get(cr, "bytes"),
        "created_at": oo["created_at"] if old_cr else _get(cr, "occurred_at"),
        "created_seq": created_seq,
        **removal,
    }


def fold_instance(instance_id: str, o: Row | None, ev: list[Event]) -> Row:
    """`projections.store.apply_reconcile.MERGE_INSTANCES` for one instance."""
    oo: Row = o or {}
    st = _first(ev, lambda e: e["_kind"] == "instance" and e["type"] == "supervisor.started")
    sp = _first(ev, lambda e: e["_kind"] == "instance" and e["type"] == "supervisor.stopped")
    hb = _last(ev, lambda e: e["_kind"] == "instance" and e["type"] == "node.heartbeat")
    beats = sum(e["_kind"] == "instance" and e["type"] == "node.heartbeat" for e in ev)
    return {
        "instance_id": instance_id,
        "node_id": _coalesce(oo.get("node_id"), ev[0]["node_id"]),
        "role": _coalesce(oo.get("role"), _get(st, "role"), _get(hb, "role")),
        "pid": _coalesce(oo.get("pid"), _get(st, "pid")),
        "started_at": _kept(oo, "started_seq", "started_at", _get(st, "occurred_at")),
        "started_seq": _coalesce(oo.get("started_seq"), _get(st, "seq")),
        "stopped_at": _kept(oo, "stopped_seq", "stopped_at", _get(sp, "occurred_at")),
        "stopped_seq": _coalesce(oo.get("stopped_seq"), _get(sp, "seq")),
        "heartbeats": (oo.get("heartbeats") or 0) + beats,
        "last_heartbeat_at": hb["occurred_at"] if hb is not None else oo.get("last_heartbeat_at"),
        "last_heartbeat_seq": _coalesce(_get(hb, "seq"), oo.get("last_heartbeat_seq")),
        "heartbeat_timeout_s": hb["timeout_s"] if hb is not None else oo.get("heartbeat_timeout_s"),
        "first_seq": _coalesce(oo.get("first_seq"), ev[0]["seq"]),
        "last_seq": ev[-1]["seq"],
        "last_event_at": ev[-1]["occurred_at"],
        "events": (oo.get("events") or 0) + len(ev),
    }


class Fold:
    """One current-state table: its key columns, which events touch which key, and the
    new row of a key from its stored row (None if new) and its events."""

    def __init__(
        self,
        table: str,
        keys: tuple[str, ...],
        select: Callable[[Iterable[Event]], dict[Any, list[Event]]],
        fold: Callable[..., Row],
    ) -> None:
        self.table, self.keys, self.select, self.fold = table, keys, select, fold

    def key_of(self, row: Row) -> Any:
        return row[self.keys[0]] if len(self.keys) == 1 else tuple(row[k] for k in self.keys)


FOLDS: Final[tuple[Fold, ...]] = (
    # Attempts before tasks, as in `projections.store.apply.APPLY_STATEMENTS`: `fold_task` reads
    # the attempts' new rows.
    Fold("attempts", ("task_id", "attempt"), attempt_events, fold_attempt),
    Fold("tasks", ("task_id",), task_events, fold_task),
    Fold("containers", ("container_id",), container_events, fold_container),
    Fold("workspaces", ("path",), workspace_events, fold_workspace),
    Fold("instances", ("instance_id",), instance_events, fold_instance),
)
"""The tables a small batch folds in Python, and the `MERGE` each replaces is listed in
`projections.store.apply.FOLDED_MERGES`."""
