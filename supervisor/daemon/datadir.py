"""The daemon's exclusive hold on its data dir: `<data_dir>/daemon.lock`.

One `supervisor serve` per data dir. The lock is a `flock` taken before the daemon touches
anything (NATS, the streams, the URL files), held for the life of the process and released
by the kernel when it dies, however it dies. So a daemon that gets the lock knows for
certain that the one that held it before is dead: the file names that predecessor (pid,
instance id) unless it stopped cleanly, which empties the file. The new daemon records the
predecessor as superseded, and its start-up pass treats what it left as orphans at once.

Pure file I/O.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import msgspec

from schemas.errors import ConfigError, DataDirInUse, SupervisorError
from schemas.streams import EventSigner, new_seed
from supervisor.eventlog.nats_auth import write_private_once

LOCK_NAME = "daemon.lock"
NODE_ID_NAME = "node-id"


class Holder(msgspec.Struct, frozen=True):
    """Who holds (or last held) the lock."""

    pid: int
    instance_id: str
    node_id: str = ""


@dataclass
class DataDirLock:
    """The held lock. `previous` is the holder that died without releasing it (None after
    a clean stop or on a new data dir)."""

    path: Path
    fd: int
    holder: Holder
    previous: Holder | None

    @classmethod
    def acquire(cls, data_dir: Path, *, instance_id: str, node_id: str) -> DataDirLock:
        """Take the lock or raise `DataDirInUse` naming the live holder's pid at once
        (never waits). Raises `SupervisorError` when the file cannot be opened."""
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise SupervisorError(f"cannot open {path}: {e.strerror}") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = _read(fd)
                raise DataDirInUse(data_dir, held.pid if held else None) from None
            previous = _read(fd)
            holder = Holder(pid=os.getpid(), instance_id=instance_id, node_id=node_id)
            _write(fd, msgspec.json.encode(holder))
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, holder, previous)

    def release(self) -> None:
        """A clean stop: empty the file (nobody is superseded next time), then unlock."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            _write(self.fd, b"")
        os.close(self.fd)
        self.fd = -1


def _read(fd: int) -> Holder | None:
    try:
        data = os.pread(fd, 4096, 0)
        return msgspec.json.decode(data, type=Holder) if data.strip() else None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def _write(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def publish(stack: contextlib.AsyncExitStack, path: Path, text: str) -> None:
    """Write `text` (a URL the other commands on this data dir look for) to `path` until
    `stack` closes."""
    path.write_text(text + "\n")
    stack.callback(path.unlink, missing_ok=True)


def stored_node_id(data_dir: Path) -> str | None:
    """The node id kept in the data dir (`node-id`), None when there is none yet."""
    try:
        text = (data_dir / NODE_ID_NAME).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise SupervisorError(f"cannot read {data_dir / NODE_ID_NAME}: {e.strerror}") from e
    return text or None


def node_id_for(data_dir: Path, given: str, *, keep: bool) -> str:
    """This data dir's node id: `given` when set (configured or `--node-id`), else the one
    kept in the data dir, else a new `n-<8 hex>`. With `keep` (a process that runs tasks
    or owns the data dir) the id used is written to the data dir, so that every later
    command on it, daemon or CLI, uses the same one. Two data dirs never share a default
    id, so two daemons on one host never take each other's containers for their own."""
    stored = stored_node_id(data_dir)
    node_id = given or stored or f"n-{secrets.token_hex(4)}"
    if keep and node_id != stored:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{NODE_ID_NAME}.tmp"
        tmp.write_text(node_id + "\n")
        os.replace(tmp, data_dir / NODE_ID_NAME)
    return node_id


TOKEN_NAME = "http-token"


def generated_token(data_dir: Path) -> str:
    """The HTTP API's bearer token of this data dir, made at the first start (random, file
    mode 0600, read by the CLI like the NATS credentials)."""
    path = data_dir / TOKEN_NAME
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    return write_private_once(path, (secrets.token_urlsafe(32) + "\n").encode()).decode().strip()


def stored_token(data_dir: Path) -> str | None:
    """The data dir's HTTP token, None when no daemon made one there."""
    try:
        return (data_dir / TOKEN_NAME).read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


SIGNING_SEED_NAME = "signing.nk"


def node_signer(data_dir: Path, seed_file: str | None, nkey_seed: str | None) -> EventSigner:
    """This node's event signer (`schemas.streams.EventSigner`): the seed of `[signing]
    seed_file`, else of `[nats] nkey_seed` (one identity to connect and to sign), else the
    data dir's own, made at the first start (mode 0600). Raises ConfigError when a named
    file cannot be read or holds no seed."""
    path = seed_file or nkey_seed
    if path is None:
        own = data_dir / SIGNING_SEED_NAME
        try:
            seed = own.read_bytes()
        except FileNotFoundError:
            seed = write_private_once(own, new_seed() + b"\n")
        path = str(own)
    else:
        try:
            seed = Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"signing seed {path}: {e.strerror}") from e
    try:
        return EventSigner(seed)
    except ValueError as e:
        raise ConfigError(f"signing seed {path}: {e}") from e
