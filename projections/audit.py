"""The audit: history (the `events` table) checked against the lifecycle state machine
(`schemas.lifecycle`) and the invariants of the design.

Rules, each reported with the task, and the stream sequences that prove it:

- `task_lifecycle`: an event the task machine does not allow in the task's state (the
  machine then resynchronises on the state the event leads to, so one slip is one report);
- `one_terminal_state`: a task reached a second terminal event;
- `not_signed`: a terminal or `attempt.finished` event its node did not sign (its proof,
  judged by the projection: `unsigned`, `bad_signature` or `unknown_key`); not applied;
- `not_owner`: a terminal or `attempt.finished` event that the attempt's owner did not
  send and the design does not let another instance send
  (`projections.store.machine.terminal_applies`, `attempt_finish_applies`): a forgery, or a
  node that went on after it was presumed dead. It is not applied, here as in the
  projection;
- `task_not_terminal`: a submitted task never reached a terminal state (a task whose last
  submission was refused for a passing reason, `task.refused`, is at rest: not queued);
- `attempt_order`: attempts not started as 1, 2, 3..., or an event of an attempt that was
  never started;
- `event_after_attempt_finished`: a workspace/container/cleanup/error event of an attempt
  after its `attempt.finished`. Excepted: its own cleanup events, from the instance that
  ran it (a container that exited on its own is removed after the outcome); cleanup
  events that resolve an earlier `cleanup.failed` of the same resource, or that follow a
  `reconcile.decision` naming it, as do kills (cleanup ordered by the reconciler);
- `container_lifecycle` / `workspace_lifecycle`: a resource event its machine does not
  allow (removing an already removed resource is allowed: cleanup is idempotent; so is
  removing one never recorded as created when a `reconcile.decision` named it);
- `container_not_removed` / `workspace_not_removed`: created, never removed;
- `cleanup_unresolved`: a `cleanup.failed` not followed by a `cleanup.succeeded` for the
  same resource (of the same step, or `remove_container` for a failed `kill`);
- `decision_without_outcome`: a `reconcile.decision` that ordered a command (not a dry
  run) with no final `reconcile.outcome` for that command afterwards;
- `history_erased`: the history starts past seq 1 and the stream's retention in force
  cannot explain it (judged when the audit reads the stream, which knows its limits);
- and the rules that decide again from recorded evidence (`projections.evidence`):
  `outcome_not_evidence`, `evidence_altered`, `terminal_not_attempt`,
  `event_after_instance_end`, `decision_unjustified`.

"Eventually" rules (`task_not_terminal`, `*_not_removed`, `cleanup_unresolved`,
`decision_without_outcome`) skip work still in flight when `grace_s` is given: a task not
terminal whose last event (a decision: itself) is within `grace_s` of the end of history
(`now`). Without it the history is judged as complete.
`audit_records` is pure; `load_records` reads them from a projection.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import duckdb
import msgspec

from projections.evidence import AUDIT_RULES as RULES
from projections.evidence import Record, Rederivation, Violation, refused_end
from projections.store.apply import ATTEMPT_CATEGORIES
from projections.store.machine import (
    TERMINAL_TASK_TYPES,
    attempt_finish_applies,
    task_state_after,
    terminal_applies,
)
from schemas import NO_TASK, Event, event_type
from schemas.lifecycle import (
    TASK_EVENT_TYPES,
    InvalidTransition,
    is_at_rest,
    is_terminal,
    next_container_state,
    next_task_state,
    next_workspace_state,
)

__all__ = [
    "RULES",
    "HistoryStart",
    "Record",
    "Retention",
    "Violation",
    "audit_db",
    "audit_history",
    "audit_records",
    "history_start",
    "load_records",
    "records_of",
    "render_json",
    "render_text",
]

_CONTAINER_EVENTS = ("container.created", "container.started", "container.exited")
_RESOLVES = {
    "kill": ("kill", "remove_container"),
    "remove_container": ("remove_container",),
    "remove_workspace": ("remove_workspace",),
}


_LOAD = """
SELECT seq, type, task_id, attempt, occurred_at,
       payload->>'container_id', payload->>'step', payload->>'resource', payload->>'path',
       payload->>'command_id', (payload->>'dry_run')::BOOLEAN, (payload->>'final')::BOOLEAN,
       instance_id, payload->>'error_type', node_id, payload->>'outcome',
       payload->>'error_code', CAST(payload->'evidence' AS VARCHAR),
       payload->>'superseded_instance', (payload->>'deadline')::DOUBLE, payload->>'rule',
       payload->>'action', (payload->>'timeout_s')::DOUBLE, proof
