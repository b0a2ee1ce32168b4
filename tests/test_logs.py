"""Structured logs: the exact JSON line, the task context, extras and exceptions."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from supervisor.observability.logs import JsonFormatter, bind, bound, configure


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """`configure` on a fresh stream; the root logger is put back as it was afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    configure("n1", "info", out)
    try:
        yield out
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    return [d for d in docs if str(d["logger"]).startswith("supervisor.")]


def test_the_exact_line_of_a_record() -> None:
    record = logging.makeLogRecord(
        {
            "name": "supervisor.daemon.daemon",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "pulled %s",
            "args": ("t-1",),
            "created": 1767225600.25,
            "queue": "high",
        }
    )

    with bind(task_id="t-1", attempt=2, correlation_id="c-9"):
        line = JsonFormatter("n1").format(record)

    assert line == (
        '{"timestamp":"2026-01-01T00:00:00.250Z","level":"info","logger":"supervisor.daemon.daemon",'
        '"event":"pulled t-1","node_id":"n1","task_id":"t-1","attempt":2,"correlation_id":"c-9",'
        '"queue":"high"}'
    )


def test_outside_a_task_the_context_fields_are_null(stream: io.StringIO) -> None:
    logging.getLogger("supervisor.test").warning("idle")

    (doc,) = _lines(stream)

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(doc.pop("timestamp")))
    assert doc == {
        "level": "warning",
        "logger": "supervisor.test",
        "event": "idle",
        "node_id": "n1",
        "task_id": None,
        "attempt": None,
        "correlation_id": None,
    }


def test_binds_nest_and_unwind(stream: io.StringIO) -> None:
    log = logging.getLogger("supervisor.test")

    with bind(task_id="t-1", correlation_id="c-1"):
        with bind(attempt=1):
            log.info("attempt")
            assert bound() == {"task_id": "t-1", "correlation_id": "c-1", "attempt": 1}
        log.info("task", extra={"priority": "low", "seq": 7})
    log.info("after")

    docs = [(d["event"], d["task_id"], d["attempt"], d["correlation_id"]) for d in _lines(stream)]
    assert docs == [
        ("attempt", "t-1", 1, "c-1"),
        ("task", "t-1", None, "c-1"),
        ("after", None, None, None),
    ]
    assert {k: _lines(stream)[1][k] for k in ("priority", "seq")} == {"priority": "low", "seq": 7}


async def test_asyncio_tasks_keep_the_context_they_were_started_in(stream: io.StringIO) -> None:
    log = logging.getLogger("supervisor.test")

    async def work(name: str) -> None:
        await asyncio.sleep(0)
        log.info(name)

    with bind(task_id="t-a"):
        a = asyncio.create_task(work("a"))
    with bind(task_id="t-b"):
        b = asyncio.create_task(work("b"))
    await asyncio.gather(a, b)

    assert sorted((d["event"], d["task_id"]) for d in _lines(stream)) == [
        ("a", "t-a"),
        ("b", "t-b"),
    ]


def test_an_exception_is_one_field_of_the_same_line(stream: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("supervisor.test").exception("failed")

    (doc,) = _lines(stream)

    assert doc["event"] == "failed" and doc["level"] == "error"
    exc = str(doc["exception"])
    assert exc.startswith("Traceback (most recent call last):")
    assert exc.endswith("ValueError: boom")


def test_values_that_are_not_json_are_written_as_text(stream: io.StringIO) -> None:
    class Thing:
        def __str__(self) -> str:
            return "a thing"

    logging.getLogger("supervisor.test").info("odd", extra={"thing": Thing()})

    assert _lines(stream)[0]["thing"] == "a thing"


def test_configure_replaces_its_own_handler_and_honours_the_level(stream: io.StringIO) -> None:
    root = logging.getLogger()
    other = io.StringIO()
    before = len(root.handlers)

    configure("n2", "WARNING", other)
    logging.getLogger("supervisor.test").info("dropped")
    logging.getLogger("supervisor.test").warning("kept")

    assert len(root.handlers) == before
    assert stream.getvalue() == ""
    assert [(d["event"], d["node_id"]) for d in _lines(other)] == [("kept", "n2")]
