"""`supervisor run` as users run it (a subprocess), against real dockerd and nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from schemas import ErrorRaised, Limits, Result, RetryPolicy, TaskSpec, event_type
from schemas.config import Config
from supervisor.daemon.node import open_node
from supervisor.eventlog.nats_server import NatsServer
from testing.stream import stream_events
from tests.conftest import SANDBOX_IMAGE

pytestmark = pytest.mark.usefixtures("docker_client")


def _supervisor(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _spec_file(tmp_dir: Path, script: str, **extra: object) -> Path:
    doc: dict[str, object] = {
        "image": SANDBOX_IMAGE,
        "command": ["sh", "/workspace/main.sh"],
        "files": {"main.sh": script},
    }
    doc.update(extra)
    path = tmp_dir / "spec.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("script", "extra", "status", "code", "exit_status"),
    [
        ("echo hi", {}, "succeeded", None, 0),
        ("exit 4", {}, "failed", "NONZERO_EXIT", 1),
        ("true", {"privileged": True}, "rejected", "POLICY_VIOLATION", 2),
        (
            "sleep 5",
            {"limits": {"timeout_s": 0.5}, "retry": {"max_attempts": 1}},
            "failed",
            "EXECUTION_TIMEOUT",
            1,
        ),
    ],
)
def test_run_prints_the_result_and_exits_with_the_designed_code(
    tmp_dir: Path,
    nats_url: str,
    script: str,
    extra: dict[str, object],
    status: str,
    code: str | None,
    exit_status: int,
) -> None:
    spec = _spec_file(tmp_dir, script, **extra)

    proc = _supervisor(
        "run", str(spec), "--json", "--nats", nats_url, "--data-dir", str(tmp_dir / "d")
    )

    assert proc.returncode == exit_status, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["status"] == status
    assert (result["error"] or {}).get("code") == code
    events = asyncio.run(stream_events(nats_url, f"sup.task.*.*.{result['task_id']}"))
    assert event_type(events[-1]) == f"task.{status}"


def test_run_reads_the_spec_from_stdin(tmp_dir: Path, nats_url: str) -> None:
    doc = {"image": SANDBOX_IMAGE, "command": ["echo", "from stdin"]}

    proc = _supervisor(
        "run",
        "-",
        "--nats",
        nats_url,
        "--data-dir",
        str(tmp_dir / "d"),
        stdin=json.dumps(doc).encode(),
    )

    assert proc.returncode == 0
    assert proc.stdout == b"from stdin\n"
    assert b"succeeded after 1 attempt(s)" in proc.stderr


def test_a_malformed_spec_exits_2_and_names_the_field(tmp_dir: Path, nats_url: str) -> None:
    path = tmp_dir / "bad.json"
    path.write_text(
        json.dumps({"image": SANDBOX_IMAGE, "command": ["true"], "limits": {"memory_mb": "x"}})
    )

    proc = _supervisor("run", str(path), "--nats", nats_url, "--data-dir", str(tmp_dir / "d"))

    assert proc.returncode == 2
    assert b"validation/INVALID_SPEC" in proc.stderr and b"limits.memory_mb" in proc.stderr
    errors = asyncio.run(stream_events(nats_url, "sup.error.validation.>"))
    assert [(e.code, e.details) for e in errors if isinstance(e, ErrorRaised)] == [
        ("INVALID_SPEC", {"field": "limits.memory_mb"})
    ]


@pytest.mark.parametrize("raw", [b"{not json", b'{"image": 3}', b"[]"])
def test_run_and_submit_json_print_one_result_for_a_spec_that_does_not_decode(
    tmp_dir: Path, nats_url: str, raw: bytes
) -> None:
    run = _supervisor(
        "run", "-", "--json", "--nats", nats_url, "--data-dir", str(tmp_dir / "d"), stdin=raw
    )
    submit = _supervisor(
        "submit",
        "-",
        "--wait",
        "--json",
        "--nats",
        nats_url,
        "--data-dir",
        str(tmp_dir / "d"),
        stdin=raw,
    )

    for proc in (run, submit):
        assert proc.returncode == 2, proc.stderr
        result = msgspec.json.decode(proc.stdout, type=Result)
        assert (result.status, result.attempts) == ("rejected", 0)
        assert result.error is not None
        assert (result.error.type, result.error.code) == ("validation", "INVALID_SPEC")
        assert result.error.task_id == result.task_id
    # The run recorded its rejection: one terminal event, under the id it printed.
    rejected = asyncio.run(stream_events(nats_url, "sup.task.rejected.>"))
    assert [e.task_id for e in rejected] == [msgspec.json.decode(run.stdout)["task_id"]]


def test_run_without_a_url_starts_and_stops_the_embedded_server(tmp_dir: Path) -> None:
    data = tmp_dir / "d"
    doc = {"image": SANDBOX_IMAGE, "command": ["echo", "embedded"]}
    env = {"SUPERVISOR_NATS_URL": ""}

    proc = _supervisor("run", "-", "--data-dir", str(data), stdin=json.dumps(doc).encode(), env=env)

    assert proc.returncode == 0, proc.stderr.decode()
    assert (data / "nats" / "jetstream").is_dir()
    # The history survives: a second run against the same data dir sees both tasks.
    server = NatsServer(data / "nats")
    url = server.start()
    try:
        events = asyncio.run(stream_events(url, "sup.task.succeeded.>"))
    finally:
        server.stop()
    assert len(events) == 1


def test_help_lists_the_commands() -> None:
    proc = _supervisor("--help")

    assert proc.returncode == 0
    for command in (b"run", b"tail"):
        assert command in proc.stdout


async def test_nats_down_during_a_run_loses_and_duplicates_nothing(
    tmp_dir: Path, nats_server: NatsServer
) -> None:
    cfg = Config(data_dir=str(tmp_dir / "d"))
    spec = TaskSpec(
        image=SANDBOX_IMAGE,
        command=["sh", "-c", "sleep 1.5; echo done"],
        limits=Limits(timeout_s=20),
        retry=RetryPolicy(max_attempts=1),
    )
    async with open_node(cfg, nats_url=nats_server.url) as node:
        task = asyncio.ensure_future(node.executor.run(spec))
        await asyncio.sleep(0.7)
        await asyncio.to_thread(nats_server.stop)
        result = await task
        assert node.events.backlog > 0
        await asyncio.to_thread(nats_server.start)
        assert await node.events.flush(20)

    events = await stream_events(nats_server.url, f"sup.*.*.*.{result.task_id}")
    assert result.status == "succeeded"
    assert [event_type(e) for e in events] == [
        "task.submitted",
        "attempt.started",
        "workspace.created",
        "container.created",
        "container.started",
        "container.exited",
        "attempt.finished",
        "task.succeeded",
        "cleanup.succeeded",
        "cleanup.succeeded",
    ]
    assert len({e.event_id for e in events}) == len(events)
