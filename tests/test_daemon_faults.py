"""One outcome per task whatever fails under a running daemon (`supervisor serve`, as users
start it): its embedded nats-server killed with SIGKILL mid-task, and an outage of an
external NATS longer than the task queue's ack wait, so that every running task's message
is redelivered. Afterwards each task has exactly one terminal event in the stream, no
attempt is closed as lost, and the audit of the stream's history is clean."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest

from projections.audit import audit_records, records_of
from schemas import (
    EmbeddedNatsRestarted,
    ErrorRaised,
    Event,
    TaskFailed,
    TaskRefused,
    TaskSpec,
    TaskSubmitted,
    TaskSucceeded,
)
from schemas.events import TERMINAL_TASK_EVENTS
from supervisor.eventlog.nats_auth import redact
from supervisor.eventlog.nats_server import NatsServer, resolve_nats_url
from testing.daemon import HOST_BRAKES, DaemonProc, submit, task, wait_until
from testing.stream import stream_events

pytestmark = [pytest.mark.docker, pytest.mark.nats]


def terminal_counts(events: list[Event]) -> Counter[str]:
    return Counter(e.task_id for e in events if isinstance(e, TERMINAL_TASK_EVENTS))


def assert_one_outcome_each(events: list[Event], task_ids: list[str]) -> None:
    assert terminal_counts(events) == Counter({t: 1 for t in task_ids})
    failed = {e.task_id: e.result.error for e in events if isinstance(e, TaskFailed)}
    assert failed == {}
    assert sorted(e.task_id for e in events if isinstance(e, TaskSucceeded)) == sorted(task_ids)
    lost = [e for e in events if isinstance(e, ErrorRaised) and e.code == "SUPERVISOR_LOST"]
    assert lost == []
    assert audit_records(records_of(events)) == []


def _client_url(data: Path) -> str:
    """The embedded server's URL as the data dir's commands find it: with the node's
    credentials (the server is never anonymous)."""
    url = resolve_nats_url(None, data)
    assert url is not None and "@" in url and "@" not in (data / "nats.url").read_text()
    return url


def _nats_child(daemon: DaemonProc) -> psutil.Process:
    assert daemon.proc is not None
    children = psutil.Process(daemon.proc.pid).children()
    servers = [c for c in children if c.name() == "nats-server"]
    assert len(servers) == 1, children
    return servers[0]


def test_the_embedded_nats_killed_mid_task_is_restarted_and_each_task_ends_once(
    tmp_dir: Path, daemons: list[DaemonProc]
) -> None:
    data = tmp_dir / "data"
    daemon = DaemonProc(data, None, {"scheduling": {"concurrency": 4}}).start()
    daemons.append(daemon)
    url = _client_url(data)
    ids = [f"embedded-{i}" for i in range(4)]
    for t in ids:  # long enough that all four run at once even when submissions are slow
        spec = task("sleep 12; echo done", task_id=t, limits={"timeout_s": 60})
        assert submit(url, tmp_dir / "client", spec).returncode == 0
    wait_until(lambda: len(list((data / "workspaces").iterdir())) == 4, 60, "4 running tasks")
    server = _nats_child(daemon)
    with daemon.client() as c:  # queued behind the four; its end is followed by the daemon
        c.submit(msgspec.convert(task("echo queued", task_id="embedded-http"), TaskSpec))

    server.send_signal(signal.SIGKILL)
    server.wait(10)

    wait_until(lambda: _nats_child_or_none(daemon) is not None, 30, "the server to be back")
    events: list[Event] = []

    def all_ended() -> bool:  # these four: the queued one may end before the last of them
        nonlocal events
        events = asyncio.run(stream_events(url))
        return set(ids) <= set(terminal_counts(events))

    wait_until(all_ended, 90, "the 4 tasks to end")
    # The daemon's follower of ends lived through the restart: a task submitted before it
    # and one after are answered from it (no projection sequence: not the read side's row).
    with daemon.client() as c:
        after = c.submit(msgspec.convert(task("echo after", task_id="embedded-after"), TaskSpec))
        for t in ("embedded-http", after.task_id):
            view = c.wait(t, timeout_s=60)
            assert view.result is not None and view.result.status == "succeeded", view
            assert view.projection_seq is None, view
    ids += ["embedded-http", "embedded-after"]
    time.sleep(1.0)  # any second terminal event would land now
    events = asyncio.run(stream_events(url))
    assert_one_outcome_each(events, ids)
    assert [e.task_id for e in events if isinstance(e, TaskFailed)] == []
    restarts = [e for e in events if isinstance(e, EmbeddedNatsRestarted)]
    assert [(r.exit_code, r.restarts) for r in restarts] == [(-signal.SIGKILL, 1)]
    assert "embedded nats-server exited (killed by SIGKILL); restarting it" in daemon.log()
    # The same port (the events above came from it), and no credentials in the file.
    assert (data / "nats.url").read_text().strip() == redact(url)
    try:
        wait_until(lambda: daemon.get("/readyz")[0] == 200, 30, "the daemon to be ready again")
    except AssertionError:
        checks = json.loads(daemon.get("/readyz")[1])["checks"]
        raise AssertionError({k: v for k, v in checks.items() if not v["ok"]}) from None
    daemon.stop()
    assert daemon.wait() == 0


def _nats_child_or_none(daemon: DaemonProc) -> psutil.Process | None:
    assert daemon.proc is not None
    for c in psutil.Process(daemon.proc.pid).children():
        if c.name() == "nats-server" and c.status() != psutil.STATUS_ZOMBIE:
            return c
    return None


def test_an_outage_longer_than_the_ack_wait_redelivers_but_never_reruns_or_recloses(
    tmp_dir: Path, daemons: list[DaemonProc]
) -> None:
    server = NatsServer(tmp_dir / "nats-store")
    url = server.start()
    try:
        data = tmp_dir / "data"
        config = {
            "scheduling": {"concurrency": 4, "ack_wait_s": 2, "ack_progress_s": 1},
            "pool": {"size": 0},  # the workspaces dirs counted below are the tasks'
        }
        daemon = DaemonProc(data, url, config).start()
        daemons.append(daemon)
        # Two end while NATS is away, two still run when it is back: all four messages are
        # redelivered (their acks and in-progress acks could not reach it). Long enough
        # that all four run at once even when the submissions are slow.
        ids = [f"outage-{i}" for i in range(4)]
        for i, t in enumerate(ids):
            script = "sleep 6; echo done" if i < 2 else "sleep 16; echo done"
            spec = task(script, task_id=t, limits={"timeout_s": 60})
            assert submit(url, tmp_dir / "client", spec).returncode == 0
        wait_until(lambda: len(list((data / "workspaces").iterdir())) == 4, 60, "4 running tasks")

        server.stop()
        wait_until(lambda: len(list((data / "workspaces").iterdir())) == 2, 60, "2 tasks to end")
        time.sleep(3)  # past the ack wait
        server.start()  # same port, same store

        events: list[Event] = []

        def all_ended() -> bool:
            nonlocal events
            events = asyncio.run(stream_events(url))
            return len(terminal_counts(events)) == 4

        wait_until(all_ended, 90, "the 4 tasks' outcomes to land")
        wait_until(lambda: _queue_empty(url), 60, "every message to be acked")
        time.sleep(3)  # another ack wait: a message left unacked would be redelivered now
        events = asyncio.run(stream_events(url))
        assert_one_outcome_each(events, ids)
        assert _queue_empty(url)
        log = daemon.log()
        assert log.count("redelivered after it ended here; acking it") >= 2, log
        assert "redelivered while it runs here; following the new delivery" in log, log
        daemon.stop()
        assert daemon.wait() == 0
    finally:
        server.stop()


def _queue_empty(url: str) -> bool:
    async def depth() -> int:
        import nats

        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info("SUP_TASKS")
            return int(info.state.messages)
        finally:
            await nc.close()

    return asyncio.run(depth()) == 0


@pytest.fixture
def small_disk(tmp_dir: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs of the test's own, to fill up (needs root, as CI runs)."""
    mount = tmp_dir / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True, check=False
    )
    assert os.statvfs(disk).f_bavail == 0
    return filler


