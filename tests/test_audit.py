"""The audit: one hand-built inconsistent history per rule, a clean one, and the same
answers from a projection file and from the CLI."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path

import pytest

from projections.audit import Record, Violation, audit_db, audit_records, records_of, render_text
from schemas import (
    AttemptFinished,
    CleanupFailed,
    CleanupSucceeded,
    ErrorRaised,
    Event,
    Evidence,
    WorkspaceCreated,
)
from supervisor.cli.read_parsers import add_parsers
from testing.projection import project
from testing.synthetic import AttemptPlan, HistoryBuilder

TIMEOUT = AttemptPlan(error="EXECUTION_TIMEOUT", exit_code=137, kill_reason="timeout")


def audit(events: list[Event], **kw: float) -> list[Violation]:
    return audit_records(records_of(events), **kw)  # type: ignore[arg-type]


def rules(violations: list[Violation]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(v.task_id, v.rule, v.seqs) for v in violations]


def clean_history() -> HistoryBuilder:
    b = HistoryBuilder()
    b.run_task("t-1")
    b.run_task("t-2", TIMEOUT, AttemptPlan())
    b.run_task("t-3", AttemptPlan(fail_cleanup=("remove_workspace",), resolve_failed_cleanup=True))
    b.submit("t-4")
    b.reject("t-4")
    return b


def one_task(*plans: AttemptPlan) -> HistoryBuilder:
    """t-1: seq 1 submitted; attempt 1: 2 started, 3 workspace, 4 created, 5 started,
    6 exited, 7 remove_container, 8 remove_workspace, 9 finished; 10 succeeded."""
    b = HistoryBuilder()
    b.run_task("t-1", *plans)
    return b


def test_a_clean_history_passes() -> None:
    assert audit(clean_history().events) == []


def test_task_lifecycle_an_event_the_machine_forbids() -> None:
    events = one_task().events
    del events[8]  # attempt.finished: the task goes from running straight to succeeded
    assert rules(audit(events)) == [
        ("t-1", "task_lifecycle", (2, 9)),
        ("t-1", "terminal_not_attempt", (9,)),
    ]
    assert audit(events)[0].detail == "task.succeeded not allowed in state running"


def test_one_terminal_state_a_second_terminal_event() -> None:
    b = one_task()
    b.fail("t-1", 1, "NONZERO_EXIT", 1)
    assert rules(audit(b.events)) == [("t-1", "one_terminal_state", (10, 11))]


def test_task_not_terminal_a_submitted_task_that_never_ends() -> None:
    events = one_task().events
    del events[9]
    assert rules(audit(events)) == [("t-1", "task_not_terminal", (1,))]


def test_attempt_order_a_skipped_attempt_number() -> None:
    b = HistoryBuilder()
    b.submit("t-1")
    b.attempt("t-1", 1, TIMEOUT)
    b.retry("t-1", 1, "EXECUTION_TIMEOUT")
    b.attempt("t-1", 3)
    b.succeed("t-1", 3)
    assert rules(audit(b.events)) == [("t-1", "attempt_order", (2, 13))]


def test_attempt_order_an_event_of_an_attempt_never_started() -> None:
    b = one_task()
    b.emit(
        ErrorRaised,
        "t-1",
        2,
        error_type="timeout",
        code="EXECUTION_TIMEOUT",
        message="late",
        retryable=True,
    )
    assert rules(audit(b.events)) == [("t-1", "attempt_order", (11,))]


def test_event_after_attempt_finished() -> None:
    b = one_task()
    b.emit(
        ErrorRaised,
        "t-1",
        1,
        error_type="infrastructure",
        code="DOCKER_API_ERROR",
        message="late",
        retryable=True,
    )
    assert rules(audit(b.events)) == [("t-1", "event_after_attempt_finished", (9, 11))]


def test_a_cleanup_after_the_attempt_that_resolves_a_failure_is_allowed() -> None:
    b = one_task(AttemptPlan(fail_cleanup=("remove_container",)))
    b.emit(
        CleanupSucceeded,
        "t-1",
        1,
        step="remove_container",
        resource=b.container_id("t-1", 1),
        duration_s=0.1,
    )
    assert audit(b.events) == []


def test_a_failed_kill_is_resolved_by_a_removal() -> None:
    b = HistoryBuilder()
    b.submit("t-1")
    b.attempt("t-1", 1, finish=False)
    cid, ws = b.container_id("t-1", 1), b.workspace_path("t-1", 1)
    b.emit(
        CleanupFailed, "t-1", 1, step="kill", resource=cid, duration_s=0.1, reason="no such process"
    )
    b.emit(CleanupSucceeded, "t-1", 1, step="remove_container", resource=cid, duration_s=0.1)
    b.emit(CleanupSucceeded, "t-1", 1, step="remove_workspace", resource=ws, duration_s=0.1)
    b.emit(
        AttemptFinished, "t-1", 1, outcome="succeeded", exit_code=0, evidence=Evidence(exit_code=0)
    )
    b.succeed("t-1", 1)
    assert audit(b.events) == []


def test_container_lifecycle_started_before_created() -> None:
    events = one_task().events
    events[3], events[4] = events[4], events[3]
    violations = audit(events)
    assert rules(violations) == [("t-1", "container_lifecycle", (4,))]
    assert violations[0].resource == "c-t-1-1"


def test_container_not_removed() -> None:
    violations = audit(one_task(AttemptPlan(leak_container=True)).events)
    assert rules(violations) == [("t-1", "container_not_removed", (4,))]
    assert (violations[0].attempt, violations[0].resource) == (1, "c-t-1-1")


def test_workspace_not_removed() -> None:
    violations = audit(one_task(AttemptPlan(leak_workspace=True)).events)
    assert rules(violations) == [("t-1", "workspace_not_removed", (3,))]
    assert violations[0].resource == "/data/workspaces/t-1.1.x"


def test_workspace_lifecycle_created_twice() -> None:
    b = one_task()
    again = WorkspaceCreated(**{f: getattr(b.events[2], f) for f in b.events[2].__struct_fields__})
    events = [*b.events[:3], again, *b.events[3:]]
    assert rules(audit(events)) == [("t-1", "workspace_lifecycle", (3, 4))]


def test_cleanup_unresolved() -> None:
    violations = audit(one_task(AttemptPlan(fail_cleanup=("remove_workspace",))).events)
    assert rules(violations) == [
        ("t-1", "workspace_not_removed", (3,)),
        ("t-1", "cleanup_unresolved", (8,)),
    ]
    assert violations[1].detail == "remove_workspace failed and was never resolved"


def test_work_in_flight_is_spared_only_within_the_grace() -> None:
    b = one_task()
    b.submit("t-2")
    b.attempt("t-2", 1, finish=False)
    assert rules(audit(b.events)) == [
        ("t-2", "task_not_terminal", (11,)),
        ("t-2", "workspace_not_removed", (13,)),
        ("t-2", "container_not_removed", (14,)),
    ]
    assert audit(b.events, grace_s=60) == []
    b.wait(timedelta(minutes=5))
    b.run_task("t-3")
    assert len(audit(b.events, grace_s=60)) == 3


def test_a_removal_ordered_by_the_reconciler_is_allowed() -> None:
    records = records_of(one_task(AttemptPlan(leak_container=True)).events)
    at = records[-1].occurred_at
    records += [
        Record(11, "reconcile.decision", "t-1", 1, at, None, None, "c-t-1-1", None),
        Record(12, "cleanup.succeeded", "t-1", 1, at, None, "remove_container", "c-t-1-1", None),
    ]
    assert audit_records(records) == []


def _project(history: list[Event], db: Path) -> None:
    project(history, db)


def inconsistent_history() -> list[Event]:
    b = clean_history()
    b.run_task("t-5", AttemptPlan(leak_container=True))
    b.run_task("t-6", AttemptPlan(fail_cleanup=("remove_workspace",)))
    return b.events


def test_the_projection_gives_the_same_answer(tmp_dir: Path) -> None:
    history = inconsistent_history()
    db = tmp_dir / "p.duckdb"
    _project(history, db)
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        from_db = audit_db(con)
    finally:
        con.close()
    assert from_db == audit(history)
    # clean_history is seqs 1-45; t-5 creates its container at 49; t-6 its workspace at 57,
    # and fails to remove it at 62.
    assert rules(from_db) == [
        ("t-5", "container_not_removed", (49,)),
        ("t-6", "workspace_not_removed", (57,)),
        ("t-6", "cleanup_unresolved", (62,)),
    ]


@pytest.mark.parametrize("as_json", [False, True])
def test_the_cli_exits_1_on_violations_and_0_when_clean(
    tmp_dir: Path, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    bad, good = tmp_dir / "bad.duckdb", tmp_dir / "good.duckdb"
    _project(inconsistent_history(), bad)
    _project(clean_history().events, good)

    args = parser.parse_args(["audit", "--db", str(bad), *(["--json"] if as_json else [])])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    if as_json:
        doc = json.loads(out)
        assert doc["count"] == 3
        assert doc["violations"][0] == {
            "task_id": "t-5",
            "rule": "container_not_removed",
            "seqs": [49],
            "detail": "container created, never removed (last exited)",
            "attempt": 1,
            "resource": "c-t-5-1",
        }
    else:
        assert out == render_text(audit(inconsistent_history()))
        assert out.splitlines()[0] == (
            "t-5 attempt 1  container_not_removed c-t-5-1  seq 49  "
            "container created, never removed (last exited)"
        )
    args = parser.parse_args(["audit", "--db", str(good)])
    assert args.func(args) == 0
    assert capsys.readouterr().out == "audit: clean (no violation)\n"