FROM events ORDER BY seq
"""


def load_records(con: duckdb.DuckDBPyConnection) -> list[Record]:
    """Every event of the projection, in stream order."""
    return [Record._make(row) for row in con.execute(_LOAD).fetchall()]


_FIELDS = Record._fields[5:]


def records_of(events: Iterable[Event], first_seq: int = 1) -> list[Record]:
    """Records of `events` as if they were stored in this order from `first_seq` on."""
    out = []
    for seq, e in enumerate(events, start=first_seq):
        head = (seq, event_type(e), e.task_id or NO_TASK, e.attempt, e.occurred_at)
        extra = [getattr(e, name, None) for name in _FIELDS]
        evidence = getattr(e, "evidence", None)
        extra[_FIELDS.index("evidence")] = (
            None if evidence is None else msgspec.json.encode(evidence).decode()
        )
        out.append(Record._make((*head, *extra)))
    return out


class Retention(NamedTuple):
    """The stream's limits in force when the audit read it (None or <= 0: no such limit),
    and what it held then."""

    max_age_s: float | None
    max_bytes: int | None
    max_msgs: int | None
    messages: int
    bytes: int

    def explains_loss(self) -> bool:
        """Whether these limits could have removed the start of the history: an age limit
        always could; a count or size limit only when the stream is near it (a limit that
        was lowered and raised again, or none at all, cannot explain it)."""
        if self.max_age_s and self.max_age_s > 0:
            return True
        if self.max_msgs and self.max_msgs > 0 and self.messages >= 0.9 * self.max_msgs:
            return True
        return bool(self.max_bytes and self.max_bytes > 0 and self.bytes >= 0.5 * self.max_bytes)

    def describe(self) -> str:
        def show(v: float | int | None) -> str:
            return "none" if not v or v <= 0 else f"{v:g}"

        return (
            f"max_age_s {show(self.max_age_s)}, max_bytes {show(self.max_bytes)}, "
            f"max_msgs {show(self.max_msgs)}; the stream holds {self.messages} messages, "
            f"{self.bytes} bytes"
        )


class HistoryStart(NamedTuple):
    """Where the history read begins. `first_seq` > 1 means the stream's retention
    (`[events] max_age` / `max_bytes`) dropped what came before; `partial_tasks` are the
    tasks whose first event read is not their `task.submitted`: their start was dropped,
    so the rules that need a task's beginning cannot judge them."""

    first_seq: int | None
    partial_tasks: frozenset[str]
    retention: Retention | None = None

    @property
    def erased(self) -> bool:
        """The history starts past seq 1 and the retention in force cannot explain it."""
        return (
            self.first_seq is not None
            and self.first_seq > 1
            and self.retention is not None
            and not self.retention.explains_loss()
        )

    def note(self) -> str | None:
        """A plain sentence for the reader, or None when the history is whole."""
        if self.first_seq is None or self.first_seq <= 1:
            return None
        if self.erased:
            return None  # a violation, not a note
        why = (
            "removed by the stream's retention ([events] max_age / max_bytes)"
            if self.retention is not None
            else "removed (read from a file: audit the stream to check the retention)"
        )
        return (
            f"the history read starts at seq {self.first_seq}, not 1: events before it were "
            f"{why}; {len(self.partial_tasks)} task(s) whose start was removed are not audited"
        )

    def violation(self) -> Violation | None:
        """`history_erased`, with its evidence, when the start cannot be explained."""
        if not self.erased:
            return None
        assert self.first_seq is not None and self.retention is not None
        return Violation(
            task_id=NO_TASK,
            rule="history_erased",
            seqs=(self.first_seq,),
            detail=(
                f"the history starts at seq {self.first_seq}, not 1, and no retention limit "
                f"in force explains it ({self.retention.describe()}): events were erased"
            ),
        )


