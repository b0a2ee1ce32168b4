"""Structured logs: one JSON object a line, with the standard library.

Every line has `timestamp` (UTC, ISO 8601, milliseconds, `Z`), `level`, `logger`, `event`
(the formatted message), `node_id`, `task_id`, `attempt` and `correlation_id` (null outside a
task), then any `extra={...}` given to the call, then `exception` when there is one. The
task fields come from a context variable that `bind` sets for the duration of a block;
asyncio tasks inherit it when they are created, so binding once around a task's handling
labels every line logged on its behalf.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NoReturn, TextIO

CONTEXT_FIELDS = ("task_id", "attempt", "correlation_id")

_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "supervisor_log_context", default=MappingProxyType({})
)
# Attributes every LogRecord has; anything else on a record came from `extra`.
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add `fields` (usually task_id, attempt, correlation_id) to every line logged inside
    the block; nested binds add to (and override) the outer ones."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bound() -> dict[str, Any]:
    """The fields bound now (a copy)."""
    return dict(_context.get())


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line (see the module docstring for the fields)."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        ctx = _context.get()
        created = datetime.fromtimestamp(record.created, UTC)
        doc: dict[str, Any] = {
            "timestamp": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            "node_id": self.node_id,
        }
        for name in CONTEXT_FIELDS:
            doc[name] = ctx.get(name)
        for name, value in ctx.items():
            if name not in doc:
                doc[name] = value
        for name, value in record.__dict__.items():
            if name not in _RESERVED and doc.get(name) is None:
                doc[name] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False, separators=(",", ":"))


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler `configure` installed, so a second call replaces it."""


def configure(
    node_id: str, level: str | int = "INFO", stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record of the process (the root logger) to `stream` (stderr by
    default) as JSON lines at `level`. Idempotent: calling it again replaces the handler it
    installed before; handlers installed by others are left alone."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _Handler):
            root.removeHandler(h)
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(node_id))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # APScheduler logs every run of every job at INFO ("Running job ...", "executed
    # successfully"): a line each few seconds that says nothing. Its warnings stay.
    logging.getLogger("apscheduler").setLevel(max(root.level, logging.WARNING))
    return handler


def exit_at_once(code: int) -> NoReturn:
    """End a process that stopped cleanly (its files closed, its connections and children
    ended): the logs and standard streams flushed, then `os._exit`, without tearing the
    interpreter down (DuckDB, Arrow, every module: a tenth of a second or more, and a wait
    on any library thread still parked in a blocking call)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
