"""The reconciler against a real dockerd and nats-server: each rule caused for real and seen
fixed, through the projection, the decisions, SUP_COMMANDS and the node's command executor.

Every test runs on a node id of its own, so no test (nor another engineer's run on the same
engine) ever sees another's containers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path

import docker.errors
import msgspec
import pytest
from prometheus_client import generate_latest

from projections.audit import audit_records, records_of
from schemas import (
    AttemptFinished,
    CleanupCommand,
    ErrorRaised,
    KillIssued,
    ReconcileDecision,
    ReconcileOutcome,
    TaskSpec,
)
from schemas.streams import COMMANDS_STREAM
from supervisor.eventlog.emitter import Emitter, utcnow
from supervisor.eventlog.history import read_task_events, summarize
from supervisor.execution.recovery import close_lost_attempt
from supervisor.reconcile.command_executor import JetStreamCommands
from supervisor.reconcile.reconciler import Reconciler
from testing.reconcile import labels, new_node_id, rig
from testing.stream import stream_events

pytestmark = [pytest.mark.docker, pytest.mark.nats]


async def _decisions(url: str, node_id: str) -> list[ReconcileDecision]:
    events = await stream_events(url, f"sup.reconcile.decision.{node_id}._")
    return [e for e in events if isinstance(e, ReconcileDecision)]


async def test_orphans_of_a_dead_daemon_are_removed_and_their_attempts_closed(
    nats_url: str, tmp_dir: Path, docker_client
) -> None:  # type: ignore[no-untyped-def]
    async with rig(nats_url, tmp_dir, docker_client) as r:
        dead = r.dead_instance("boot-dead")
        left = [r.running_attempt(dead, f"t-orphan-{i}") for i in range(3)]

        first = await r.reconciler.run_pass()
        outcomes = await r.outcomes(first.commands)
        second = await r.reconciler.run_pass()  # the containers are gone: close the attempts
        closed = await r.outcomes(second.commands)

        assert sorted((p.divergence.rule, p.divergence.resource) for p in first.planned) == sorted(
            [("orphan_container", cid) for cid, _ in left]
            + [("leaked_workspace", str(path)) for _, path in left]
        )
        assert set(outcomes.values()) == {"succeeded"} and len(outcomes) == 6
        assert [cid for cid, _ in left if r.exists(cid or "")] == []
        assert [path for _, path in left if path.exists()] == []
        assert sorted(p.divergence.resource for p in second.planned) == [
            f"t-orphan-{i}/1" for i in range(3)
        ]
        assert {p.divergence.rule for p in second.planned} == {"lost_attempt"}
        assert set(closed.values()) == {"succeeded"}
        await r.node.events.flush(10)
        lost = await stream_events(nats_url, f"sup.error.infrastructure.{r.node_id}.>")
        assert sorted((e.task_id, e.code) for e in lost if isinstance(e, ErrorRaised)) == [
            (f"t-orphan-{i}", "SUPERVISOR_LOST") for i in range(3)
        ]
        finished = await stream_events(nats_url, f"sup.attempt.finished.{r.node_id}.>")
        assert len([e for e in finished if isinstance(e, AttemptFinished)]) == 3
        decisions = await _decisions(nats_url, r.node_id)
        orphan = next(d for d in decisions if d.resource == left[0][0])
        inv_seq, heartbeat_seq = first.inventory_seq, await _last_heartbeat_seq(r, "boot-dead")
        assert inv_seq in orphan.evidence_seqs and heartbeat_seq in orphan.evidence_seqs
        assert "sent no heartbeat" in orphan.reason
        # Nothing is left to do, and the projection says so.
        third = await r.reconciler.run_pass()
        assert third.planned == []
        assert await r.query(
            "SELECT count(*) FROM leaked_resources WHERE node_id = $1", r.node_id
        ) == [(0,)]


async def test_a_redelivery_racing_the_reconciler_closes_a_lost_attempt_once(
    nats_url: str, tmp_dir: Path, docker_client
) -> None:  # type: ignore[no-untyped-def]
    async with rig(nats_url, tmp_dir, docker_client) as r:
        dead = r.dead_instance("boot-dead")
        r.running_attempt(dead, "t-race", container=False)
        await r.node.events.flush(10)
        # The redelivered task's daemon reads the attempt as open...
        history = summarize(await read_task_events(r.js, "t-race"))
        assert history.open_attempt == 1
        # ...the reconciler closes it meanwhile (its workspace first, then the attempt)...
        rules: list[str] = []
        for _ in range(3):
            pass_ = await r.reconciler.run_pass()
            assert set((await r.outcomes(pass_.commands)).values()) <= {"succeeded"}
            rules += [p.divergence.rule for p in pass_.planned]
            if "lost_attempt" in rules:
                break
        assert sorted(rules) == ["leaked_workspace", "lost_attempt"]
        # ...and then the daemon closes it too, from what it read before.
        spec = TaskSpec(image="supervisor-sandbox:busybox", command=["true"], task_id="t-race")
        await close_lost_attempt(r.node.executor, spec, history, "its heartbeats stopped")
        await r.node.events.flush(10)

        errors = await stream_events(nats_url, f"sup.error.infrastructure.{r.node_id}.t-race")
        finished = await stream_events(nats_url, f"sup.attempt.finished.{r.node_id}.t-race")
        assert [e.code for e in errors if isinstance(e, ErrorRaised)] == ["SUPERVISOR_LOST"]
        assert [e.attempt for e in finished if isinstance(e, AttemptFinished)] == [1]
        # The late closer's cleanup (found gone) follows the reconciler's decision: allowed.
        history_events = await stream_events(nats_url, f"sup.*.*.{r.node_id}.>")
        audit_rules = {v.rule for v in audit_records(records_of(history_events))}
        assert audit_rules == {"task_not_terminal"}  # only the task itself is left to finish


async def _last_heartbeat_seq(r, instance: str) -> int:  # type: ignore[no-untyped-def]
    rows = await r.query(
        "SELECT last_heartbeat_seq FROM instances WHERE instance_id = $1", instance
    )
    return int(rows[0][0])


async def test_another_nodes_container_and_an_unlabelled_one_are_never_touched(
    nats_url: str, tmp_dir: Path, docker_client
) -> None:  # type: ignore[no-untyped-def]
    async with rig(nats_url, tmp_dir, docker_client) as r:
        foreign = r.container(labels(new_node_id(), "t-foreign"))
        unlabelled = r.container(labels(r.node_id, "t-bare", managed=False))

        report = await r.reconciler.run_pass()
        # Whoever asks: a forged order naming them, addressed to this node, is refused.
        forged = [
            CleanupCommand(
                command_id=f"forged-{i}",
                node_id=r.node_id,
                action="remove_container",
                resource_kind="container",
                resource=cid,
                rule="orphan_container",
                decision_id="none",
                issued_at=utcnow(),
            )
            for i, cid in enumerate((foreign, unlabelled))
        ]
        for cmd in forged:
            assert await JetStreamCommands(r.js).publish(cmd)
        outcomes = await r.outcomes([c.command_id for c in forged])

        assert report.containers == 0 and report.planned == []
        assert outcomes == {"forged-0": "refused", "forged-1": "refused"}
        assert r.exists(foreign) and r.exists(unlabelled)
        assert docker_client.api.inspect_container(foreign)["State"]["Running"]
        assert docker_client.api.inspect_container(unlabelled)["State"]["Running"]


async def test_a_dry_run_changes_nothing_and_publishes_its_decisions(
    nats_url: str, tmp_dir: Path, docker_client
) -> None:  # type: ignore[no-untyped-def]
    async with rig(nats_url, tmp_dir, docker_client) as r:
        stray = r.container(labels(r.node_id, "t-unknown"))
        before = (await r.js.stream_info(COMMANDS_STREAM)).state.messages

        report = await r.reconciler.run_pass(dry_run=True)
        await r.node.events.flush(10)

        assert [(p.divergence.rule, p.divergence.resource) for p in report.planned] == [
            ("orphan_container", stray)
        ]
        assert (await r.js.stream_info(COMMANDS_STREAM)).state.messages == before
        assert report.commands == [] and report.issued == 0
        assert docker_client.api.inspect_container(stray)["State"]["Running"]
        decisions = await _decisions(nats_url, r.node_id)
        assert [(d.rule, d.resource, d.dry_run) for d in decisions] == [
            ("orphan_container", stray, True)
        ]
        assert decisions[0].command_id == report.planned[0].command_id
        # A dry run again records again; the real pass then acts on the same command id.
        await r.reconciler.run_pass(dry_run=True)
        real = await r.reconciler.run_pass()
        assert real.commands == [report.planned[0].command_id]
        assert await r.outcomes(real.commands) == {real.commands[0]: "succeeded"}
        assert not r.exists(stray)


async def test_two_reconcilers_racing_on_the_same_leak_issue_one_command(
    nats_url: str, tmp_dir: Path, docker_client
) -> None:  # type: ignore[no-untyped-def]
    async with rig(nats_url, tmp_dir, docker_client, background=False) as r:
        leaks = [r.container(labels(r.node_id, f"t-race-{i}")) for i in range(2)]
        other = Reconciler(  # another process of the node: its own instance id
            emitter=Emitter(r.node.events, r.node_id, "other-process"),
            observer=r.node.runtime,
            state=r.state,
            bus=JetStreamCommands(r.js),
            data_dir=r.node.data_dir,
            config=r.reconciler.config,
        )
        before = (await r.js.stream_info(COMMANDS_STREAM)).state.messages

        a, b = await asyncio.gather(r.reconciler.run_pass(), other.run_pass())
        queued = (await r.js.stream_info(COMMANDS_STREAM)).state.messages - before
        handled = await r.executor.drain()
        await r.node.events.flush(10)

        assert sorted(a.commands) == sorted(b.commands) and len(a.commands) == 2
        assert (a.issued + b.issued, a.duplicates + b.duplicates) == (2, 2)
        assert queued == 2 and handled == 2
        decisions = await _decisions(nats_url, r.node_id)
        assert sorted(d.resource for d in decisions) == sorted(leaks)  # one decision each
        outcomes = await stream_events(nats_url, f"sup.reconcile.outcome.{r.node_id}._")
        assert sorted(e.resource for e in outcomes if isinstance(e, ReconcileOutcome)) == sorted(
            leaks
        )
        assert not any(r.exists(cid) for cid in leaks)


async def test_a_leaked_workspace_of_a_finished_task_is_removed(
    nats_url: str, tmp_dir: Path, docker_client
) -> None:  # type: ignore[no-untyped-def]
    async with rig(nats_url, tmp_dir, docker_client) as r:
        from testing.reconcile import SANDBOX_IMAGE

        spec = msgspec.convert(
            {"image": SANDBOX_IMAGE, "command": ["true"], "task_id": "t-ws"},
            type=__import__("schemas").TaskSpec,
        )
        result = await r.node.executor.run(spec)
        await r.node.executor.attempts.drain()
        stray = r.node.data_dir / "workspaces" / "t-ws.1.left-behind"
        stray.mkdir()

        report = await r.reconciler.run_pass()
        outcomes = await r.outcomes(report.commands)

        assert result.status == "succeeded"
        assert [
            (p.divergence.rule, p.divergence.resource, p.divergence.reason) for p in report.planned
        ] == [("leaked_workspace", str(stray), "on disk, and its task succeeded")]
        assert list(outcomes.values()) == ["succeeded"]
        assert not stray.exists()


def _immutable(path: Path, on: bool) -> bool:
    return os.system(f"chattr {'+' if on else '-'}i {path} 2>/dev/null") == 0


async def test_a_cleanup_that_fails_is_retried_with_backoff_and_resolved(
    nats_url: str, tmp_dir: Path, docker_client
) -> None:  # type: ignore[no-untyped-def]
    async with rig(nats_url, tmp_dir, docker_client, command_backoff_s=0.5) as r:
        dead = r.dead_instance("boot-gone")
        _, path = r.running_attempt(dead, "t-stuck", container=False)
        stuck = path / "main.sh"
        if not _immutable(stuck, True):
            shutil.rmtree(path)
            pytest.skip("this filesystem does not support the immutable attribute")
        try:
            report = await r.reconciler.run_pass()
            (cid,) = [p.command_id for p in report.planned if p.divergence.resource == str(path)]
            (close,) = [p.command_id for p in report.planned if p.command_id != cid]
            assert await r.outcomes([close]) == {close: "succeeded"}  # the lost attempt
            deadline = time.monotonic() + 20
            while cid not in r.executor.failing and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            failing = r.executor.failing.get(cid)
            again = await r.reconciler.run_pass()  # pending: no second decision, same command
        finally:
            _immutable(stuck, False)
        outcome = await r.outcomes([cid])

        assert failing is not None and (failing.action, failing.resource) == (
            "remove_workspace",
            str(path),
        )
        assert [(p.divergence.resource, p.pending) for p in again.planned] == [(str(path), True)]
        assert again.decided == [] and again.commands == [cid] and again.duplicates == 1
        assert outcome == {cid: "succeeded"}
        assert not path.exists() and r.executor.failing == {}
        await r.node.events.flush(10)
        outcomes = await stream_events(nats_url, f"sup.reconcile.outcome.{r.node_id}._")
        # The lost attempt's command runs alongside: its outcome may come first.
        deliveries = [
            (e.outcome, e.final)
            for e in outcomes
            if isinstance(e, ReconcileOutcome) and e.command_id == cid
        ]
        assert deliveries[0] == ("failed", False) and deliveries[-1] == ("succeeded", True)
        text = generate_latest(r.node.metrics.registry).decode()
        assert (
            'supervisor_reconcile_commands_failed_total{action="remove_workspace",final="false"}'
            in text
        )
        assert (
            'supervisor_reconcile_commands_succeeded_total{action="remove_workspace"} 1.0' in text
        )
        decided = [(d.rule, d.resource) for d in await _decisions(nats_url, r.node_id)]
        assert sorted(decided) == [("leaked_workspace", str(path)), ("lost_attempt", "t-stuck/1")]


async def test_a_container_past_its_deadline_whose_kill_was_lost_is_removed(
    nats_url: str, tmp_dir: Path, docker_client
) -> None:  # type: ignore[no-untyped-def]
    async with rig(nats_url, tmp_dir, docker_client, deadline_grace_s=1.0) as r:
        me = r.node.emitter  # a live instance: only the deadline condemns the container
        cid, _ = r.running_attempt(me, "t-late", deadline=time.time() - 5)

        report = await r.reconciler.run_pass()
        outcomes = await r.outcomes(report.commands)

        rules = {(p.divergence.rule, p.divergence.resource) for p in report.planned}
        assert rules == {("overdue_container", cid)}
        assert list(outcomes.values()) == ["succeeded"]
        assert not r.exists(cid or "")
        await r.node.events.flush(10)
        kills = await stream_events(nats_url, f"sup.container.kill_issued.{r.node_id}.t-late")
        assert [e.reason for e in kills if isinstance(e, KillIssued)] == ["reconcile"]


async def test_a_vanished_container_is_recorded_and_its_attempt_closed(
    nats_url: str, tmp_dir: Path, docker_client
) -> None:  # type: ignore[no-untyped-def]
    async with rig(nats_url, tmp_dir, docker_client) as r:
        dead = r.dead_instance("boot-lost")
        cid, path = r.running_attempt(dead, "t-vanished")
        docker_client.api.remove_container(cid, force=True)  # out of band
        shutil.rmtree(path)

        report = await r.reconciler.run_pass()
        outcomes = await r.outcomes(report.commands)
        await r.node.events.flush(10)

        assert sorted((p.divergence.rule, p.divergence.resource_kind) for p in report.planned) == [
            ("vanished_container", "attempt"),
            ("vanished_container", "container"),
            ("vanished_workspace", "workspace"),
        ]
        assert sorted(outcomes.values()) == ["already_gone", "already_gone", "succeeded"]
        errors = await stream_events(nats_url, f"sup.error.*.{r.node_id}.t-vanished")
        assert [e.code for e in errors if isinstance(e, ErrorRaised)] == ["CONTAINER_VANISHED"]
        assert await r.query("SELECT state FROM containers WHERE container_id = $1", cid) == [
            ("removed",)
        ]
        assert await r.query(
            "SELECT state, outcome, error_code FROM attempts WHERE task_id = 't-vanished'"
        ) == [("finished", "failed", "CONTAINER_VANISHED")]


def test_the_reconcile_command_runs_one_pass_and_carries_it_out(
    nats_url: str, tmp_dir: Path, docker_client, capsys
) -> None:  # type: ignore[no-untyped-def]
    import json

    from supervisor.cli.main import main

    node_id = new_node_id()
    config = tmp_dir / "config.json"
    config.write_text(json.dumps({"node_id": node_id, "reconcile": {"creation_grace_s": 0}}))
    stray = docker_client.containers.create(
        "supervisor-sandbox:busybox",
        ["sleep", "300"],
        labels=labels(node_id, "t-cli"),
        network_mode="none",
    )
    argv = [
        "reconcile",
        "--json",
        "--nats",
        nats_url,
        "--data-dir",
        str(tmp_dir / "data"),
        "--config",
        str(config),
    ]
    try:
        assert main([*argv, "--dry-run"]) == 0
        dry = json.loads(capsys.readouterr().out)
        still_there = docker_client.containers.list(all=True, filters={"id": stray.id})
        assert main(argv) == 0
        real = json.loads(capsys.readouterr().out)
        gone = docker_client.containers.list(all=True, filters={"id": stray.id}) == []
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            stray.remove(force=True)

    assert (dry["dry_run"], dry["issued"]) == (True, 0)
    assert [(d["rule"], d["resource"], d["status"]) for d in dry["divergences"]] == [
        ("orphan_container", stray.id, "dry_run")
    ]
    assert [c.id for c in still_there] == [stray.id] and gone
    assert [
        (d["rule"], d["resource"], d["status"], d["decided_now"]) for d in real["divergences"]
    ] == [("orphan_container", stray.id, "succeeded", True)]
    assert real["issued"] == 1 and real["containers"] == 1
