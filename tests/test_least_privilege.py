"""Least privilege of the daemon as users run it, judged by effect: the API asks who is
calling, no secret of a task reaches a subject the reader may follow, the daemon refuses a
history anyone could erase, the audit calls an erased history by its name, a consumer the
daemon needs is made again, and a command never removes a running attempt's workspace.
Real daemon, real nats-server (embedded, with its users, where the test needs them)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats
import pytest
from nats.js.api import StreamConfig

from schemas import CleanupCommand, TaskSpec, TaskSubmitted, encode_command
from schemas.connection import connect_options
from schemas.streams import EVENTS_STREAM, TASKS_STREAM
from supervisor.client import AsyncClient
from supervisor.eventlog.nats_auth import read_credentials, redact, with_user
from testing.daemon import DaemonProc, task, wait_until
from testing.stream import stream_events

pytestmark = pytest.mark.usefixtures("docker_client")


def _spec(script: str, **extra: object) -> TaskSpec:
    return msgspec.convert(task(script, **extra), TaskSpec)


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _nats_url(d: DaemonProc) -> str:
    return (d.data_dir / "nats.url").read_text().strip()


async def _as(d: DaemonProc, role: str) -> nats.NATS:
    creds = read_credentials(d.data_dir)
    assert creds is not None
    url = with_user(redact(_nats_url(d)), role, getattr(creds, role))
    return await nats.connect(**connect_options(url), connect_timeout=5)


def _cli(d: DaemonProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args, "--data-dir", str(d.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_api_asks_who_is_calling_and_the_cli_knows_the_answer(tmp_dir: Path, daemons) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProc(tmp_dir / "data", None).start()
    daemons.append(d)
    token_file = d.data_dir / "http-token"

    anonymous = [
        d.request(m, p, b, token="")
        for m, p, b in (
            ("POST", "/v1/tasks", json.dumps(task("echo no")).encode()),
            ("GET", "/v1/tasks", None),
            ("POST", "/v1/query", b'{"sql": "SELECT 1"}'),
            ("DELETE", "/v1/tasks/t-x", None),
        )
    ]
    open_routes = [d.request("GET", p, token="")[0] for p in ("/healthz", "/readyz", "/metrics")]
    sql = _cli(d, "sql", "--format", "json", "SELECT count(*) AS n FROM tasks")

    assert [status for status, _ in anonymous] == [401, 401, 401, 401]
    assert open_routes == [200, 200, 200]
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert len(token_file.read_text().strip()) >= 32
    assert sql.returncode == 0, sql.stderr
    assert json.loads(sql.stdout) == [{"n": 0}]
    # Nothing was submitted by the anonymous caller.
    events = asyncio.run(_events_as_admin(d))
    assert [e for e in events if isinstance(e, TaskSubmitted)] == []


async def _events_as_admin(d: DaemonProc) -> list:  # type: ignore[type-arg]
    creds = read_credentials(d.data_dir)
    assert creds is not None
    return await stream_events(with_user(redact(_nats_url(d)), "admin", creds.admin))


def test_no_secret_of_a_task_reaches_what_the_reader_may_follow(tmp_dir: Path, daemons) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProc(tmp_dir / "data", None).start()
    daemons.append(d)
    secret = "stdin-secret-4f1c"
    spec = _spec(
        # The task gets every secret (and neither names nor prints one: it checks digests).
        f'read line; [ "$(printf %s "$line$TOKEN$(cat /workspace/key)" | md5sum | cut -c1-32)" '
        f"= {_md5(secret + 'env-secret-77' + 'file-secret-9a')} ] && echo all-there",
        stdin=secret + "\n",
        env={"TOKEN": "env-secret-77"},
        files={"key": "file-secret-9a"},
    )

    async def scenario() -> tuple[list[bytes], list[str]]:
        reader = await _as(d, "reader")
        seen: list[bytes] = []

        async def keep(msg) -> None:  # type: ignore[no-untyped-def]
            seen.append(msg.data)

        await reader.subscribe("sup.>", cb=keep)
        errors: list[str] = []
        for subject in ("_INBOX.>", "_INBOX_node.>", "suptask.>"):
            try:
                await reader.subscribe(subject, cb=keep)
            except nats.errors.Error as e:
                errors.append(str(e))
        await reader.flush()
        async with AsyncClient(d.base_url, token=d.token) as c:
            result = await c.run(spec, timeout_s=60)
        assert (result.status, result.stdout) == ("succeeded", "all-there\n")
        await asyncio.sleep(0.5)
        await reader.close()
        return seen, errors

    seen, _ = asyncio.run(scenario())

    assert seen, "the reader saw the task's events"
    everything = b"".join(seen)
    for word in (secret, "env-secret-77", "file-secret-9a"):
        assert word.encode() not in everything
    submitted = [e for e in asyncio.run(_events_as_admin(d)) if isinstance(e, TaskSubmitted)]
    assert len(submitted) == 1 and submitted[0].spec.stdin is not None
    assert submitted[0].spec.stdin.startswith("sha256:")
    assert submitted[0].spec.env["TOKEN"].startswith("sha256:")


def test_the_daemon_refuses_a_history_that_could_be_erased(tmp_dir: Path, nats_url: str) -> None:
    async def unprotected() -> None:
        nc = await nats.connect(nats_url)
        await nc.jetstream().add_stream(StreamConfig(name=EVENTS_STREAM, subjects=["sup.>"]))
        await nc.close()

    asyncio.run(unprotected())
    d = DaemonProc(tmp_dir / "data", nats_url)
    with pytest.raises(AssertionError, match="history is not protected: SUP_EVENTS allows deletes"):
        d.start(timeout=30)
    assert d.wait(30) != 0


def test_audit_calls_an_erased_history_a_violation(tmp_dir: Path, daemons) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProc(tmp_dir / "data", None).start()
    daemons.append(d)
    with d.client() as c:
        results = [c.run(_spec(f"echo {i}"), timeout_s=60) for i in range(3)]
    # The last task's removals follow its end: the stream is quiet once they are in.
    creds = read_credentials(d.data_dir)
    assert creds is not None
    url = with_user(redact(_nats_url(d)), "node", creds.node)
    last = results[-1].task_id
    wait_until(
        lambda: len(asyncio.run(stream_events(url, f"sup.cleanup.succeeded.*.{last}"))) == 2,
        what="the last task's removals",
    )

    async def erase() -> tuple[int, int]:
        admin = await _as(d, "admin")
        js = admin.jetstream()
        cfg = (await js.stream_info(EVENTS_STREAM)).config
        await js.update_stream(_with(cfg, 3))
        await js.update_stream(_with(cfg, -1))
        state = (await js.stream_info(EVENTS_STREAM)).state
        await admin.close()
        return int(state.first_seq), int(state.messages)

    first, left = asyncio.run(erase())
    audit = _cli(d, "audit", "--json")

    assert (first > 1, left) == (True, 3)
    assert audit.returncode == 1, audit.stderr
    doc = json.loads(audit.stdout)
    erased = [v for v in doc["violations"] if v["rule"] == "history_erased"]
    assert [v["seqs"] for v in erased] == [[first]]
    assert "no retention limit in force explains it" in erased[0]["detail"]


def _with(cfg: StreamConfig, max_msgs: int) -> StreamConfig:
    from dataclasses import replace

    return replace(cfg, max_msgs=max_msgs)


def test_a_consumer_the_daemon_needs_is_made_again_and_readiness_says_so(
    tmp_dir: Path, daemons
) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProc(tmp_dir / "data", None).start()
    daemons.append(d)

    async def delete() -> None:
        admin = await _as(d, "admin")
        await admin.jetstream().delete_consumer(TASKS_STREAM, "exec-low")
        await admin.close()

    asyncio.run(delete())
    wait_until(
        lambda: json.loads(d.get("/readyz")[1])["checks"]["consumers"]["ok"],
        what="the consumer to be made again",
        timeout=30,
    )
    with d.client() as c:
        result = c.run(_spec("echo low", priority="low"), timeout_s=60)

    assert (result.status, result.stdout) == ("succeeded", "low\n")
    assert "the exec-low consumer is missing; making it again" in d.log()


def test_a_command_never_removes_the_workspace_of_a_running_attempt(tmp_dir: Path, daemons) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProc(tmp_dir / "data", None).start()
    daemons.append(d)
    with d.client() as c:
        sub = c.submit(_spec("sleep 3; cat /workspace/data.txt", files={"data.txt": "kept\n"}))
        creds = read_credentials(d.data_dir)
        assert creds is not None
        url = with_user(redact(_nats_url(d)), "node", creds.node)
        found: list[str] = []

        def made() -> bool:  # the attempt's own (a warm pool parks others beside it)
            subject = f"sup.workspace.created.*.{sub.task_id}"
            found[:] = [e.path for e in asyncio.run(stream_events(url, subject))]  # type: ignore[attr-defined]
            return bool(found)

        wait_until(made, what="the workspace")
        workspace = Path(found[0])

        async def forge() -> None:
            node = await _as(d, "node")
            command = CleanupCommand(
                command_id="forged-1",
                node_id="n1",
                action="remove_workspace",
                resource_kind="workspace",
                resource=str(workspace),
                task_id=sub.task_id,
                attempt=1,
                rule="orphan_workspace",
                decision_id="forged",
                issued_at=datetime.now(UTC),
            )
            await node.jetstream().publish(command.subject(), encode_command(command))
            await node.close()

        asyncio.run(forge())
        view = c.wait(sub.task_id, timeout_s=60)

    assert view.result is not None
    assert (view.outcome, view.result.stdout) == ("succeeded", "kept\n")
