"""Events no other node can forge. Each node signs what it publishes with its own NKey
(`schemas.streams.EventSigner`); the projection, the audit and a waiting client count an end
only when its node signed it (`schemas.lifecycle.Keyring`). Judged by effect: the task's
row, `terminal_conflicts`, `node_keys`, the audit's report and the answer a client gets.
The projection's judgement on a real DuckDB file; the attacks on a real daemon with its
embedded, credentialed nats-server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from projections.store.store import ProjectionStore
from projections.stream.decode import decode_batch, stage
from schemas import (
    AttemptStarted,
    Event,
    Result,
    SupervisorStarted,
    TaskSpec,
    TaskSubmitted,
    TaskSucceeded,
    encode_event,
)
from schemas.config import load_config
from schemas.connection import connect_options
from schemas.http import CallbackBody
from schemas.lifecycle import Keyring
from schemas.streams import EventSigner, new_seed, payload_signer
from supervisor.eventlog.nats_auth import read_credentials, redact, with_user
from testing.daemon import DaemonProc, task, wait_until
from testing.receiver import Receiver
from testing.stream import stream_events
from tests.conftest import projection_services
from tests.test_projections import query

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
OWNER, OTHER = EventSigner(new_seed()), EventSigner(new_seed())


def _ev(cls: type, n: int, node: str = "n1", instance: str = "i1", **kw: Any) -> Any:
    return cls(
        event_id=f"s-{n}",
        occurred_at=T0 + timedelta(milliseconds=n),
        node_id=node,
        instance_id=instance,
        task_id=kw.pop("task_id", "t-1"),
        **kw,
    )


def _end(n: int, exit_code: int, **kw: Any) -> TaskSucceeded | Any:
    result = Result(task_id="t-1", status="succeeded", attempts=1, exit_code=exit_code)
    return _ev(TaskSucceeded, n, attempt=1, result=result, **kw)


def _history() -> list[Event]:
    spec = TaskSpec(image="supervisor-sandbox:busybox", command=["true"], task_id="t-1")
    return [
        _ev(SupervisorStarted, 1, task_id="", role="serve", pid=1),
        _ev(TaskSubmitted, 2, spec=spec),
        _ev(AttemptStarted, 3, attempt=1),
    ]


def _apply(store: ProjectionStore, first: int, payloads: list[tuple[Event, bytes]]) -> None:
    seqs = list(range(first, first + len(payloads)))
    subjects = [e.subject() for e, _ in payloads]
    datas = [data for _, data in payloads]
    store.apply(stage(decode_batch(seqs, subjects, [0] * len(seqs), datas)))


def test_a_signature_covers_the_whole_event_and_readers_that_ignore_it_see_the_event() -> None:
    end = _end(4, 0)
    signed = OWNER.sign(encode_event(end))
    assert payload_signer(signed) == OWNER.public_key
    assert payload_signer(encode_event(end)) is None
    assert payload_signer(signed.replace(b'"exit_code":0', b'"exit_code":1')) == ""
    # Another key's name over the owner's signature: not its signature.
    assert (
        payload_signer(signed.replace(OWNER.public_key.encode(), OTHER.public_key.encode())) == ""
    )
    decoded = msgspec.json.decode(signed)
    assert decoded["sig"].startswith(OWNER.public_key + ".")
    from schemas import decode_event

    assert decode_event(signed) == end  # a reader that ignores the member


@pytest.mark.parametrize("fold_max", [100, 0], ids=["folded", "merged"])
def test_the_projection_counts_only_the_end_its_node_signed(tmp_dir: Path, fold_max: int) -> None:
    """Both ways a batch is applied: folded in Python (live) and merged in SQL (replay)."""
    db = tmp_dir / "p.duckdb"
    boot, *rest = _history()
    forged_unsigned = _end(4, 10)
    forged_other = _ev(TaskSucceeded, 5, attempt=1, result=_end(5, 11).result)
    altered = OWNER.sign(encode_event(_ev(TaskSucceeded, 6, attempt=1, result=_end(6, 0).result)))
    altered = altered.replace(b'"exit_code":0', b'"exit_code":12')
    real = _end(7, 0)
    with ProjectionStore(db, fold_max=fold_max) as store:
        _apply(store, 1, [(boot, OWNER.sign(encode_event(boot)))])
        _apply(store, 2, [(e, OWNER.sign(encode_event(e))) for e in rest])
        _apply(
            store,
            4,
            [
                (forged_unsigned, encode_event(forged_unsigned)),
                (forged_other, OTHER.sign(encode_event(forged_other))),
                (_end(6, 12), altered),
                (real, OWNER.sign(encode_event(real))),
            ],
        )
    assert query(db, "SELECT outcome, exit_code, finished_seq FROM tasks") == [("succeeded", 0, 7)]
    conflicts = "SELECT conflict_seq, reason FROM terminal_conflicts ORDER BY conflict_seq"
    assert query(db, conflicts) == [(4, "unsigned"), (5, "unknown_key"), (6, "bad_signature")]
    assert query(db, "SELECT node_id, public_key, pinned, first_seq FROM node_keys") == [
        ("n1", OWNER.public_key, False, 1)
    ]
    proofs = "SELECT seq, proof FROM events WHERE proof IS NOT NULL ORDER BY seq"
    assert query(db, proofs) == [
        (1, "signed"),
        (4, "unsigned"),
        (5, "unknown_key"),
        (6, "bad_signature"),
        (7, "signed"),
    ]

    # The key learned stays the node's when the file is opened again.
    later = _ev(TaskSucceeded, 8, attempt=1, result=_end(8, 0).result)
    with ProjectionStore(db, fold_max=fold_max) as store:
        _apply(store, 8, [(later, OTHER.sign(encode_event(later)))])
    assert query(db, "SELECT reason FROM terminal_conflicts WHERE conflict_seq = 8") == [
        ("unknown_key",)
    ]


def test_pinned_keys_decide_and_two_pins_carry_a_rotation(tmp_dir: Path) -> None:
    def outcome(db: Path, keyring: Keyring, signer: EventSigner) -> list[tuple[Any, ...]]:
        history = _history()
        with ProjectionStore(db, keyring=keyring) as store:
            _apply(store, 1, [(e, signer.sign(encode_event(e))) for e in [*history, _end(4, 0)]])
        return query(db, "SELECT outcome FROM tasks")

    # n1 pinned to OTHER: OWNER's signature is no longer n1's, even first.
    assert outcome(tmp_dir / "a.duckdb", Keyring({"n1": (OTHER.public_key,)}), OWNER) == [(None,)]
    assert query(tmp_dir / "a.duckdb", "SELECT pinned FROM node_keys") == [(True,)]
    rotation = Keyring({"n1": (OWNER.public_key, OTHER.public_key)})
    assert outcome(tmp_dir / "b.duckdb", rotation, OTHER) == [("succeeded",)]


def test_an_unsigned_history_counts_unless_signatures_are_required(tmp_dir: Path) -> None:
    plain = [(e, encode_event(e)) for e in [*_history(), _end(4, 0)]]
    with ProjectionStore(tmp_dir / "a.duckdb") as store:
        _apply(store, 1, plain)
    with ProjectionStore(tmp_dir / "b.duckdb", keyring=Keyring(required=True)) as store:
        _apply(store, 1, plain)
    assert query(tmp_dir / "a.duckdb", "SELECT outcome FROM tasks") == [("succeeded",)]
    assert query(tmp_dir / "b.duckdb", "SELECT outcome FROM tasks") == [(None,)]


def test_signing_config_is_checked_and_becomes_a_keyring(tmp_dir: Path) -> None:
    cfg = tmp_dir / "c.toml"
    cfg.write_text(f'[signing]\nrequired = true\nkeys = {{ n1 = ["{OWNER.public_key}"] }}\n')
    keyring = load_config(cfg).signing.keyring()
    assert (keyring.pinned, keyring.required) == ({"n1": (OWNER.public_key,)}, True)
    bad = tmp_dir / "bad.toml"
    bad.write_text('[signing]\nkeys = { n1 = ["not-a-key"] }\n')
    from schemas.errors import ConfigError

    with pytest.raises(ConfigError, match="not a public NKey"):
        load_config(bad)


# --- the attacks, on a real daemon --------------------------------------------------------


def _nats_url(d: DaemonProc, role: str) -> str:
    creds = read_credentials(d.data_dir)
    assert creds is not None
    url = (d.data_dir / "nats.url").read_text().strip()
    return with_user(redact(url), role, getattr(creds, role))


async def _forge(url: str, started: AttemptStarted, signer: EventSigner | None, n: int) -> None:
    """A `task.succeeded` of the running attempt copying its node and instance ids,
    published with the `node` credential every node of a fleet holds."""
    result = Result(task_id=started.task_id, status="succeeded", attempts=1, exit_code=0)
    forged = msgspec.structs.replace(
        _end(n, 0, task_id=started.task_id),
        node_id=started.node_id,
        instance_id=started.instance_id,
        correlation_id=started.correlation_id,
        result=msgspec.structs.replace(result, stdout="forged\n"),
        occurred_at=datetime.now(UTC),
        event_id=f"forged-{n}-{started.task_id}",
    )
    data = encode_event(forged)
    nc = await nats.connect(**connect_options(url), connect_timeout=5)
    try:
        await nc.jetstream().publish(
            forged.subject(),
            signer.sign(data) if signer is not None else data,
            headers={"Nats-Msg-Id": forged.event_id},
        )
    finally:
        await nc.close()


@pytest.mark.usefixtures("docker_client")
def test_an_end_forged_with_the_node_credential_is_kept_apart_and_reported(
    tmp_dir: Path,
    daemons,  # type: ignore[no-untyped-def]
) -> None:
    receiver = Receiver()
    hook = f"{receiver.url}/hooks/end"
    d = DaemonProc(tmp_dir / "data", None, {"callbacks": {"allowed": [hook], "secret": "x"}})
    daemons.append(d)
    d.start()
    node = _nats_url(d, "node")

    def running(script: str) -> tuple[str, AttemptStarted]:
        spec = msgspec.convert(task(script, callback_url=hook), TaskSpec)
        task_id = c.submit(spec).task_id
        subject = f"sup.attempt.started.*.{task_id}"
        wait_until(lambda: asyncio.run(stream_events(node, subject)), what="the attempt's start")
        started = asyncio.run(stream_events(node, subject))[0]
        assert isinstance(started, AttemptStarted)
        return task_id, started

    try:
        with d.client() as c:
            task_id, started = running("sleep 3; echo real")
            asyncio.run(_forge(node, started, None, 1))  # the node credential, no key
            asyncio.run(_forge(node, started, EventSigner(new_seed()), 2))  # another node's key
            view = c.wait(task_id, timeout_s=60)
            # A task with only a forged end has not ended: it can still be cancelled.
            other, started_other = running("sleep 60")
            asyncio.run(_forge(node, started_other, None, 3))
            cancelling = c.cancel(other)
            cancelled = c.wait(other, timeout_s=60)
            wait_until(lambda: len(receiver.on("/hooks/end")) >= 2, 30, "both callbacks")
            conflicts = "SELECT conflict_seq, reason, instance_id FROM terminal_conflicts"
            rows = c.query(f"{conflicts} WHERE task_id = '{task_id}'").rows
            keys = c.query("SELECT node_id, public_key, pinned FROM node_keys").rows
        time.sleep(1.0)  # no other callback comes
        posted = sorted(
            (b.task_id, b.result.status, b.result.stdout)
            for b in (
                msgspec.json.decode(r.body, type=CallbackBody) for r in receiver.on("/hooks/end")
            )
        )
    finally:
        receiver.close()
    audit = subprocess.run(
        [sys.executable, "-m", "supervisor", "audit", "--json", "--data-dir", str(d.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert view.result is not None and view.result.stdout == "real\n", view
    assert sorted(r[1] for r in rows) == ["unknown_key", "unsigned"]
    assert {r[2] for r in rows} == {started.instance_id}  # the copied id did not help
    assert cancelling.task_id == other
    assert cancelled.result is not None and cancelled.result.error is not None
    assert cancelled.result.error.code == "CANCELLED"
    # The callbacks carried the real ends only.
    assert posted == sorted([(task_id, "succeeded", "real\n"), (other, "failed", "")])
    own = EventSigner((d.data_dir / "signing.nk").read_bytes())
    assert keys == [[started.node_id, own.public_key, False]]
    assert audit.returncode == 1, audit.stderr
    found = [(v["rule"], v["task_id"]) for v in json.loads(audit.stdout)["violations"]]
    assert found == [("not_signed", task_id)] * 2 + [("not_signed", other)]


def test_a_node_pinned_to_a_key_it_does_not_hold_refuses_to_start(
    tmp_dir: Path,
    daemons,  # type: ignore[no-untyped-def]
) -> None:
    cfg = {"node_id": "n-pin", "signing": {"keys": {"n-pin": [OTHER.public_key]}}}
    d = DaemonProc(tmp_dir / "data", None, cfg)
    daemons.append(d)
    before = projection_services()
    with pytest.raises(AssertionError, match=r"pins node n-pin to .*its events would not count"):
        d.start(timeout=30)
    assert d.wait(30) != 0
    # The projection's interpreter, started before the node opened, ended with the daemon.
    wait_until(
        lambda: projection_services() <= before,
        timeout=10,
        what="the projection interpreter the daemon started to end",
    )
