"""Start `supervisor serve` as users do (a subprocess) and talk to it (tests and benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor.client import Client
from supervisor.daemon.datadir import stored_token
from supervisor.eventlog.nats_server import url_file
from testing.openapi import check_answer

SANDBOX_IMAGE = "supervisor-sandbox:busybox"

# About 0.2 s of shell builtins (no fork), to end a script with: what happened just before
# (a refused fork, a child OOM-killed) is then read by a cgroup sample before the container
# exits. One in a task's last 20 ms can be missed, a limit the README states; the tests
# that end so check a classification, not that race.
LINGER = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"
# Forks refused by a pids limit of 8 (exit 2: "can't fork"), then `LINGER`.
FORKS_REFUSED = f"(for i in $(seq 1 40); do sleep 5 & done; wait); s=$?; {LINGER}; exit $s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


HOST_BRAKES = (
    "cpu_pressure_pct",
    "memory_pressure_pct",
    "io_pressure_pct",
    "cpu_pct",
    "memory_pct",
)
"""The host brakes a test daemon runs without unless its test asks."""


class DaemonProc:
    def __init__(
        self,
        data_dir: Path,
        nats_url: str | None,
        config: dict[str, Any] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.args = args
        self.data_dir = data_dir
        self.nats_url = nats_url
        self.port = free_port()
        self.config_path = data_dir.parent / f"config-{self.port}.json"
        cfg = dict(config or {})
        cfg.setdefault("http", {})["listen"] = f"127.0.0.1:{self.port}"
        # The tests name their node; an empty id asks for the data dir's own.
        cfg.setdefault("node_id", "n1")
        # A busy CI host must not look like pressure to tests that are not about it.
        # (0 turns a brake off; `{"thresholds": {}}` keeps the defaults.)
        cfg.setdefault("thresholds", dict.fromkeys(HOST_BRAKES, 0.0))
        # Nor parked containers to tests that count containers or are about other things
        # (`{"pool": {}}` keeps the default pool: the pool's, chaos and fault tests do).
        cfg.setdefault("pool", {"size": 0})
        self.config = cfg
        self.config_path.write_text(json.dumps(cfg))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"daemon-{self.port}.log"

    def start(self, timeout: float = 30.0) -> DaemonProc:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        nats = ["--nats", self.nats_url] if self.nats_url else []  # None: the embedded server
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "supervisor",
                "serve",
                *nats,
                "--data-dir",
                str(self.data_dir),
                "--config",
                str(self.config_path),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited early:\n{self.log()}")
            if url_file(self.data_dir).exists() and self._started():
                return self
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready:\n{self.log()}")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _started(self) -> bool:
        """The daemon pulls work (its `started` readiness check passes)."""
        try:
            _, body = self.get("/readyz")
        except OSError:
            return False
        return bool(json.loads(body)["checks"].get("started", {}).get("ok"))

    @property
    def token(self) -> str | None:
        """The daemon's bearer token: the configured one, else the one it made in its data
        dir at its first start."""
        configured = self.config.get("http", {}).get("token")
        if configured:
            return str(configured)
        return stored_token(self.data_dir)

    def client(self, token: str | None = None) -> Client:
        """A `supervisor.client.Client` of this daemon (with its token unless `token` is
        given; "" for none), every answer checked against the OpenAPI document."""
        token = self.token if token is None else token
        return Client(self.base_url, token=token or None, timeout_s=30, on_answer=check_answer)

    def get(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        return self.request("GET", path, token=token)

    def request(
        self, method: str, path: str, body: bytes | None = None, token: str | None = None
    ) -> tuple[int, bytes]:
        """One HTTP request to the daemon: (status, body); HTTP errors are answers too.
        Every answer is checked against the OpenAPI document (`ContractBreach`)."""
        headers = {"Content-Type": "application/json"}
        token = self.token if token is None else token  # "": send none
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(
            self.base_url + path, data=body, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, answer, ctype = resp.status, resp.read(), resp.headers["Content-Type"]
        except urllib.error.HTTPError as e:
            status, answer, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        check_answer(method, path, status, answer, ctype or "")
        return status, answer

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def node_containers(
    docker_client: Any, node_id: str, *labels: str, status: str | None = None
) -> set[str]:
    """The ids of the containers a supervisor made for `node_id` (with `labels` too, and in
    Docker's `status` when given), as Docker lists them now."""
    flt: dict[str, Any] = {
        "label": ["supervisor.managed=true", f"supervisor.node={node_id}", *labels]
    }
    if status is not None:
        flt["status"] = status
    return {c["Id"] for c in docker_client.api.containers(all=True, filters=flt)}


def remove_managed_containers(node_id: str = "n1") -> int:
    """Force-remove every container a supervisor labelled for `node_id` (benchmarks clean up
    after a daemon they SIGKILLed); returns how many."""
    import docker

    client = docker.from_env(version="1.41")
    try:
        found = client.containers.list(all=True, filters={"label": f"supervisor.node={node_id}"})
        for c in found:
            c.remove(force=True, v=True)
        return len(found)
    finally:
        client.close()


def submit(
    nats_url: str, data_dir: Path, spec: dict[str, Any], *args: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor",
            "submit",
            "-",
            "--nats",
            nats_url,
            "--data-dir",
            str(data_dir),
            *args,
        ],
        input=json.dumps(spec).encode(),
        capture_output=True,
        timeout=180,
        check=False,
    )


def task(script: str, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"image": SANDBOX_IMAGE, "command": ["sh", "-c", script]}
    doc.update(extra)
    return doc


def wait_until(cond: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll `cond` every 0.1 s until it is true; AssertionError naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def running_task_container(
    docker_client: Any, nats_url: str, task_id: str, timeout: float = 60
) -> str:
    """The id of the container running `task_id` now, waited for: read from the task's
    `container.created` events (a warm pool's container names no task in its labels), and
    running by Docker's account."""
    import asyncio

    from schemas import ContainerCreated
    from testing.stream import stream_events

    found: list[str] = []

    def up() -> bool:
        events = asyncio.run(stream_events(nats_url, f"sup.container.created.*.{task_id}"))
        ids = [e.container_id for e in events if isinstance(e, ContainerCreated)]
        running = {
            c.id
            for c in docker_client.containers.list(filters={"status": "running"})
            if c.id in ids
        }
        found[:] = [i for i in ids if i in running]
        return bool(found)

    wait_until(up, timeout, f"the container of {task_id} to run")
    return found[-1]
