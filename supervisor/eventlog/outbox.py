"""A durable local outbox: every event is on disk before anything tries to publish it.

One process owns one log, `<directory>/<instance_id>.log`, an append-only sequence of
records `u32 length | u32 crc32 | msgpack [seq, subject, msg_id, payload]`, and a cursor
file `<instance_id>.cursor` holding the seq of the last record JetStream acknowledged.
The log is held under an exclusive `flock` for the life of the process, so a log whose lock
can be taken belongs to a dead process: `adopt_orphans` takes it over and hands out its
unacked records before this process's own, then deletes it.

Durability is split in two on purpose: `append` `write()`s the record at once (it survives
the process being killed, without paying for an fsync per event) and `sync` fsyncs
everything appended so far in one go (group commit). The relay syncs before it publishes,
so nothing reaches NATS that a machine crash could take back.

Pure file I/O, no NATS. Not thread-safe, except that `sync` may run in a worker thread
while the event loop appends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import threading
import time
import zlib
from collections import deque
from pathlib import Path

from schemas.errors import DiskFull, OutboxError
from supervisor.eventlog.frames import HEADER, Record, encoder, next_record, scan

__all__ = ["Outbox", "Record"]

log = logging.getLogger(__name__)

_RECORD_OVERHEAD = 200  # rough RAM cost of a record beyond its payload, for the memory bound
_STALE_NEW_LOG_S = 3600.0
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
DEFAULT_TRUNCATE_THRESHOLD = 64 * 1024 * 1024
DEFAULT_MEMORY_LIMIT = 32 * 1024 * 1024
# A group commit fsyncs the cursor too when its last fsync is older than this: after a
# power cut the relay resends at most this much of what JetStream already acked, well
# inside its duplicate window (2 min), which drops it (Nats-Msg-Id).
CURSOR_SYNC_S = 1.0


class _Log:
    """One log file and its cursor: recovery, the unacked window and the cursor.

    Unacked records live in `_window` until it holds `memory_limit` bytes; later records
    stay on disk only (`_spill_at` is the file offset of the first of them) and are read
    back as the window drains, so a long NATS outage costs disk, not RAM.
    """

    def __init__(self, directory: Path, name: str, fd: int, memory_limit: int) -> None:
        self.directory = directory
        self.name = name
        self.path = directory / f"{name}.log"
        self.cursor_path = directory / f"{name}.cursor"
        self.fd = fd
        self.memory_limit = memory_limit
        self.cursor = self._read_cursor()
        self.last_seq = self.cursor
        self._cursor_fd = -1
        self._cursor_len = 0
        self._cursor_dirty = False
        self._cursor_synced_at = 0.0  # time.monotonic() of the cursor's last fsync
        self.size = 0
        self.dirty = False
        self._window: deque[Record] = deque()
        self._window_bytes = 0
        self._spill_at: int | None = None
        self._recover()

    # --- opening ---------------------------------------------------------------------

    @classmethod
    def open_locked(
        cls, directory: Path, name: str, memory_limit: int, *, create: bool
    ) -> _Log | None:
        """Open and lock `<name>.log`; None if another live process holds it (or it was
        deleted between listing and locking). With `create`, a new log is locked before
        its name appears (`_create_locked`), so no adopter can take it in between."""
        path = directory / f"{name}.log"
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        fd = _create_locked(directory, name, flags) if create else None
        if fd is not None:
            try:
                return cls(directory, name, fd, memory_limit)
            except BaseException:
                os.close(fd)
                raise
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            # The previous holder may have unlinked the file after we opened it.
            st = os.fstat(fd)
            if st.st_nlink == 0 or os.stat(path).st_ino != st.st_ino:
                os.close(fd)
                return None
            return cls(directory, name, fd, memory_limit)
        except FileNotFoundError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise

    def _read_cursor(self) -> int:
        try:
            text = self.cursor_path.read_text()
        except FileNotFoundError:
            return 0
        try:
            return max(0, int(text.strip()))
        except ValueError:
            # Replaying from the start is safe: JetStream drops duplicates by Nats-Msg-Id.
            log.warning(
                "outbox cursor %s is unreadable (%r); replaying the log", self.cursor_path, text
            )
            return 0

    def _recover(self) -> None:
        """Scan the log: set aside corrupt records in the middle (`_resync`), drop a torn
        tail, load the unacked records after the cursor."""
        self._resync()
        end = os.fstat(self.fd).st_size
        good = 0  # the end of the last intact record
        first_unacked: int | None = None
        for start, stop, record in scan(self.fd, 0, end):
            self.last_seq = max(self.last_seq, record.seq)
            if record.seq > self.cursor:
                if first_unacked is None:
                    first_unacked = record.seq
                self._keep(record, start)
            good = stop
        if first_unacked is not None:
            # A log truncated earlier starts past 1; with a lost cursor, what precedes its
            # first record was acked (and the window must start right after the cursor).
            self.cursor = max(self.cursor, first_unacked - 1)
        if good < end:
            log.warning(
                "outbox %s: dropping %d bytes of torn or corrupt tail at offset %d",
                self.path,
                end - good,
                good,
            )
            os.ftruncate(self.fd, good)
            os.fsync(self.fd)
        self.size = good

    def _resync(self) -> None:
        """A damaged record in the middle of the log (a flipped bit, a bad sector) must not
        take the intact records after it along: the CRC framing lets the scan find the next
        record that is whole (its length fits, its CRC matches, it decodes, and its seq
        follows). Each damaged stretch is kept in `<name>.quarantine-<offset>`, and the log
        is rewritten without them (a new file, locked before it takes the log's name)."""
        end = os.fstat(self.fd).st_size
        kept: list[tuple[int, int]] = []
        bad: list[tuple[int, int]] = []
        at, last = 0, 0
        while at < end:
            for start, stop, record in scan(self.fd, at, end):
                kept.append((start, stop))
                last, at = record.seq, stop
            if at >= end:
                break
            found = next_record(self.fd, at + 1, end, last)
            if found is None:
                break  # a torn tail: `_recover` drops it
            bad.append((at, found))
            at = found
        if not bad:
            return
        for start, stop in bad:
            quarantine = self.directory / f"{self.name}.quarantine-{start}"
            quarantine.write_bytes(os.pread(self.fd, stop - start, start))
            log.error(
                "outbox %s: %d damaged bytes at offset %d set aside in %s; the records after "
                "them are kept",
                self.path,
                stop - start,
                start,
                quarantine.name,
            )
        tmp = self.directory / f".{self.name}.log.resync"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            for start, stop in kept:
                os.write(fd, os.pread(self.fd, stop - start, start))
            os.fsync(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            raise
        os.close(self.fd)
        self.fd = fd

    # --- the unacked window ----------------------------------------------------------

    def _keep(self, record: Record, offset: int) -> None:
        """Hold `record` (which starts at file `offset`) in RAM unless the window is full."""
        if self._spill_at is None and self._window_bytes < self.memory_limit:
            self._window.append(record)
            self._window_bytes += len(record.payload) + _RECORD_OVERHEAD
        elif self._spill_at is None:
            self._spill_at = offset

    def _refill(self) -> None:
        if self._spill_at is None:
            return
        at = self._spill_at
        self._spill_at = None
        for _, end, record in scan(self.fd, at, self.size):
            if self._window_bytes >= self.memory_limit:
                self._spill_at = at
                return
            self._window.append(record)
            self._window_bytes += len(record.payload) + _RECORD_OVERHEAD
            at = end
        if at < self.size:
            raise OutboxError(f"outbox {self.path} is corrupt at offset {at}")

    @property
    def backlog(self) -> int:
        return self.last_seq - self.cursor

    @property
    def resident(self) -> int:
        return len(self._window)

    def append(self, subject: str, msg_id: str, payload: bytes) -> int:
        # The hot path of every emit: kept flat on purpose.
        seq = self.last_seq + 1
        record = Record(seq, subject, msg_id, payload)
        body = encoder.encode(record)
        data = HEADER.pack(len(body), zlib.crc32(body)) + body
        fd = self.fd
        try:
            written = os.write(fd, data)
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as e:
            # Leave no partial record behind for the next append to follow.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self.size)
            if e.errno in _NO_SPACE:
                raise DiskFull(f"outbox {self.path}: no space left: {e.strerror}") from e
            raise OutboxError(f"outbox {self.path}: append failed: {e}") from e
        offset = self.size
        self.size = offset + len(data)
        self.last_seq = seq
        self.dirty = True
        if self._spill_at is None:
            if self._window_bytes < self.memory_limit:
                self._window.append(record)
                self._window_bytes += len(payload) + _RECORD_OVERHEAD
            else:
                self._spill_at = offset
        return seq

    def pending(self, limit: int, after: int | None) -> list[Record]:
        # The window always starts at cursor + 1 and its seqs are consecutive.
        skip = 0 if after is None else max(0, after - self.cursor)
        if len(self._window) < skip + limit:
            self._refill()
        return list(itertools.islice(self._window, skip, skip + limit))

    def ack(self, upto_seq: int) -> None:
        if upto_seq <= self.cursor:
            return
        if upto_seq > self.last_seq:
            raise ValueError(
                f"ack({upto_seq}) beyond the last record {self.last_seq} of {self.path}"
            )
        window = self._window
        popped = freed = 0
        while window and window[0].seq <= upto_seq:
            freed += len(window.popleft().payload)
            popped += 1
        self._window_bytes -= freed + popped * _RECORD_OVERHEAD
        if not window and self._spill_at is not None and upto_seq > self.cursor:
            # Acked past what was resident: skip the acked part of the spilled records.
            self._skip_spilled(upto_seq)
        self.cursor = upto_seq
        self._write_cursor()

    def _skip_spilled(self, upto_seq: int) -> None:
        assert self._spill_at is not None
        at = self._spill_at
        for _, end, record in scan(self.fd, at, self.size):
            if record.seq > upto_seq:
                break
            at = end
        self._spill_at = at if at < self.size else None

    def _write_cursor(self) -> None:
        """Overwrite the cursor in place, without an fsync: it runs on every ack, on the
        event loop, where a create-fsync-rename costs milliseconds. The cursor is fsync'd
        with a group commit of the log (`sync`) at most every `CURSOR_SYNC_S`, before a
        truncation and on close.
        A cursor lost to a power cut only makes the relay resend acked records, which
        JetStream's duplicate window drops (Nats-Msg-Id)."""
        text = f"{self.cursor}\n".encode()
        try:
            if self._cursor_fd < 0:
                self._cursor_fd = os.open(
                    self.cursor_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
                )
                self._cursor_len = os.fstat(self._cursor_fd).st_size
            os.pwrite(self._cursor_fd, text, 0)
            if len(text) < self._cursor_len:  # only after an unreadable, longer cursor
                os.ftruncate(self._cursor_fd, len(text))
            self._cursor_len = len(text)
            self._cursor_dirty = True
        except OSError as e:
            raise OutboxError(f"outbox {self.cursor_path}: cannot write cursor: {e}") from e

    def sync_cursor(self) -> None:
        if self._cursor_dirty and self._cursor_fd >= 0:
            self._cursor_dirty = False
            self._cursor_synced_at = time.monotonic()
            os.fsync(self._cursor_fd)

    def truncate_if_done(self, threshold: int) -> bool:
        """Empty the log when every record is acked and it has grown past `threshold`.

        Crash-safe because the cursor (already durable) then points at or beyond the last
        record a reopened log could contain: everything in it counts as acked.
        """
        if self.backlog or self.size <= threshold:
            return False
        self.sync_cursor()  # the cursor must be durable before the data goes
        _fsync_dir(self.directory)
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)
        self.size = 0
        self._spill_at = None
        return True

    def sync(self) -> None:
        if self.dirty:
            self.dirty = False  # before the fsync: an append racing with it re-marks it
            os.fsync(self.fd)
        if time.monotonic() - self._cursor_synced_at >= CURSOR_SYNC_S:
            self.sync_cursor()

    def delete(self) -> None:
        """Remove a fully acked orphan: the log first (a leftover cursor is harmless)."""
        self.path.unlink(missing_ok=True)
        self.cursor_path.unlink(missing_ok=True)
        (self.directory / f".{self.name}.cursor.tmp").unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        if self._cursor_fd >= 0:
            with contextlib.suppress(OSError):
                self.sync_cursor()
            os.close(self._cursor_fd)
            self._cursor_fd = -1
        if self.fd >= 0:
            os.close(self.fd)  # releases the flock
            self.fd = -1


def _create_locked(directory: Path, name: str, flags: int) -> int | None:
    """Create `<name>.log` already locked: the file is made and flocked under a hidden name
    that no adopter lists (`.<name>.log.new`), then linked to its real name. Returns the
    locked fd, or None when `<name>.log` exists already (then it is opened as usual)."""
    path = directory / f"{name}.log"
    if path.exists():
        return None
    tmp = directory / f".{name}.log.new"
    tmp.unlink(missing_ok=True)  # left by a process that died right here
    fd = os.open(tmp, flags | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            os.link(tmp, path)
        except FileExistsError:
            os.close(fd)
            return None
        finally:
            tmp.unlink(missing_ok=True)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    """The outbox of one process (`instance_id`), plus the orphans it adopted.

    `pending` hands out records in order: adopted orphans' first (each orphan's in its own
    order), then this process's. `ack(upto_seq)` acknowledges records of the log that the
    latest `pending` call read from, up to and including `upto_seq`.

    Raises `OutboxError` when the log is locked by another live process or the disk fails.
    """

    def __init__(
        self,
        directory: Path,
        instance_id: str,
        *,
        truncate_threshold: int = DEFAULT_TRUNCATE_THRESHOLD,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
    ) -> None:
        if not instance_id or "/" in instance_id or instance_id.startswith("."):
            raise ValueError(f"instance_id {instance_id!r} is not usable as a file name")
        self.directory = Path(directory)
        self.instance_id = instance_id
        self.truncate_threshold = truncate_threshold
        self.memory_limit = memory_limit
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            own = _Log.open_locked(self.directory, instance_id, memory_limit, create=True)
        except OSError as e:
            raise OutboxError(f"cannot open outbox {self.directory / instance_id}.log: {e}") from e
        if own is None:
            raise OutboxError(
                f"outbox {self.directory / instance_id}.log is held by another process"
            )
        self._own = own
        self._orphans: deque[_Log] = deque()
        self._leased: _Log = own
        self._sync_lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._own.path

    @property
    def backlog(self) -> int:
        """Records appended (or adopted) and not yet acked."""
        return self._own.backlog + sum(o.backlog for o in self._orphans)

    @property
    def resident(self) -> int:
        """Unacked records currently held in RAM (bounded by `memory_limit` per log)."""
        return self._own.resident + sum(o.resident for o in self._orphans)

    @property
    def closed(self) -> bool:
        return self._own.fd < 0

    def append(self, subject: str, msg_id: str, payload: bytes) -> int:
        """Write one record now (no fsync) and return its seq."""
        own = self._own
        if own.fd < 0:
            raise OutboxError(f"outbox {own.path} is closed")
        return own.append(subject, msg_id, payload)

    def sync(self) -> None:
        """fsync everything appended so far (one fsync for any number of appends).
        Safe to call from a worker thread while the owning thread appends."""
        with self._sync_lock:
            if self.closed:
                return
            try:
                self._own.sync()
            except OSError as e:
                if e.errno in _NO_SPACE:
                    raise DiskFull(f"outbox {self.path}: no space left: {e.strerror}") from e
                raise OutboxError(f"outbox {self.path}: fsync failed: {e}") from e

    @property
    def dirty(self) -> bool:
        """Whether records were appended since the last `sync`."""
        return self._own.dirty

    def pending(self, limit: int, after: int | None = None) -> list[Record]:
        """Up to `limit` unacked records, oldest first, all from one log.

        Without `after`, from the first unacked record of the first log that has any
        (adopted orphans first). With `after`, the records that follow seq `after` in the
        same log as the previous call, so a relay can have several batches in flight;
        an empty list then means that log has no more.
        """
        if after is None:
            while self._orphans and self._orphans[0].backlog == 0:
                self._orphans.popleft().delete()
            self._leased = self._orphans[0] if self._orphans else self._own
        return self._leased.pending(limit, after)

    def ack(self, upto_seq: int) -> None:
        """Acknowledge the records of the last `pending` call's log up to `upto_seq`, and
        persist the cursor. An orphan fully acked is deleted; this process's log is
        truncated once it is fully acked and bigger than `truncate_threshold`."""
        leased = self._leased
        leased.ack(upto_seq)
        try:
            if leased is self._own:
                leased.truncate_if_done(self.truncate_threshold)
            elif leased.backlog == 0:
                self._orphans.remove(leased)
                leased.delete()
                self._leased = self._own
        except OSError as e:
            raise OutboxError(f"outbox {leased.path}: {e}") from e

    def adopt_orphans(self) -> int:
        """Take over every other log in the directory whose lock is free (its process is
        dead): fsync it, queue its unacked records ahead of this process's own and delete it
        once they are acked. Returns how many unacked records were adopted."""
        adopted = 0
        taken = {self.instance_id} | {o.name for o in self._orphans}
        for path in sorted(self.directory.glob("*.log")):
            name = path.stem
            if name in taken:
                continue
            try:
                orphan = _Log.open_locked(self.directory, name, self.memory_limit, create=False)
            except OSError as e:
                if e.errno == errno.EACCES:
                    continue
                raise OutboxError(f"cannot adopt outbox {path}: {e}") from e
            if orphan is None:
                continue
            try:
                if orphan.backlog == 0:
                    orphan.delete()
                    continue
                os.fsync(orphan.fd)  # its process wrote it but may never have synced it
            except OSError as e:
                orphan.close()
                raise OutboxError(f"cannot adopt outbox {path}: {e}") from e
            log.info("outbox: adopted %d unacked records from %s", orphan.backlog, path)
            self._orphans.append(orphan)
            adopted += orphan.backlog
        self._remove_stray_cursors()
        return adopted

    def _remove_stray_cursors(self) -> None:
        """A cursor without its log is what a crash between an orphan's two unlinks leaves;
        an old `.<name>.log.new`, a crash while a log was being created (a young one may be
        in the making: only its creator ever locks or links it)."""
        for cursor in self.directory.glob("*.cursor"):
            if not cursor.with_suffix(".log").exists():
                cursor.unlink(missing_ok=True)
        stale = time.time() - _STALE_NEW_LOG_S
        for new in self.directory.glob(".*.log.new"):
            with contextlib.suppress(OSError):
                if new.stat().st_mtime < stale:
                    new.unlink()

    def close(self) -> None:
        """Release the lock and every adopted orphan (still unacked ones stay for later)."""
        with self._sync_lock:
            for orphan in self._orphans:
                orphan.close()
            self._orphans.clear()
            self._own.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
