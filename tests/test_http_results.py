"""A task's Result over HTTP, from a real daemon: `GET /v1/tasks/{id}` carries the Result
of the terminal event the projection applied, and `?wait=S` holds the request until the
task has ended or S seconds passed."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas import Limits, RetryPolicy, TaskSpec
from schemas.errors import ApiError
from schemas.http import Submitted
from schemas.openapi import document
from supervisor.client import AsyncClient
from testing.daemon import DaemonProc, running_task_container, task, wait_until
from testing.openapi import check_answer
from testing.stream import stream_events

pytestmark = [pytest.mark.docker, pytest.mark.nats]


def _spec(script: str, **extra: Any) -> TaskSpec:
    return msgspec.structs.replace(msgspec.convert(task(script), TaskSpec), **extra)


def _post(d: DaemonProc, spec: dict[str, object]) -> None:
    status, body = d.request("POST", "/v1/tasks", json.dumps(spec).encode())
    assert status in (200, 202), body


def test_a_task_s_result_is_served_and_wait_holds_until_it_ends(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc]
) -> None:
    d = DaemonProc(tmp_dir / "data", nats_url, {"pool": {}})
    daemons.append(d)
    d.start()
    with d.client() as c:
        ok = c.submit(_spec("sleep 1; echo out; echo err >&2", task_id="res-ok"))
        assert (ok.task_id, ok.status) == ("res-ok", "queued")
        c.submit(_spec("echo no; exit 4", task_id="res-bad", retry=RetryPolicy(max_attempts=1)))

        view = c.wait("res-ok", timeout_s=60)
        assert (view.state, view.exit_code) == ("succeeded", 0)
        result = view.result
        assert result is not None
        assert (result.task_id, result.status, result.attempts) == ("res-ok", "succeeded", 1)
        assert (result.exit_code, result.stdout, result.stderr) == (0, "out\n", "err\n")
        assert result.error is None
        assert result.cpu_time_s is not None and result.peak_memory_bytes is not None
        status, body = d.get("/openapi.json")
        # The daemon's own document: its origin, its token required (made at its start).
        served = document(server=d.base_url, token_required=True)
        assert (status, json.loads(body)) == (200, served)
        assert {k: v for k, v in served.items() if k not in ("servers", "security")} == {
            k: v for k, v in document().items() if k not in ("servers", "security")
        }
    # The report reads the live projection through the daemon too.
    out = tmp_dir / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "report", "--url", d.base_url, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SUPERVISOR_HTTP_TOKEN": d.token or ""},
    )
    assert done.returncode == 0, done.stderr
    assert int(re.search(r'data-k="tasks">(\d+)<', out.read_text()).group(1)) >= 1  # type: ignore[union-attr]
    with d.client() as c:
        bad = c.wait("res-bad", timeout_s=60)
        assert bad.state == "failed" and bad.result is not None
        assert (bad.result.status, bad.result.exit_code) == ("failed", 4)
        assert bad.result.error is not None
        assert (bad.result.error.type, bad.result.error.code) == ("user_code", "NONZERO_EXIT")


def test_a_waiting_request_is_answered_by_the_batch_that_applies_the_end(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc]
) -> None:
    """With batches that may wait 8 s for their age and their writer's rest, a task's
    end is still answered at once: the batch holding a terminal event is applied as soon
    as the writer is free, and it wakes the waiting request."""
    slow = {"batch_age_s": 8.0, "rest_lag_s": 8.0}
    d = DaemonProc(tmp_dir / "data", nats_url, {"projection": slow})
    daemons.append(d)
    d.start()
    with d.client() as c:
        c.run(_spec("true", task_id="warm"), timeout_s=60)  # the image, the consumers
        t0 = time.monotonic()
        sub = c.submit(_spec("echo fast", task_id="fast"))
        view = c.get(sub.task_id, wait_s=60)
        took = time.monotonic() - t0
    assert view.result is not None and view.result.stdout == "fast\n", view
    assert took < 6.0, took  # not the 8 s a batch could otherwise wait


def test_the_async_client_runs_judge_specs_and_follows_errors(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc]
) -> None:
    """Standard input, a CPU-time limit and binary files over HTTP, with `AsyncClient`;
    `errors` follows the error raised meanwhile."""
    d = DaemonProc(tmp_dir / "data", nats_url, {"pool": {}})
    daemons.append(d)
    d.start()

    async def main() -> None:
        async with AsyncClient(
            d.base_url, token=d.token, timeout_s=30, on_answer=check_answer
        ) as c:
            follow = c.errors(code="CPU_TIME_EXCEEDED", limit=1)
            first_error = asyncio.ensure_future(anext(follow))
            echo = await c.run(
                _spec(
                    "tr a-z A-Z; od -An -tx1 /workspace/b",
                    stdin="judge\n",
                    files_base64={"b": base64.b64encode(b"\x00\xfe").decode()},
                ),
                timeout_s=60,
            )
            assert echo.stdout.split() == ["JUDGE", "00", "fe"]
            spin = await c.run(
                _spec("while :; do :; done", limits=Limits(cpu_time_s=0.3, timeout_s=30)),
                timeout_s=60,
            )
            assert spin.error is not None and spin.error.code == "CPU_TIME_EXCEEDED"
            event = await asyncio.wait_for(first_error, 30)
            assert (event.task_id, event.error_type) == (spin.task_id, "timeout")
            await follow.aclose()  # type: ignore[attr-defined]
            answers = await c.submit_many([_spec("true", task_id="many-1"), _spec("", image="")])
            assert isinstance(answers[0], Submitted) and answers[0].status == "queued"
            assert isinstance(answers[1], ApiError) and answers[1].status == 400
            assert (answers[1].type, answers[1].code) == ("validation", "INVALID_SPEC")
            assert (await c.wait("many-1", timeout_s=60)).outcome == "succeeded"
            page = await c.list_tasks(limit=1000)
            assert {"many-1", spin.task_id, echo.task_id} <= {t.task_id for t in page.tasks}

    asyncio.run(main())


def test_wait_gives_up_after_its_seconds_and_refuses_nonsense(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc]
) -> None:
    # The task is still running at the end: a short grace, and the daemon stops at once.
    d = DaemonProc(tmp_dir / "data", nats_url, {"pool": {}, "scheduling": {"shutdown_grace_s": 1}})
    daemons.append(d)
    d.start()
    _post(d, task("sleep 20", task_id="res-long"))

    started = time.monotonic()
    status, body = d.get("/v1/tasks/res-long?wait=1.5")
    waited = time.monotonic() - started
    assert status in (200, 404), body  # known once the projection has its submission
    assert 1.5 <= waited < 10
    if status == 200:
        doc = json.loads(body)
        assert doc["outcome"] is None and doc["result"] is None
    status, body = d.get("/v1/tasks/never-submitted?wait=0.3")
    assert status == 404 and json.loads(body)["error"]["code"] == "TASK_NOT_FOUND"
    for bad in ("-1", "nan", "abc", "301"):
        status, body = d.get(f"/v1/tasks/res-long?wait={bad}")
        assert status == 400, bad
        assert json.loads(body)["error"]["code"] == "INVALID_QUERY"


def test_a_batch_answers_each_spec_as_a_single_submission_would(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc]
) -> None:
    d = DaemonProc(tmp_dir / "data", nats_url, config={"http": {"max_batch": 3}})
    daemons.append(d)
    d.start()
    specs = [
        task("echo one", task_id="batch-1", correlation_id="judge-7"),
        {"image": "supervisor-sandbox:busybox"},  # no command
        task("echo two", task_id="batch-2", privileged=True),
    ]
    status, body = d.request("POST", "/v1/tasks/batch", json.dumps({"tasks": specs}).encode())
    assert status == 200, body
    results = json.loads(body)["results"]
    assert [r["status"] for r in results] == [202, 400, 403]
    assert results[0]["body"] == {
        "task_id": "batch-1",
        "correlation_id": "judge-7",
        "status": "queued",
    }
    assert results[1]["body"]["error"]["code"] == "INVALID_SPEC"
    assert results[2]["body"]["error"]["code"] == "POLICY_VIOLATION"

    again = d.request("POST", "/v1/tasks/batch", json.dumps({"tasks": specs[:1]}).encode())
    assert json.loads(again[1])["results"][0] == {
        "status": 200,
        "body": {"task_id": "batch-1", "correlation_id": "judge-7", "status": "known"},
    }
    status, body = d.request("POST", "/v1/tasks/batch", json.dumps({"tasks": specs * 2}).encode())
    assert status == 413 and json.loads(body)["error"]["code"] == "BATCH_TOO_LARGE"
    for bad in (b"[]", b'{"tasks": []}', b'{"tasks": {}}', b"not json", b'{"tasks": [{}], "x": 1}'):
        status, body = d.request("POST", "/v1/tasks/batch", bad)
        assert status == 400, bad
        assert json.loads(body)["error"]["code"] == "INVALID_SPEC"
    doc = json.loads(d.get("/v1/tasks/batch-1?wait=25")[1])
    assert doc["result"]["stdout"] == "one\n"


def test_tasks_are_listed_by_filter_a_page_at_a_time(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc]
) -> None:
    d = DaemonProc(tmp_dir / "data", nats_url, {"pool": {}})
    daemons.append(d)
    d.start()
    for i in range(5):
        _post(
            d,
            task(
                "true" if i % 2 == 0 else "exit 1",
                task_id=f"list-{i}",
                correlation_id="run-9",
                retry={"max_attempts": 1},
            ),
        )
    _post(d, task("true", task_id="list-other", correlation_id="run-10"))
    for t in (*(f"list-{i}" for i in range(5)), "list-other"):
        assert json.loads(d.get(f"/v1/tasks/{t}?wait=25")[1])["outcome"] is not None

    def page(query: str) -> dict[str, Any]:
        status, body = d.get(f"/v1/tasks?{query}")
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]

    first = page("correlation_id=run-9&limit=2")
    assert [t["task_id"] for t in first["tasks"]] == ["list-0", "list-1"]
    second = page(f"correlation_id=run-9&limit=2&cursor={first['next_cursor']}")
    third = page(f"correlation_id=run-9&limit=2&cursor={second['next_cursor']}")
    assert [t["task_id"] for t in second["tasks"]] == ["list-2", "list-3"]
    assert [t["task_id"] for t in third["tasks"]] == ["list-4"]
    assert third["next_cursor"] is None
    failed = page("correlation_id=run-9&outcome=failed")
    assert [(t["task_id"], t["exit_code"]) for t in failed["tasks"]] == [
        ("list-1", 1),
        ("list-3", 1),
    ]
    assert [
        t["task_id"] for t in page("since=1h&state=succeeded&correlation_id=run-10")["tasks"]
    ] == ["list-other"]
    assert page("since=2999-01-01T00:00:00Z")["tasks"] == []
    for bad in (
        "state=done",
        "outcome=ok",
        "limit=0",
        "limit=1001",
        "cursor=-3",
        "since=soon",
        "colour=red",
    ):
        status, body = d.get(f"/v1/tasks?{bad}")
        assert status == 400, bad
        assert json.loads(body)["error"]["code"] == "QUERY_REFUSED", (bad, body)


def _history(nats_url: str, task_id: str) -> list[str]:
    return [
        str(type(e).__struct_config__.tag)
        for e in asyncio.run(stream_events(nats_url, f"sup.*.*.*.{task_id}"))
    ]  # type: ignore[attr-defined]


def test_a_running_task_is_cancelled_once_and_leaves_nothing(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc], docker_client: Any
) -> None:
    d = DaemonProc(tmp_dir / "data", nats_url, {"pool": {}})
    daemons.append(d)
    d.start()
    _post(d, task("sleep 60", task_id="cancel-run"))
    cid = running_task_container(docker_client, nats_url, "cancel-run")

    status, body = d.request("DELETE", "/v1/tasks/cancel-run")
    assert (status, json.loads(body)) == (202, {"task_id": "cancel-run", "status": "cancelling"})
    doc = json.loads(d.get("/v1/tasks/cancel-run?wait=25")[1])
    assert (doc["state"], doc["error_type"], doc["error_code"]) == (
        "failed",
        "infrastructure",
        "CANCELLED",
    )
    assert (doc["result"]["status"], doc["result"]["attempts"]) == ("failed", 1)
    history = _history(nats_url, "cancel-run")
    assert history.count("task.cancel_requested") == 1
    assert [t for t in history if t in ("task.succeeded", "task.failed", "task.rejected")] == [
        "task.failed"
    ]
    assert "task.retry_scheduled" not in history
    kills = [
        e.reason  # type: ignore[attr-defined]
        for e in asyncio.run(stream_events(nats_url, "sup.container.kill_issued.*.cancel-run"))
    ]
    assert kills == ["cancelled"]
    wait_until(
        lambda: not docker_client.containers.list(all=True, sparse=True, filters={"id": cid}),
        30,
        "its container to be removed",
    )
    status, body = d.request("DELETE", "/v1/tasks/cancel-run")
    assert status == 409 and json.loads(body)["error"]["code"] == "TASK_ENDED", body
    status, body = d.request("DELETE", "/v1/tasks/never-was")
    assert status == 404 and json.loads(body)["error"]["code"] == "TASK_NOT_FOUND", body


def test_a_queued_task_is_withdrawn_before_it_runs(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc], docker_client: Any
) -> None:
    d = DaemonProc(tmp_dir / "data", nats_url, config={"scheduling": {"concurrency": 1}})
    daemons.append(d)
    d.start()
    _post(d, task("sleep 4", task_id="cancel-first"))
    running_task_container(docker_client, nats_url, "cancel-first")
    _post(d, task("echo never", task_id="cancel-queued"))

    status, _ = d.request("DELETE", "/v1/tasks/cancel-queued")
    assert status == 202
    again, _ = d.request("DELETE", "/v1/tasks/cancel-queued")  # asked twice: recorded once
    assert again == 202
    doc = json.loads(d.get("/v1/tasks/cancel-queued?wait=25")[1])
    assert (doc["state"], doc["error_code"], doc["attempts"]) == ("failed", "CANCELLED", 0)
    assert doc["result"]["stdout"] == ""
    history = _history(nats_url, "cancel-queued")
    assert "attempt.started" not in history
    assert history.count("task.cancel_requested") == 1 and history.count("task.failed") == 1
    first = json.loads(d.get("/v1/tasks/cancel-first?wait=25")[1])
    assert first["outcome"] == "succeeded"
