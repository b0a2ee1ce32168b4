"""The audit, tried by mutation: a clean, realistic history (two instances, a daemon killed
mid-task and superseded, retries, a failed cleanup fixed later, a leak the reconciler
removes) passes; each of its rules (`projections.audit.RULES`) is caught when exactly its
inconsistency is injected. The chaos test holds real histories clean under the same rules
(`testing/chaos.py`), and `test_the_generator_emits_what_a_daemon_records` holds the
generator to a real daemon's events."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pytest

from projections.audit import (
    RULES,
    Record,
    Retention,
    audit_db,
    audit_records,
    history_start,
    records_of,
)
from schemas import (
    AttemptFinished,
    CleanupSucceeded,
    ContainerCreated,
    ContainerExited,
    ContainerStarted,
    ErrorRaised,
    Event,
    Evidence,
    NodeHeartbeat,
    ReconcileDecision,
    ReconcileOutcome,
    SupervisorStarted,
    SupervisorStopped,
    SupervisorSuperseded,
    TaskFailed,
    TaskSubmitted,
    TaskSucceeded,
    WorkspaceCreated,
    event_type,
)
from testing.projection import project
from testing.synthetic import AttemptPlan, HistoryBuilder

TIMEOUT = AttemptPlan(error="EXECUTION_TIMEOUT", exit_code=137, kill_reason="timeout")
HEARTBEAT: dict[str, Any] = {"role": "serve", "interval_s": 5.0, "timeout_s": 20.0}


def realistic() -> HistoryBuilder:
    """22 tasks on instance boot-1, which is killed while t-6 runs; boot-2 supersedes it,
    closes t-6's lost attempt and runs it again; a container t-7 leaked is removed by
    boot-2's reconciler; boot-2 stops."""
    b = HistoryBuilder(id_prefix="mu", tick=timedelta(milliseconds=50))
    b.emit(SupervisorStarted, role="serve", pid=10)
    b.emit(NodeHeartbeat, **HEARTBEAT)
    b.run_task("t-1")
    b.run_task("t-2", TIMEOUT, AttemptPlan())
    b.run_task("t-3", AttemptPlan(error="NONZERO_EXIT", exit_code=3))
    b.submit("t-4")
    b.reject("t-4")
    b.run_task(
        "t-5",
        AttemptPlan(
            error="OOM_KILLED",
            exit_code=137,
            fail_cleanup=("remove_workspace",),
            resolve_failed_cleanup=True,
        ),
    )
    for i in range(8, 23):
        b.run_task(f"t-{i}", *((TIMEOUT, AttemptPlan()) if i % 5 == 0 else ()))
    b.submit("t-6")
    b.start_attempt("t-6", 1)
    b.emit(NodeHeartbeat, **HEARTBEAT)
    b.wait(timedelta(seconds=1))
    # boot-1 is SIGKILLed; boot-2 takes the data dir's lock.
    b.instance_id = "boot-2"
    b.emit(SupervisorStarted, role="serve", pid=11)
    b.emit(SupervisorSuperseded, superseded_instance="boot-1", superseded_pid=10)
    b.emit(NodeHeartbeat, **HEARTBEAT)
    cid, ws = b.container_id("t-6", 1), b.workspace_path("t-6", 1)
    b.emit(CleanupSucceeded, "t-6", 1, step="remove_container", resource=cid, duration_s=0.1)
    b.emit(CleanupSucceeded, "t-6", 1, step="remove_workspace", resource=ws, duration_s=0.1)
    b.emit(
        ErrorRaised,
        "t-6",
        1,
        error_type="infrastructure",
        code="SUPERVISOR_LOST",
        message="its owner boot-1 was superseded",
        retryable=True,
    )
    b.emit(
        AttemptFinished,
        "t-6",
        1,
        outcome="failed",
        error_type="infrastructure",
        error_code="SUPERVISOR_LOST",
    )
    b.retry("t-6", 1, "SUPERVISOR_LOST")
    b.attempt("t-6", 2)
    b.succeed("t-6", 2)
    b.run_task("t-7", AttemptPlan(leak_container=True))
    leaked = b.container_id("t-7", 1)
    b.emit(NodeHeartbeat, **HEARTBEAT)
    b.emit(
        ReconcileDecision,
        rule="orphan_container",
        resource_kind="container",
        resource=leaked,
        action="remove_container",
        command_id="cmd-1",
        resource_task_id="t-7",
        resource_attempt=1,
    )
    b.emit(CleanupSucceeded, "t-7", 1, step="remove_container", resource=leaked, duration_s=0.1)
    b.emit(
        ReconcileOutcome,
        command_id="cmd-1",
        outcome="succeeded",
        rule="orphan_container",
        action="remove_container",
        resource_kind="container",
        resource=leaked,
    )
    b.emit(SupervisorStopped, reason="signal")
    return b


