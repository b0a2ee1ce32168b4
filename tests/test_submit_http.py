"""`supervisor submit` through the data dir's running daemon (its HTTP API) against a real
daemon, nats-server and dockerd: the same output and exit codes as the NATS path, the
spec's overrides applied, the daemon's own intake recording the submission, and the NATS
path taken when no daemon answers or when the command names NATS or a configuration."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas import Result, TaskSubmitted
from testing.daemon import DaemonProc, free_port, task
from testing.stream import stream_events

pytestmark = pytest.mark.usefixtures("docker_client")


def _submit(data_dir: Path, spec: Any, *args: str, env: dict[str, str] | None = None) -> Any:
    body = spec if isinstance(spec, bytes) else json.dumps(spec).encode()
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "submit", "-", "--data-dir", str(data_dir), *args],
        input=body,
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def _submitted(nats_url: str, task_id: str) -> TaskSubmitted:
    events = asyncio.run(stream_events(nats_url, f"sup.task.submitted.*.{task_id}"))
    (ev,) = [e for e in events if isinstance(e, TaskSubmitted)]
    return ev


@pytest.fixture
def daemon(tmp_dir: Path, nats_url: str, daemons: list[DaemonProc]) -> DaemonProc:
    d = DaemonProc(tmp_dir / "data", nats_url)
    daemons.append(d)
    return d.start(60)


CASES = [
    (task("echo hi", retry={"max_attempts": 1}), 0, "succeeded"),
    (task("echo no >&2; exit 3", retry={"max_attempts": 1}), 1, "failed"),
    (task("true", privileged=True), 2, "rejected"),
]


def test_submit_wait_answers_through_the_daemon_as_through_nats(
    daemon: DaemonProc, nats_url: str
) -> None:
    """A success, a failure and a refusal: the same Result, keys and exit code both ways."""
    for spec, code, status in CASES:
        quick = _submit(daemon.data_dir, spec, "--wait", "--json")
        full = _submit(daemon.data_dir, spec, "--wait", "--json", "--nats", nats_url)
        results = []
        for done in (quick, full):
            assert done.returncode == code, (status, done.stderr)
            results.append(msgspec.json.decode(done.stdout, type=Result))
            assert set(json.loads(done.stdout)) == set(json.loads(full.stdout))
        q, f = results
        assert (q.status, q.exit_code, q.stdout, q.stderr) == (
            status,
            f.exit_code,
            f.stdout,
            f.stderr,
        )
        assert (q.error and (q.error.type, q.error.code)) == (
            f.error and (f.error.type, f.error.code)
        )
        if status != "rejected":
            # The daemon's intake recorded it: the submission is the daemon's instance's.
            by_daemon = _submitted(nats_url, q.task_id)
            by_cli = _submitted(nats_url, f.task_id)
            assert by_daemon.instance_id != by_cli.instance_id


def test_the_overrides_and_the_plain_output_go_through_the_daemon(
    daemon: DaemonProc, nats_url: str
) -> None:
    spec = task("echo out; echo err >&2", retry={"max_attempts": 1})
    done = _submit(daemon.data_dir, spec, "--priority", "high", "--correlation-id", "c-42")
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.decode().strip()
    ev = _submitted(nats_url, task_id)
    assert (ev.priority, ev.correlation_id) == ("high", "c-42")
    waited = _submit(daemon.data_dir, {**spec, "task_id": "t-plain"}, "--wait")
    assert waited.returncode == 0
    assert waited.stdout == b"out\n"
    assert b"err\n" in waited.stderr and b"task t-plain: succeeded after 1 attempt(s)" in (
        waited.stderr
    )
    bad = _submit(daemon.data_dir, b"{not json", "--wait")
    assert bad.returncode == 2 and bad.stderr.startswith(b"supervisor: "), bad.stderr
    slow = _submit(daemon.data_dir, task("sleep 5"), "--wait", "--timeout", "0.5")
    assert slow.returncode == 3 and b"no result within 0.5s" in slow.stderr
    late = _submit(daemon.data_dir, task("sleep 4; echo late"), "--wait")  # longer than a connect
    assert (late.returncode, late.stdout) == (0, b"late\n"), late.stderr


def test_with_no_daemon_answering_submit_goes_to_nats(
    daemon: DaemonProc, nats_url: str, tmp_dir: Path
) -> None:
    """The data dir's daemon stopped (its `http.url` names a closed port): the task is
    queued on NATS, nothing lost; `--config` goes to NATS while the daemon answers."""
    config = tmp_dir / "cli.json"
    config.write_text(json.dumps({"nats_url": nats_url}))
    via_config = _submit(daemon.data_dir, task("true", task_id="t-config"), "--config", str(config))
    via_daemon = _submit(daemon.data_dir, task("true", task_id="t-daemon"))
    assert via_config.returncode == via_daemon.returncode == 0, via_config.stderr
    by_daemon = _submitted(nats_url, "t-daemon").instance_id
    assert _submitted(nats_url, "t-config").instance_id != by_daemon
    daemon.stop()
    (daemon.data_dir / "http.url").write_text(f"http://127.0.0.1:{free_port()}\n")
    env = {"SUPERVISOR_NATS_URL": nats_url}
    done = _submit(daemon.data_dir, task("true", task_id="t-no-daemon"), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"t-no-daemon\n"
    assert _submitted(nats_url, "t-no-daemon").instance_id != by_daemon
