"""A hostile local user against a daemon on its default configuration (`supervisor serve`
with its embedded NATS), each attack as it was tried: an anonymous NATS client, a forged
cleanup command naming a running task's container, a forged `task.succeeded` for a running
task, and SQL that writes through a CTE. Even the forgeries published with the node's own
credential (a stolen one) change no outcome."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from schemas import (
    CleanupCommand,
    ReconcileOutcome,
    Result,
    TaskFailed,
    TaskSucceeded,
)
from schemas.connection import connect_options
from schemas.errors import NatsUnavailable
from schemas.events import TERMINAL_TASK_EVENTS
from supervisor.eventlog.emitter import utcnow
from supervisor.eventlog.nats_auth import redact
from supervisor.eventlog.nats_client import connect_nats
from supervisor.eventlog.nats_server import resolve_nats_url
from supervisor.reconcile.command_executor import JetStreamCommands
from testing.daemon import DaemonProc, running_task_container, submit, task, wait_until
from testing.stream import publish_event, stream_events

pytestmark = [pytest.mark.docker, pytest.mark.nats]


class Target:
    def __init__(self, daemon: DaemonProc, url: str, client_dir: Path) -> None:
        self.daemon, self.url, self.client_dir = daemon, url, client_dir

    def submit(self, script: str, task_id: str) -> None:
        spec = task(script, task_id=task_id, limits={"timeout_s": 60})
        done = submit(self.url, self.client_dir, spec)
        assert done.returncode == 0, done.stderr

    def ended(self, task_id: str) -> list[Any]:
        events = asyncio.run(stream_events(self.url, f"sup.task.*.*.{task_id}"))
        return [e for e in events if isinstance(e, TERMINAL_TASK_EVENTS)]

    def query(self, sql: str) -> tuple[int, Any]:
        status, body = self.daemon.request("POST", "/v1/query", json.dumps({"sql": sql}).encode())
        return status, json.loads(body)


@pytest.fixture(scope="module")
def target(module_tmp_dir: Path) -> Iterator[Target]:
    root = module_tmp_dir
    data = root / "data"
    daemon = DaemonProc(data, None, {"scheduling": {"concurrency": 4}, "pool": {}}).start()
    try:
        url = resolve_nats_url(None, data)
        assert url is not None
        yield Target(daemon, url, root / "client")
    finally:
        daemon.stop()


def _forge_success(target: Target, task_id: str) -> None:
    """Publish, with the node's credential, a `task.succeeded` of `task_id`'s first attempt
    from an instance that never ran it."""
    forged = TaskSucceeded(
        event_id=f"forged-success-{task_id}",
        occurred_at=utcnow(),
        node_id="n1",
        instance_id="intruder",
        task_id=task_id,
        attempt=1,
        result=Result(
            task_id=task_id, status="succeeded", attempts=1, exit_code=0, stdout="forged\n"
        ),
    )

    asyncio.run(publish_event(target.url, forged))


def test_an_anonymous_client_is_refused(target: Target) -> None:
    with pytest.raises(NatsUnavailable, match="Authorization Violation"):
        asyncio.run(connect_nats(redact(target.url), reconnect=False, timeout=2))


def test_a_forged_cleanup_command_does_not_kill_a_running_task(
    target: Target, docker_client: Any
) -> None:
    target.submit("sleep 4; echo survived", "atk-cleanup")
    cid = running_task_container(docker_client, target.url, "atk-cleanup")
    command = CleanupCommand(
        command_id="forged-cmd-1",
        node_id="n1",
        action="remove_container",
        resource_kind="container",
        resource=cid,
        rule="orphan_container",
        decision_id="forged-decision",
        issued_at=utcnow(),
        task_id="atk-cleanup",
        attempt=1,
    )

    async def publish() -> None:
        nc = await nats.connect(**connect_options(target.url))
        try:
            assert await JetStreamCommands(nc.jetstream()).publish(command)
        finally:
            await nc.close()

    asyncio.run(publish())
    wait_until(lambda: target.ended("atk-cleanup"), 60, "the task to end")
    (end,) = target.ended("atk-cleanup")
    assert isinstance(end, TaskSucceeded) and end.result.stdout == "survived\n"
    outcomes = [
        e
        for e in asyncio.run(stream_events(target.url, "sup.reconcile.outcome.>"))
        if isinstance(e, ReconcileOutcome) and e.command_id == "forged-cmd-1"
    ]
    assert [(o.outcome, o.final) for o in outcomes] == [("refused", True)]
    assert "before its deadline" in outcomes[0].detail


def test_a_forged_success_of_a_running_task_is_kept_apart_never_its_outcome(
    target: Target, docker_client: Any
) -> None:
    target.submit("sleep 3; echo real; exit 3", "atk-success")
    running_task_container(docker_client, target.url, "atk-success")
    _forge_success(target, "atk-success")
    wait_until(
        lambda: any(isinstance(e, TaskFailed) for e in target.ended("atk-success")),
        60,
        "the real end",
    )

    def projected() -> bool:
        status, body = target.daemon.get("/v1/tasks/atk-success")
        return status == 200 and json.loads(body)["finished_seq"] is not None

    wait_until(projected, 30, "the projection to take the end")
    doc = json.loads(target.daemon.get("/v1/tasks/atk-success")[1])
    assert (doc["state"], doc["outcome"], doc["exit_code"]) == ("failed", "failed", 3)
    # The Result served is the owner's, never the forgery's.
    assert (doc["result"]["status"], doc["result"]["stdout"]) == ("failed", "real\n")
    status, result = target.query(
        "SELECT scope, reason, instance_id, conflict_outcome, first_outcome "
        "FROM terminal_conflicts WHERE task_id = 'atk-success'"
    )
    assert status == 200, result
    # Its node signs everything it sends: an unsigned end is refused for that first.
    assert result["rows"] == [["task", "unsigned", "intruder", "succeeded", "failed"]]


@pytest.mark.parametrize(
    "sql",
    [
        "WITH x AS (UPDATE tasks SET state = 'hacked' RETURNING task_id, state) SELECT * FROM x",
        "SELECT * FROM (DELETE FROM tasks RETURNING task_id)",
        "SELECT * FROM tasks WHERE task_id IN (SELECT task_id FROM "
        "(INSERT INTO tasks (task_id) VALUES ('x') RETURNING task_id))",
    ],
)
def test_sql_that_writes_anywhere_in_its_tree_is_refused(target: Target, sql: str) -> None:
    status, body = target.query(sql)
    assert status == 400, body
    status, rows = target.query("SELECT count(*) FROM tasks WHERE state = 'hacked'")
    assert (status, rows["rows"]) == (200, [[0]])


def test_submit_wait_prints_the_owners_result_never_a_forged_one(
    target: Target, docker_client: Any
) -> None:
    target.client_dir.mkdir(parents=True, exist_ok=True)
    spec = target.client_dir / "atk-wait.json"
    spec.write_text(
        json.dumps(task("sleep 3; echo real; exit 3", task_id="atk-wait", limits={"timeout_s": 60}))
    )
    waiting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supervisor",
            "submit",
            str(spec),
            "--wait",
            "--json",
            "--nats",
            target.url,
            "--data-dir",
            str(target.client_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        running_task_container(docker_client, target.url, "atk-wait")
        _forge_success(target, "atk-wait")
        out, err = waiting.communicate(timeout=90)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 1, err  # failed, as the task really did
    result = json.loads(out)
    assert (result["status"], result["exit_code"], result["stdout"]) == ("failed", 3, "real\n")
