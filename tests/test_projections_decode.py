"""The decoder and the pure pieces of the read side (no NATS, no DuckDB)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import msgspec
import pytest

from projections.errors import ProjectionError
from projections.serve.progress import render_bar
from projections.serve.projector import Progress, parse_reply, to_ns
from projections.store.machine import TASK_TARGET_STATE, TERMINAL_TASK_TYPES, sql_task_state_case
from projections.stream.decode import STAGING, decode_batch, stage, stage_raw
from projections.stream.worker import DecodePool
from schemas import encode_event
from testing.synthetic import AttemptPlan, HistoryBuilder, mixed_history


def _batch(payloads: list[bytes]):  # type: ignore[no-untyped-def]
    n = len(payloads)
    return decode_batch(list(range(1, n + 1)), [f"sup.s.{i}" for i in range(n)], [0] * n, payloads)


def test_each_refusal_has_its_reason() -> None:
    b = HistoryBuilder()
    b.submit("t-1")
    good = encode_event(b.events[0])
    doc = msgspec.json.decode(good)
    batch = _batch(
        [
            b"{nope",
            b"\xff",
            b"[]",
            b'{"event_id": "x"}',
            b'{"type": "resource.teleported", "event_id": "x"}',
            good.replace(b'"schema_version":1', b'"schema_version":7'),
            msgspec.json.encode({**doc, "attempt": "one", "event_id": "y"}),
            good,
        ]
    )
    assert [(d.seq, d.reason) for d in batch.dead] == [
        (1, "undecodable"),
        (2, "undecodable"),
        (3, "undecodable"),
        (4, "unknown_type"),
        (5, "unknown_type"),
        (6, "unsupported_schema_version"),
        (7, "invalid_event"),
    ]
    assert batch.dead[4].detail == "type 'resource.teleported' is not in the schemas"
    assert batch.dead[6].detail == "Expected `int`, got `str` - at `$.attempt`"
    assert [row[0] for row in batch.rows["batch"]] == [8]
    assert batch.last_seq == 8


def test_a_repeat_within_a_batch_is_dropped_and_counted() -> None:
    b = HistoryBuilder()
    b.run_task("t-1")
    payloads = [encode_event(e) for e in b.events]
    batch = _batch([*payloads, payloads[3], payloads[0]])
    assert (batch.events, batch.repeats, len(batch)) == (10, 2, 12)


def test_each_event_lands_in_its_staging_kind() -> None:
    b = HistoryBuilder()
    b.run_task(
        "t-1",
        AttemptPlan(error="EXECUTION_TIMEOUT", exit_code=137, kill_reason="timeout"),
        AttemptPlan(),
    )
    batch = _batch([encode_event(e) for e in b.events])
    counts = {kind: len(rows) for kind, rows in batch.rows.items()}
    assert counts == {
        "batch": 21,
        "submitted": 1,
        "terminal": 1,
        "attempt": 4,
        "container": 7,
        "workspace": 2,
        "error": 1,
        "cleanup": 4,
        "alert": 0,
        "instance": 0,
        "inventory": 0,
        "decision": 0,
        "outcome": 0,
    }
    assert batch.rows["container"][2] == (6, "c-t-1-1", None, None, None, None, "timeout")
    staged = stage(batch)
    for kind, table in staged.tables.items():
        assert table.schema == STAGING[kind]
    assert staged.tables["batch"].column("occurred_at")[0].as_py() == datetime(2026, 1, 1)


def test_mixed_history_is_deterministic_and_decodes_cleanly() -> None:
    a, b = mixed_history(2000, seed=3), mixed_history(2000, seed=3)
    assert [encode_event(e) for e in a] == [encode_event(e) for e in b]
    batch = _batch([encode_event(e) for e in a])
    assert (batch.events, batch.dead, batch.repeats) == (2000, [], 0)


def test_the_task_states_come_from_the_lifecycle_machine() -> None:
    assert TASK_TARGET_STATE == {
        "attempt.finished": "attempt_done",
        "attempt.started": "running",
        "task.failed": "failed",
        "task.refused": "refused",
        "task.rejected": "rejected",
        "task.retry_scheduled": "retrying",
        "task.submitted": "submitted",
        "task.succeeded": "succeeded",
    }
    assert TERMINAL_TASK_TYPES == ("task.failed", "task.rejected", "task.succeeded")
    assert sql_task_state_case("t").startswith("CASE t WHEN 'attempt.finished' THEN 'attempt_done'")


def test_reply_subjects_of_both_layouts_parse() -> None:
    v1 = "$JS.ACK.SUP_EVENTS.cons.1.42.40.1767225600000000123.7"
    v2 = "$JS.ACK.dom.acc.SUP_EVENTS.cons.1.42.40.1767225600000000123.7.rnd"
    assert parse_reply(v1) == parse_reply(v2) == (42, 1_767_225_600_000_000_123, 7)
    assert (
        to_ns(datetime(2026, 1, 1, tzinfo=UTC))
        == to_ns(datetime(2026, 1, 1))
        == 1_767_225_600_000_000_000
    )


def test_the_progress_bar_text() -> None:
    p = Progress(seq=150, target=200, from_seq=100, applied=49, dead=1)
    text = render_bar(p)
    assert text.startswith("replay [###############...............]  50.0%  seq 150/200")
    assert text.endswith("dead 1")


def _parts(n: int, size: int) -> list[tuple[list[str], list[str], list[bytes]]]:
    events = mixed_history(n, seed=5)
    replies = [f"$JS.ACK.SUP_EVENTS.c.1.{i}.{i}.{1000 + i}.{n - i}" for i in range(1, n + 1)]
    subjects = [e.subject() for e in events]
    datas = [encode_event(e) for e in events]
    return [
        (replies[i : i + size], subjects[i : i + size], datas[i : i + size])
        for i in range(0, n, size)
    ]


def test_a_decode_pool_stages_batches_side_by_side_as_the_decoder_does() -> None:
    parts = _parts(400, 100)
    pool = DecodePool(2)
    try:
        with ThreadPoolExecutor(2) as threads:
            staged = list(threads.map(lambda part: pool.stage(*part), parts))
    finally:
        pool.close()
    for got, part in zip(staged, parts, strict=True):
        want = stage_raw(*part)
        assert (got.events, got.last_seq) == (want.events, want.last_seq) == (100, want.last_seq)
        for kind, table in want.tables.items():
            assert got.tables[kind].equals(table), kind


def test_a_dead_decode_process_is_a_projection_error() -> None:
    pool = DecodePool(1)
    try:
        pool._all[0]._proc.kill()
        pool._all[0]._proc.wait()
        with pytest.raises(ProjectionError, match="decode worker died"):
            pool.stage(*_parts(10, 10)[0])
    finally:
        pool.close()