def history_start(records: list[Record]) -> HistoryStart:
    """Where `records` (in stream order) begin, and the tasks whose start is missing."""
    first = records[0].seq if records else None
    if first is None or first <= 1:
        return HistoryStart(first, frozenset())
    seen: set[str] = set()
    partial: set[str] = set()
    for r in records:
        if r.task_id == NO_TASK or r.task_id in seen:
            continue
        seen.add(r.task_id)
        if r.type != "task.submitted":
            partial.add(r.task_id)
    return HistoryStart(first, frozenset(partial))


class _Resource:
    __slots__ = ("attempt", "created", "failed", "last_seq", "removed", "state", "task_id")

    def __init__(self, task_id: str, attempt: int) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.state: str | None = None
        self.created: int | None = None
        self.removed: int | None = None
        self.failed: list[tuple[int, str]] = []
        self.last_seq = 0


class _Task:
    __slots__ = (
        "finished",
        "last_at",
        "last_machine",
        "owners",
        "started",
        "state",
        "submitted",
        "terminal",
    )

    def __init__(self) -> None:
        self.state: str | None = None
        self.last_machine: int | None = None
        self.submitted: int | None = None
        self.terminal: int | None = None
        self.started: list[tuple[int, int]] = []
        self.finished: dict[int, int] = {}
        self.owners: dict[int, str] = {}  # attempt -> the instance of its first event
        self.last_at: datetime | None = None


def audit_records(
    records: Iterable[Record],
    *,
    grace_s: float | None = None,
    now: datetime | None = None,
    skip: frozenset[str] = frozenset(),
    rederive: bool = True,
) -> list[Violation]:
    """Every violation in `records` (in stream order), sorted by first proving sequence.
    The events of the tasks in `skip` (`HistoryStart.partial_tasks`) are left out;
    `rederive` False leaves out the rules of `projections.evidence` (to measure them)."""
    out: list[Violation] = []
    tasks: dict[str, _Task] = defaultdict(_Task)
    resources: dict[tuple[str, str], _Resource] = {}
    decided: set[str] = set()
    ordered: dict[str, Record] = {}  # command id -> the first decision ordering it
    concluded: set[str] = set()  # command ids with a final outcome
    end: datetime | None = None
    again = Rederivation()
    for r in records:
        end = r.occurred_at if end is None or r.occurred_at > end else end
        if r.task_id in skip:
            continue
        t = tasks[r.task_id]
        t.last_at = r.occurred_at
        category = r.type.split(".", 1)[0]
        if r.attempt > 0 and category in ATTEMPT_CATEGORIES:
            t.owners.setdefault(r.attempt, r.instance_id)
        owned = _owned(r, t, out)
        if rederive:
            again.feed(r, owned)
        if not owned:
            continue
        if r.type in TASK_EVENT_TYPES:
            _task_event(r, t, out)
        if r.type == "reconcile.decision" and r.resource:
            decided.add(r.resource)
            if r.command_id and not r.dry_run:
                ordered.setdefault(r.command_id, r)
        if r.type == "reconcile.outcome" and r.final and r.command_id:
            concluded.add(r.command_id)
        if r.attempt > 0 and category in ATTEMPT_CATEGORIES:
            _attempt_event(r, t, resources, decided, out)
        if category in ("container", "workspace", "cleanup"):
            _resource_event(r, resources, decided, out)
    now = now or end
    open_since = now - timedelta(seconds=grace_s) if now and grace_s is not None else None

    def in_flight(task_id: str) -> bool:
        t = tasks.get(task_id)
        return (
            t is not None
            and open_since is not None
            and t.terminal is None
            and t.last_at is not None
            and t.last_at >= open_since
        )

    for task_id, t in tasks.items():
        resting = is_at_rest(t.state)
        if (
            t.submitted is not None
            and t.terminal is None
            and not resting
            and not in_flight(task_id)
        ):
            out.append(
                Violation(
                    task_id=task_id,
                    rule="task_not_terminal",
                    seqs=(t.submitted,),
                    detail=f"submitted, still {t.state} at the end of history",
                )
            )
    for (kind, name), res in resources.items():
        if in_flight(res.task_id):
            continue
        if res.created is not None and res.removed is None:
            out.append(
                Violation(
                    task_id=res.task_id,
                    rule=f"{kind}_not_removed",
                    seqs=(res.created,),
                    attempt=res.attempt,
                    resource=name,
                    detail=f"{kind} created, never removed (last {res.state})",
                )
            )
        for seq, step in res.failed:
            out.append(
                Violation(
                    task_id=res.task_id,
                    rule="cleanup_unresolved",
                    seqs=(seq,),
                    attempt=res.attempt,
                    resource=name,
                    detail=f"{step} failed and was never resolved",
                )
            )
    for command_id, d in ordered.items():
        if command_id in concluded or (open_since is not None and d.occurred_at >= open_since):
            continue
        out.append(
            Violation(
                task_id=d.task_id,
                rule="decision_without_outcome",
                seqs=(d.seq,),
                resource=d.resource,
                detail=f"command {command_id} never reached a final outcome",
            )
        )
    out.extend(again.violations)
    out.sort(key=lambda v: (v.seqs[0], v.rule))
    return out