def _checks(daemon: DaemonProc) -> dict[str, Any]:
    return dict(json.loads(daemon.get("/readyz")[1])["checks"])


def test_a_full_disk_is_named_refuses_work_and_recovers_by_itself(
    tmp_dir: Path, small_disk: Path, daemons: list[DaemonProc]
) -> None:
    data = small_disk / "data"
    config = {
        "thresholds": {
            **dict.fromkeys(HOST_BRAKES, 0.0),
            "disk_min_free_mb": 4,
            "disk_pct": 101.0,
        }
    }
    daemon = DaemonProc(data, None, config).start()
    daemons.append(daemon)
    url = _client_url(data)
    running = task("sleep 3; echo survived", task_id="disk-running", limits={"timeout_s": 60})
    assert submit(url, tmp_dir / "client", running).returncode == 0
    wait_until(lambda: any((data / "workspaces").glob("disk-running.*")), 60, "the task to run")

    filler = _fill(small_disk)

    wait_until(lambda: not _checks(daemon)["disk"]["ok"], 30, "the disk check to fail")
    assert _checks(daemon)["disk"]["reason"].startswith("DISK_FULL: ")
    assert "supervisor_disk_full 1.0" in daemon.get("/metrics")[1].decode()
    status, body = daemon.request(
        "POST", "/v1/tasks", json.dumps(task("true", task_id="disk-http")).encode()
    )
    assert (status, json.loads(body)["error"]["code"]) == (507, "DISK_FULL")
    cli = submit(url, data, task("true", task_id="disk-cli"), "--json")
    assert cli.returncode == 2, cli.stderr
    assert json.loads(cli.stdout)["error"]["code"] == "DISK_FULL"
    time.sleep(4)  # the running task ends meanwhile; its events wait

    filler.unlink()

    wait_until(lambda: daemon.get("/readyz")[0] == 200, 60, "the daemon to recover")
    after = submit(
        url, tmp_dir / "client", task("echo after", task_id="disk-after"), "--wait", "--json"
    )
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["stdout"] == "after\n"
    expected = {"disk-running": "TaskSucceeded", "disk-after": "TaskSucceeded"}

    def landed() -> bool:
        events = asyncio.run(stream_events(url))
        refused = any(isinstance(e, TaskRefused) and e.task_id == "disk-http" for e in events)
        return refused and len(terminal_counts(events)) >= 2

    wait_until(landed, 60, "every outcome to land")
    events = asyncio.run(stream_events(url))
    assert terminal_counts(events) == Counter(dict.fromkeys(expected, 1))
    outcome = {e.task_id: type(e).__name__ for e in events if isinstance(e, TERMINAL_TASK_EVENTS)}
    # The daemon held its refusal in memory and recorded it once there was room, as a
    # passing refusal (`task.refused`: the id stays free); the CLI, refused on the same
    # full disk, could record nothing, and no task exists under its id.
    assert outcome == expected
    refusals = [(type(e).__name__, e.task_id) for e in events if e.task_id == "disk-http"]
    assert refusals == [("ErrorRaised", "disk-http"), ("TaskRefused", "disk-http")]
    assert [e for e in events if e.task_id == "disk-cli"] == []
    submitted = {e.task_id for e in events if isinstance(e, TaskSubmitted)}
    assert submitted == {"disk-running", "disk-after"}
    assert audit_records(records_of(events)) == []
    log = daemon.log()
    assert "DISK_FULL: the data dir has" in log
    daemon.stop()
    assert daemon.wait() == 0
