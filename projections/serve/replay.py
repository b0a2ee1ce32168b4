"""Rebuild a projection file from the stream, as of a point in history.

`replay` builds a fresh file next to the target (`.<name>.replay-<pid>`), in bulk mode
(large batches, one checkpoint at the end), then atomically renames it over the target: a
reader of the target sees the old projection or the new one, never half of one. The
target must not be the file of a running projector (DuckDB allows one writer; replaying
into a file someone holds is refused).

`--until` is the stream's own timestamp (when JetStream stored the message), not the
events' `occurred_at`: it replays what the system knew at that moment, a clean prefix of
the log, even when an outbox delivered old events late.
"""

from __future__ import annotations

import contextlib
import os
from datetime import datetime
from pathlib import Path

import duckdb
import nats
import nats.errors

from projections.audit import Retention
from projections.errors import ProjectionStoreError, StreamUnavailable
from projections.serve.progress import ProgressBar
from projections.serve.projector import Progress, Projector
from schemas.connection import connect_options
from schemas.lifecycle import Keyring
from schemas.streams import EVENTS_STREAM

__all__ = ["ensure_not_in_use", "replay", "stream_retention"]

BULK_BATCH = 250_000
"""Events per batch of a replay: two of DuckDB's row groups (122,880 rows), which DuckDB
writes straight to the file and fills with both its threads; smaller batches cost more
CPU per event."""


def _wal(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


def _remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def ensure_not_in_use(path: Path) -> None:
    """Raise ProjectionStoreError if another process holds `path` open for writing."""
    if not path.exists():
        return
    try:
        duckdb.connect(str(path), read_only=True).close()
    except duckdb.IOException as e:
        raise ProjectionStoreError(
            str(path), f"in use by another process (a running daemon?): {e}"
        ) from e
    except duckdb.Error:
        return  # not a DuckDB file (or damaged): replacing it is what the user asked for


async def replay(
    db_path: str | Path,
    nats_url: str,
    until_time: datetime | None = None,
    until_seq: int | None = None,
    progress: bool = False,
    *,
    batch_size: int = BULK_BATCH,
    keyring: Keyring | None = None,
) -> Progress:
    """Rebuild `db_path` from `SUP_EVENTS` as of `until_seq` / `until_time` (both None:
    the whole history as it is now), judging signatures with `keyring` (None: no pins).
    With `progress`, draw a bar on stderr if it is a terminal. Returns the totals. Raises StreamUnavailable, ProjectionStoreError."""
    target = Path(db_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    ensure_not_in_use(target)
    tmp = target.with_name(f".{target.name}.replay-{os.getpid()}")
    _remove(tmp, _wal(tmp))
    bar = ProgressBar() if progress else None
    try:
        with Projector(
            tmp, nats_url, batch_size=batch_size, bulk=True, keyring=keyring
        ) as projector:
            result = await projector.catch_up(
                until_seq=until_seq, until_time=until_time, progress=bar
            )
        _remove(_wal(target))
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        _remove(tmp, _wal(tmp))
        raise
    finally:
        if bar is not None:
            bar.close()
    return result


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def stream_retention(nats_url: str, stream: str = EVENTS_STREAM) -> Retention:
    """The limits `stream` has in force now, and what it holds (for the audit's
    `history_erased`). Raises StreamUnavailable."""
    try:
        nc = await nats.connect(
            **connect_options(nats_url), connect_timeout=5, max_reconnect_attempts=0
        )
    except (OSError, TimeoutError, nats.errors.Error) as e:
        raise StreamUnavailable(nats_url, repr(e)) from e
    try:
        info = await nc.jetstream().stream_info(stream)
    except (OSError, TimeoutError, nats.errors.Error) as e:
        raise StreamUnavailable(nats_url, repr(e)) from e
    finally:
        await nc.close()
    c, st = info.config, info.state
    return Retention(
        max_age_s=c.max_age,
        max_bytes=c.max_bytes,
        max_msgs=c.max_msgs,
        messages=int(st.messages or 0),
        bytes=int(st.bytes or 0),
    )