def _at(
    events: list[Event], cls: type, task_id: str, attempt: int | None = None, **kw: object
) -> int:
    """The index of the first event of type `cls` of the task (and attempt) matching `kw`."""
    for i, e in enumerate(events):
        if (
            isinstance(e, cls)
            and e.task_id == task_id
            and (attempt is None or e.attempt == attempt)
            and all(getattr(e, k) == v for k, v in kw.items())
        ):
            return i
    raise LookupError(f"no {cls.__name__} of {task_id}")


def _copy(e: Event, **changes: object) -> Event:
    return msgspec.structs.replace(e, event_id=e.event_id + "-x", **changes)


def _set(events: list[Event], i: int, **changes: object) -> None:
    events[i] = msgspec.structs.replace(events[i], **changes)


def _later(e: Event, ms: int = 1) -> object:
    return e.occurred_at + timedelta(milliseconds=ms)


def m_task_lifecycle(ev: list[Event]) -> None:
    i = _at(ev, TaskSucceeded, "t-1")
    ev.insert(i + 1, _copy(ev[_at(ev, TaskSubmitted, "t-1")], occurred_at=_later(ev[i])))


def m_one_terminal_state(ev: list[Event]) -> None:
    i = _at(ev, TaskSucceeded, "t-1")
    ev.insert(i + 1, _copy(ev[i], occurred_at=_later(ev[i])))


def m_not_owner(ev: list[Event]) -> None:
    i = _at(ev, ContainerStarted, "t-6", 2)
    forged = _copy(ev[_at(ev, TaskSucceeded, "t-6")], instance_id="intruder")
    ev.insert(i + 1, msgspec.structs.replace(forged, occurred_at=_later(ev[i])))


FORGED = "-forged"
"""An `event_id` ending so is an end signed by a key that is not its node's: the proof the
projection gives it (`schemas.lifecycle.Keyring`, tried for real in `tests/test_signing.py`)."""


def m_not_signed(ev: list[Event]) -> None:
    # The attack: while t-1 runs, an end copying its owner's node and instance id.
    i = _at(ev, ContainerStarted, "t-1", 1)
    end = ev[_at(ev, TaskSucceeded, "t-1")]
    forged = msgspec.structs.replace(end, event_id=end.event_id + FORGED)
    ev.insert(i + 1, msgspec.structs.replace(forged, occurred_at=_later(ev[i])))


def _records(events: list[Event]) -> list[Record]:
    """`records_of`, with the proof of each forged end."""
    records = records_of(events)
    for i, e in enumerate(events):
        if e.event_id.endswith(FORGED):
            records[i] = records[i]._replace(proof="unknown_key")
    return records


def m_task_not_terminal(ev: list[Event]) -> None:
    del ev[_at(ev, TaskFailed, "t-3")]


def m_attempt_order(ev: list[Event]) -> None:
    for i, e in enumerate(ev):
        if e.task_id == "t-2" and e.attempt == 2:
            ev[i] = msgspec.structs.replace(e, attempt=3)