def _owned(r: Record, t: _Task, out: list[Violation]) -> bool:
    """Whether `r` may be applied: False (and a `not_signed` or `not_owner` violation) for
    an end its node did not sign, or of an attempt that its owner did not send and no other
    instance may send."""
    owner = t.owners.get(r.attempt)
    if r.type == "attempt.finished":
        ok = attempt_finish_applies(r.instance_id, owner, r.error_type, r.proof)
    elif r.type in TERMINAL_TASK_TYPES:
        finished = t.finished.get(r.attempt)
        ok = terminal_applies(r.attempt, r.instance_id, r.seq, owner, finished, r.proof)
    else:
        return True
    if not ok:
        out.append(refused_end(r, owner))
    return ok


def _task_event(r: Record, t: _Task, out: list[Violation]) -> None:
    if r.type == "task.submitted" and t.submitted is None:
        t.submitted = r.seq
    if r.type == "attempt.started":
        t.started.append((r.attempt, r.seq))
        expected = t.started[-2][0] + 1 if len(t.started) > 1 else 1
        if r.attempt != expected:
            prev = t.started[-2][1] if len(t.started) > 1 else r.seq
            out.append(
                Violation(
                    task_id=r.task_id,
                    rule="attempt_order",
                    attempt=r.attempt,
                    seqs=tuple(sorted({prev, r.seq})),
                    detail=f"attempt {r.attempt} started where {expected} was due",
                )
            )
    if r.type == "attempt.finished":
        t.finished.setdefault(r.attempt, r.seq)
    try:
        t.state = next_task_state(t.state, r.type)
    except InvalidTransition:
        proof = (t.last_machine, r.seq) if t.last_machine is not None else (r.seq,)
        if is_terminal(t.state) and r.type in TERMINAL_TASK_TYPES:
            out.append(
                Violation(
                    task_id=r.task_id,
                    rule="one_terminal_state",
                    seqs=(t.terminal or r.seq, r.seq),
                    detail=f"{r.type} after the task was already {t.state}",
                )
            )
        else:
            out.append(
                Violation(
                    task_id=r.task_id,
                    rule="task_lifecycle",
                    seqs=proof,
                    attempt=r.attempt or None,
                    detail=f"{r.type} not allowed in state {t.state or '(none)'}",
                )
            )
        t.state = task_state_after(r.type) if not is_terminal(t.state) else t.state
    if r.type in TERMINAL_TASK_TYPES and t.terminal is None:
        t.terminal = r.seq
    t.last_machine = r.seq


def _attempt_event(
    r: Record,
    t: _Task,
    resources: dict[tuple[str, str], _Resource],
    decided: set[str],
    out: list[Violation],
) -> None:
    if r.type != "attempt.started" and all(a != r.attempt for a, _ in t.started):
        out.append(
            Violation(
                task_id=r.task_id,
                rule="attempt_order",
                seqs=(r.seq,),
                attempt=r.attempt,
                detail=f"{r.type} of attempt {r.attempt}, which was never started",
            )
        )
    finished = t.finished.get(r.attempt)
    if finished is None or r.type.startswith("attempt."):
        return
    if r.type.startswith("cleanup.") and r.resource is not None:
        res = resources.get((_kind_of(r), r.resource))
        if r.resource in decided or (res is not None and res.failed):
            return
        if r.instance_id and r.instance_id == t.owners.get(r.attempt):
            return  # the attempt's own removal, left to follow its outcome
    if r.type == "container.kill_issued" and r.container_id in decided:
        return  # the reconciler kills a container left running
    out.append(
        Violation(
            task_id=r.task_id,
            rule="event_after_attempt_finished",
            seqs=(finished, r.seq),
            attempt=r.attempt,
            resource=r.container_id or r.resource or r.path,
            detail=f"{r.type} after attempt {r.attempt} finished",
        )
    )


