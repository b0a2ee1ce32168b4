"""Callbacks: a task's Result POSTed, signed, to the URL its spec names, only where the
configuration allows, retried with backoff, every delivery an event, across a daemon
restart. Against a real daemon, nats-server, dockerd and a real HTTP receiver on
loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from schemas import CallbackAttempted, Result, RetryPolicy, TaskSpec, TaskSucceeded
from schemas.config import CallbacksConfig
from schemas.errors import ConfigError
from schemas.http import CallbackBody
from supervisor.delivery.signing import callback_secret, delay_after, signature, verify
from supervisor.eventlog.emitter import new_id, utcnow
from testing.daemon import DaemonProc, task, wait_until
from testing.deploy import exposed, referenced_metrics
from testing.receiver import Receiver
from testing.stream import publish_event, stream_events

SECRET = "s3cret-for-tests"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _attempts(nats_url: str, task_id: str) -> list[CallbackAttempted]:
    events = asyncio.run(stream_events(nats_url, f"sup.callback.attempted.*.{task_id}"))
    return [e for e in events if isinstance(e, CallbackAttempted)]


@pytest.mark.docker
@pytest.mark.nats
def test_a_result_is_delivered_signed_after_failures_and_a_restart(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc], receiver: Receiver
) -> None:
    receiver.answers["/hooks/flaky"] = [500, 503, 200]
    receiver.answers["/hooks/down"] = [500]
    config = {
        "callbacks": {
            "allowed": [f"{receiver.url}/hooks/"],
            "secret": SECRET,
            "base_delay_s": 2.0,
            "max_attempts": 3,
        }
    }
    d = DaemonProc(tmp_dir / "data", nats_url, config=config)
    daemons.append(d)
    d.start()
    # A forged terminal event naming a callback, for a task never submitted: never called.
    forged = TaskSucceeded(
        event_id=new_id(),
        occurred_at=utcnow(),
        node_id="n1",
        instance_id="intruder",
        task_id="cb-forged",
        result=Result(task_id="cb-forged", status="succeeded", attempts=1),
        callback_url=f"{receiver.url}/hooks/forged",
    )
    asyncio.run(publish_event(nats_url, forged))
    with d.client() as c:
        c.submit(c_spec := _spec("echo delivered", "cb-flaky", f"{receiver.url}/hooks/flaky"))
        c.submit(_spec("exit 3", "cb-down", f"{receiver.url}/hooks/down"))
        assert c_spec.task_id == "cb-flaky"
        wait_until(lambda: len(_attempts(nats_url, "cb-flaky")) >= 1, 60, "the first delivery")
        d.stop()  # the next delivery is due in about 2 s: it must come from the next daemon
        first_stop = time.time()
        d.start()
        wait_until(
            lambda: any(a.outcome == "delivered" for a in _attempts(nats_url, "cb-flaky")),
            60,
            "the delivery to succeed",
        )
        wait_until(
            lambda: any(a.outcome == "gave_up" for a in _attempts(nats_url, "cb-down")),
            60,
            "the failing receiver to be given up",
        )
        view = c.get("cb-flaky")
    time.sleep(1.0)  # nothing more comes

    flaky = receiver.on("/hooks/flaky")
    assert [r.headers["X-Supervisor-Delivery"] for r in flaky] == ["1", "2", "3"]
    assert any(r.at > first_stop for r in flaky)
    bodies = {r.body for r in flaky}
    assert len(bodies) == 1
    body = msgspec.json.decode(bodies.pop(), type=CallbackBody)
    assert (body.task_id, body.event, body.result.stdout) == (
        "cb-flaky",
        "task.succeeded",
        "delivered\n",
    )
    assert view.result is not None and body.result == view.result
    for r in flaky:
        assert verify(SECRET.encode(), r.headers, r.body, time.time())
        assert r.headers["X-Supervisor-Event-Id"] == body.event_id
        assert not verify(b"another key", r.headers, r.body, time.time())
    attempts = _attempts(nats_url, "cb-flaky")
    assert [(a.delivery, a.outcome, a.status) for a in attempts] == [
        (1, "retrying", 500),
        (2, "retrying", 503),
        (3, "delivered", 200),
    ]
    assert all(a.terminal_event_id == body.event_id for a in attempts)
    assert attempts[0].next_delay_s is not None and 1.5 <= attempts[0].next_delay_s <= 2.0

    down = _attempts(nats_url, "cb-down")
    assert [(a.delivery, a.outcome) for a in down] == [
        (1, "retrying"),
        (2, "retrying"),
        (3, "gave_up"),
    ]
    assert len(receiver.on("/hooks/down")) == 3
    assert receiver.on("/hooks/forged") == []
    metrics = d.get("/metrics")[1].decode()
    assert 'supervisor_callback_deliveries_total{outcome="delivered"} 1.0' in metrics
    # This daemon runs every part (projection, reconciler, callbacks): every series the
    # shipped alert rules and dashboard query exists.
    assert referenced_metrics() - exposed(metrics) == set()


def _spec(script: str, task_id: str, url: str) -> TaskSpec:
    return msgspec.structs.replace(
        msgspec.convert(task(script), TaskSpec),
        task_id=task_id,
        callback_url=url,
        retry=RetryPolicy(max_attempts=1),
    )


@pytest.mark.docker
@pytest.mark.nats
def test_a_callback_url_outside_the_allowed_list_is_refused(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc], receiver: Receiver
) -> None:
    """No server-side request forgery: nothing is allowed by default; with a list, only
    its prefixes, and never a dot segment or credentials."""
    d = DaemonProc(tmp_dir / "data", nats_url)
    daemons.append(d)
    d.start()
    status, body = d.request(
        "POST", "/v1/tasks", json.dumps(task("true", callback_url=f"{receiver.url}/x")).encode()
    )
    assert status == 403, body
    err = json.loads(body)["error"]
    assert (err["type"], err["code"]) == ("security", "POLICY_VIOLATION")
    assert "callback_url" in err["message"]
    d.stop()
    d2 = DaemonProc(
        tmp_dir / "data2",
        nats_url,
        config={"callbacks": {"allowed": [f"{receiver.url}/hooks/"], "secret": SECRET}},
    )
    daemons.append(d2)
    d2.start()
    for url in (
        "http://169.254.169.254/latest/meta-data",
        f"{receiver.url}/admin",
        f"{receiver.url}/hooks/../admin",
        f"{receiver.url.replace('http://', 'http://user:pw@')}/hooks/a",
        f"{receiver.url.rsplit(':', 1)[0]}:1/hooks/a",
    ):
        status, body = d2.request(
            "POST", "/v1/tasks", json.dumps(task("true", callback_url=url)).encode()
        )
        assert status == 403, (url, body)
        assert "callback_url" in json.loads(body)["error"]["message"]
    assert receiver.received == []


@pytest.mark.docker
@pytest.mark.nats
def test_a_destination_no_longer_allowed_is_given_up_not_called(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc], receiver: Receiver
) -> None:
    """The allowed list is checked again at each delivery: after a restart with a list that
    no longer names the destination, the pending delivery is given up without a request."""
    receiver.answers["/hooks/a"] = [500]
    callbacks = {"secret": SECRET, "base_delay_s": 2.0, "max_attempts": 5}
    d = DaemonProc(
        tmp_dir / "data",
        nats_url,
        config={"callbacks": {**callbacks, "allowed": [f"{receiver.url}/hooks/"]}},
    )
    daemons.append(d)
    d.start()
    with d.client() as c:
        c.submit(_spec("true", "cb-moved", f"{receiver.url}/hooks/a"))
    wait_until(lambda: len(_attempts(nats_url, "cb-moved")) >= 1, 60, "the first delivery")
    d.stop()
    d2 = DaemonProc(
        tmp_dir / "data",
        nats_url,
        config={"callbacks": {**callbacks, "allowed": [f"{receiver.url}/elsewhere/"]}},
    )
    daemons.append(d2)
    d2.start()
    wait_until(
        lambda: any(a.outcome == "gave_up" for a in _attempts(nats_url, "cb-moved")),
        60,
        "the delivery to be given up",
    )
    attempts = _attempts(nats_url, "cb-moved")
    assert [(a.delivery, a.outcome, a.status) for a in attempts] == [
        (1, "retrying", 500),
        (2, "gave_up", None),
    ]
    assert attempts[1].error is not None and "not under an allowed" in attempts[1].error
    assert len(receiver.on("/hooks/a")) == 1


def test_signatures_backoff_and_the_secret() -> None:
    body = b'{"x": 1}'
    sig = signature(b"k", 1_700_000_000, body)
    headers = {"X-Supervisor-Signature": sig, "X-Supervisor-Timestamp": "1700000000"}
    assert verify(b"k", headers, body, 1_700_000_100)
    assert not verify(b"k", headers, body + b" ", 1_700_000_100)  # the body changed
    assert not verify(b"k", headers, body, 1_700_001_000)  # too old: a replay
    cfg = CallbacksConfig(base_delay_s=1, max_delay_s=5)
    assert [delay_after(cfg, n, lambda: 0.0) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 5, 5]
    assert delay_after(cfg, 3, lambda: 1.0) == 3.0
    with pytest.raises(ConfigError, match="secret"):
        callback_secret(CallbacksConfig(allowed=["http://127.0.0.1:1/"]))
    assert callback_secret(CallbacksConfig(secret="a")) == b"a"