def m_event_after_attempt_finished(ev: list[Event]) -> None:
    i = _at(ev, AttemptFinished, "t-1", 1)
    ev.insert(i + 1, _copy(ev[_at(ev, WorkspaceCreated, "t-1", 1)], occurred_at=_later(ev[i])))


def m_container_lifecycle(ev: list[Event]) -> None:
    del ev[_at(ev, ContainerCreated, "t-3", 1)]


def m_workspace_lifecycle(ev: list[Event]) -> None:
    i = _at(ev, WorkspaceCreated, "t-1", 1)
    ev.insert(i + 1, _copy(ev[i]))


def m_container_not_removed(ev: list[Event]) -> None:
    del ev[_at(ev, CleanupSucceeded, "t-1", 1, step="remove_container")]


def m_workspace_not_removed(ev: list[Event]) -> None:
    del ev[_at(ev, CleanupSucceeded, "t-1", 1, step="remove_workspace")]


def m_cleanup_unresolved(ev: list[Event]) -> None:
    del ev[_at(ev, CleanupSucceeded, "t-5", 1, step="remove_workspace")]


def m_decision_without_outcome(ev: list[Event]) -> None:
    del ev[next(i for i, e in enumerate(ev) if isinstance(e, ReconcileOutcome))]


def m_outcome_not_evidence(ev: list[Event]) -> None:
    """The issue's case: a success whose container exited 3, recorded consistently."""
    for i in (_at(ev, ContainerExited, "t-1", 1), _at(ev, AttemptFinished, "t-1", 1)):
        _set(ev, i, exit_code=3, evidence=Evidence(exit_code=3))


def m_evidence_altered(ev: list[Event]) -> None:
    i = _at(ev, ContainerExited, "t-1", 1)
    _set(ev, i, exit_code=3, evidence=Evidence(exit_code=3))


def m_terminal_not_attempt(ev: list[Event]) -> None:
    i = _at(ev, TaskFailed, "t-3")
    ok = ev[_at(ev, TaskSucceeded, "t-1")]
    ev[i] = msgspec.structs.replace(
        ok,
        event_id=ev[i].event_id,
        occurred_at=ev[i].occurred_at,
        task_id="t-3",
        correlation_id=ev[i].correlation_id,
    )


def m_event_after_instance_end(ev: list[Event]) -> None:
    i = _at(ev, SupervisorSuperseded, "_")
    late = _copy(ev[_at(ev, NodeHeartbeat, "_")], occurred_at=_later(ev[i], 500))
    ev.insert(i + 2, late)


def m_decision_unjustified(ev: list[Event]) -> None:
    """The reconciler removes the running container of a live instance's open attempt."""
    i = _at(ev, ContainerStarted, "t-6", 2)
    ev.insert(
        i + 1,
        _copy(
            ev[next(j for j, e in enumerate(ev) if isinstance(e, ReconcileDecision))],
            occurred_at=_later(ev[i]),
            resource=ev[i].container_id,  # type: ignore[attr-defined]
            resource_task_id="t-6",
            resource_attempt=2,
            command_id="cmd-2",
            dry_run=True,
        ),
    )


MUTATIONS: dict[str, Callable[[list[Event]], None]] = {
    name[2:]: fn for name, fn in globals().items() if name.startswith("m_") and callable(fn)
}


def test_the_clean_history_is_clean_and_every_rule_has_a_mutation() -> None:
    events = realistic().events
    assert len({e.task_id for e in events} - {"_"}) == 22
    assert audit_records(_records(events)) == []
    assert set(MUTATIONS) | {"history_erased"} == set(RULES), "a rule with no mutation"