def _kind_of(r: Record) -> str:
    if r.type.startswith("workspace.") or r.step == "remove_workspace":
        return "workspace"
    return "container"


def _resource_event(
    r: Record, resources: dict[tuple[str, str], _Resource], decided: set[str], out: list[Violation]
) -> None:
    kind = _kind_of(r)
    name = r.container_id if r.type.startswith("container.") else (r.path or r.resource)
    if name is None:
        return
    res = resources.get((kind, name))
    if res is None:
        res = resources[(kind, name)] = _Resource(r.task_id, r.attempt)
    if r.type == "cleanup.failed":
        res.failed.append((r.seq, r.step or ""))
        return
    if r.type == "cleanup.succeeded":
        res.failed = [(s, step) for s, step in res.failed if r.step not in _RESOLVES.get(step, ())]
        if r.step == "kill" or res.state == "removed":
            return
        if res.state is None and name in decided:  # an orphan the reconciler found
            res.state, res.removed, res.last_seq = "removed", r.seq, r.seq
            return
        event = "removed"
    elif r.type in _CONTAINER_EVENTS or r.type == "workspace.created":
        event = r.type
    else:
        return  # container.kill_issued: no state change
    step = next_container_state if kind == "container" else next_workspace_state
    try:
        res.state = step(res.state, event)
    except InvalidTransition:
        proof = (res.last_seq, r.seq) if res.last_seq else (r.seq,)
        out.append(
            Violation(
                task_id=r.task_id,
                rule=f"{kind}_lifecycle",
                seqs=proof,
                attempt=r.attempt or None,
                resource=name,
                detail=f"{event} not allowed in state {res.state or '(none)'}",
            )
        )
    if event.endswith("created") and res.created is None:
        res.created = r.seq
    if event == "removed" and res.removed is None:
        res.removed = r.seq
    res.last_seq = r.seq


def audit_db(
    con: duckdb.DuckDBPyConnection, *, grace_s: float | None = None, now: datetime | None = None
) -> list[Violation]:
    """`audit_records` over the projection's `events`."""
    return audit_history(con, grace_s=grace_s, now=now)[0]


def audit_history(
    con: duckdb.DuckDBPyConnection,
    *,
    grace_s: float | None = None,
    now: datetime | None = None,
    retention: Retention | None = None,
) -> tuple[list[Violation], HistoryStart]:
    """`audit_records` over the projection's `events`, leaving out the tasks whose start the
    stream's retention removed; with where the history starts. Given the stream's
    `retention`, a start past seq 1 that it cannot explain is a `history_erased` violation."""
    records = load_records(con)
    start = history_start(records)._replace(retention=retention)
    violations = audit_records(records, grace_s=grace_s, now=now, skip=start.partial_tasks)
    erased = start.violation()
    return ([erased, *violations] if erased else violations), start


def render_text(violations: list[Violation]) -> str:
    """One line per violation (task, rule, proving sequences, detail), then a summary."""
    if not violations:
        return "audit: clean (no violation)\n"
    lines = []
    for v in violations:
        where = f" attempt {v.attempt}" if v.attempt else ""
        what = f" {v.resource}" if v.resource else ""
        seqs = ",".join(str(s) for s in v.seqs)
        lines.append(f"{v.task_id}{where}  {v.rule}{what}  seq {seqs}  {v.detail}")
    lines.append(f"audit: {len(violations)} violation(s)")
    return "\n".join(lines) + "\n"


def render_json(violations: list[Violation], start: HistoryStart | None = None) -> str:
    """`{"violations": [...], "count": n, "history_starts_at": seq, "skipped_tasks": n}`
    with each violation's fields."""
    doc: dict[str, Any] = {"count": len(violations), "violations": violations}
    if start is not None:
        doc["history_starts_at"] = start.first_seq
        doc["skipped_tasks"] = len(start.partial_tasks)
    return msgspec.json.encode(doc).decode() + "\n"
