"""Retention of `SUP_EVENTS` (`[events] max_age`, `max_bytes`) against a real nats-server:
the limits reach the stream and a client without them keeps them; `replay` and `audit`
say plainly when the history starts after sequence 1, and the audit skips (and counts)
the tasks whose start was removed instead of reporting them as broken."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from projections.audit import audit_records, history_start, records_of
from schemas.connection import connect_options
from schemas.streams import EVENTS_STREAM
from supervisor.eventlog.nats_client import ensure_streams
from supervisor.eventlog.streams import events_stream_config
from testing.synthetic import HistoryBuilder

pytestmark = [pytest.mark.nats]


def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args], input=stdin, capture_output=True, timeout=120
    )


async def _stream(url: str) -> tuple[float | None, int | None, int]:
    nc = await nats.connect(**connect_options(url))
    try:
        info = await nc.jetstream().stream_info(EVENTS_STREAM)
        return info.config.max_age, info.config.max_bytes, info.state.first_seq
    finally:
        await nc.close()


@pytest.mark.docker
def test_old_events_expire_and_replay_and_audit_say_so(tmp_dir: Path, nats_url: str) -> None:
    config = tmp_dir / "config.json"
    config.write_text(json.dumps({"events": {"max_age": "4s", "max_bytes": 50_000_000}}))
    common = ("--nats", nats_url, "--data-dir", str(tmp_dir / "data"), "--config", str(config))
    spec = {"image": "supervisor-sandbox:busybox", "command": ["sleep", "6"], "task_id": "long"}
    run = _cli("run", "-", *common, stdin=json.dumps(spec).encode())
    assert run.returncode == 0, run.stderr
    max_age, max_bytes, _ = asyncio.run(_stream(nats_url))
    assert (max_age, max_bytes) == (4.0, 50_000_000)

    # A client without [events] (here the stream's plain configuration) keeps the limits.
    async def plain_client() -> None:
        nc = await nats.connect(**connect_options(nats_url))
        try:
            await ensure_streams(nc.jetstream(), [events_stream_config()])
        finally:
            await nc.close()

    asyncio.run(plain_client())
    assert asyncio.run(_stream(nats_url))[:2] == (4.0, 50_000_000)

    # The task's first events (6 s old) are gone; its last ones are not.
    deadline = time.monotonic() + 10
    while asyncio.run(_stream(nats_url))[2] <= 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    first = asyncio.run(_stream(nats_url))[2]
    assert first > 1

    db = tmp_dir / "replayed.duckdb"
    replay = _cli("replay", "--db", str(db), "--nats", nats_url)
    assert replay.returncode == 0, replay.stderr
    assert b"the history starts at seq" in replay.stderr and b"not 1" in replay.stderr

    audit = _cli("audit", "--db", str(db), "--json")
    assert audit.returncode == 0, (audit.stdout, audit.stderr)
    doc = json.loads(audit.stdout)
    assert doc["count"] == 0
    assert doc["history_starts_at"] >= first
    assert doc["skipped_tasks"] == 1
    assert b"1 task(s) whose start was removed are not audited" in audit.stderr


def test_the_audit_skips_only_tasks_whose_start_is_missing() -> None:
    """Pure: cut a history of two tasks in the middle of the first one; without the skip
    the first would be reported (an attempt finished that never started)."""
    b = HistoryBuilder()
    b.run_task("cut-a")
    b.run_task("cut-b")
    records = records_of(b.events, first_seq=1)
    cut = records[3:]  # cut-a lost its submission and its attempt's start
    start = history_start(cut)
    assert (start.first_seq, start.partial_tasks) == (4, frozenset({"cut-a"}))
    assert audit_records(cut, skip=start.partial_tasks) == []
    assert audit_records(cut) != []
    whole = history_start(records)
    assert (whole.first_seq, whole.partial_tasks, whole.note()) == (1, frozenset(), None)