@pytest.mark.parametrize("rule", sorted(MUTATIONS))
def test_each_injected_inconsistency_is_reported_by_its_rule(rule: str) -> None:
    events = list(realistic().events)
    MUTATIONS[rule](events)
    found = {v.rule for v in audit_records(_records(events))}
    assert rule in found, f"{rule} missed; found {found}"
    assert len(found) <= 3, found  # one slip, not a cascade


def test_an_erased_beginning_is_reported_unless_retention_explains_it() -> None:
    records = records_of(realistic().events[40:], first_seq=41)
    start = history_start(records)
    assert start.violation() is None  # no retention known: the reader cannot judge
    erased = start._replace(
        retention=Retention(max_age_s=None, max_bytes=None, max_msgs=None, messages=300, bytes=0)
    )
    assert (v := erased.violation()) is not None and v.rule == "history_erased"


@pytest.mark.parametrize("rule", ["", "outcome_not_evidence", "decision_unjustified"])
def test_the_projection_file_gives_the_same_answers(tmp_dir: Path, rule: str) -> None:
    """Read back from a projection file (`load_records`: the evidence and decision fields
    come from the JSON payloads)."""
    events = list(realistic().events)
    if rule:
        MUTATIONS[rule](events)
    db = project(events, tmp_dir / "p.duckdb")
    con = duckdb.connect(str(db), read_only=True)
    try:
        found = [v.rule for v in audit_db(con)]
    finally:
        con.close()
    assert found == ([rule] if rule else [])


_ORDER = (
    "task.submitted",
    "attempt.started",
    "workspace.created",
    "container.created",
    "container.started",
    "container.exited",
    "attempt.finished",
)


def _shape(events: list[Event]) -> tuple[list[str], Evidence | None, str | None]:
    """A task's lifecycle steps in order (cleanup and errors apart), its last attempt's
    recorded evidence and the code it ended with."""
    types = [event_type(e) for e in events]
    steps = [t for t in types if t in _ORDER or t.startswith("task.")]
    finished = [e for e in events if isinstance(e, AttemptFinished)]
    return (
        steps,
        finished[-1].evidence if finished else None,
        (finished[-1].error_code if finished else None),
    )


def test_the_generator_emits_what_a_daemon_records(
    tmp_dir: Path, nats_url: str, docker_client: object
) -> None:
    """The same three tasks run by a real daemon and written by the generator: the same
    lifecycle steps in the same order, the same evidence fields and codes, and the real
    history is clean under every rule, the re-derivations included."""
    import asyncio

    from schemas import TaskSpec
    from testing.daemon import DaemonProc, task
    from testing.stream import stream_events

    plans = {
        "t-ok": (task("echo hi", retry={"max_attempts": 1}), AttemptPlan()),
        "t-exit": (
            task("exit 3", retry={"max_attempts": 1}),
            AttemptPlan(error="NONZERO_EXIT", exit_code=3),
        ),
        "t-slow": (
            task("sleep 30", retry={"max_attempts": 1}, limits={"timeout_s": 0.5}),
            TIMEOUT,
        ),
    }
    d = DaemonProc(tmp_dir / "data", nats_url)
    try:
        d.start(60)
        with d.client() as c:
            for task_id, (spec, _) in plans.items():
                c.run(TaskSpec(**{**spec, "task_id": task_id}), timeout_s=60)
    finally:
        d.stop()
    real = asyncio.run(stream_events(nats_url, "sup.>"))
    assert audit_records(records_of(real)) == []
    for task_id, (_, plan) in plans.items():
        b = HistoryBuilder()
        b.run_task(task_id, plan, max_attempts=1)
        ours = [e for e in real if e.task_id == task_id]
        steps, evidence, code = _shape(ours)
        g_steps, g_evidence, g_code = _shape(b.events)
        assert (steps, code) == (g_steps, g_code), task_id
        assert evidence is not None and g_evidence is not None
        for name in ("exit_code", "kills_issued", "oom_killed", "pids_limit_events"):
            assert getattr(evidence, name) == getattr(g_evidence, name), (task_id, name)
