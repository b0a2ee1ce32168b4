"""Fixtures: a real nats-server per test, a real Docker engine, and the suite's leak check.

Each test that needs NATS gets its own server and store dir, started as users start it.
The session ends by asserting that nothing the supervisor manages was left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.eventlog.nats_server import NatsServer
from testing.daemon import SANDBOX_IMAGE, DaemonProc

__all__ = ["SANDBOX_IMAGE"]  # the tests import it from here
# Per test session, so that the leak check sees only this session's dirs.
_TMP_PREFIX = f"suptest-{os.getpid()}-"


def _docker_client():  # type: ignore[no-untyped-def]
    import docker

    return docker.from_env(timeout=30)


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    """A temp dir that is removed after the test (the leak check looks for leftovers)."""
    d = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def module_tmp_dir() -> Iterator[Path]:
    """`tmp_dir` shared by a module's tests (one daemon for several attacks)."""
    d = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemons() -> Iterator[list[DaemonProc]]:
    """The `supervisor serve` processes a test starts; each is stopped afterwards."""
    started: list[DaemonProc] = []
    yield started
    for d in started:
        d.stop()


@pytest.fixture
def nats_server(tmp_dir: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_dir / "nats-store")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
def docker_client():  # type: ignore[no-untyped-def]
    client = _docker_client()
    client.ping()
    client.images.get(SANDBOX_IMAGE)
    yield client
    client.close()


def _managed_containers() -> list[str]:
    client = _docker_client()
    try:
        return [
            c.id
            for c in client.containers.list(all=True, filters={"label": "supervisor.managed=true"})
        ]
    finally:
        client.close()


def _leftover_temp_dirs() -> list[str]:
    return sorted(str(p) for p in Path(tempfile.gettempdir()).glob(_TMP_PREFIX + "*"))


def _nats_children() -> list[int]:
    import psutil

    me = psutil.Process()
    return [
        p.pid
        for p in me.children(recursive=True)
        if (p.name() or "") in {"nats-server", "dockerd", "containerd"}
    ]


def projection_services() -> set[int]:
    """Projection processes (`python -m supervisor.compose.projection_service`) anywhere on the host: one
    whose daemon was killed is no longer a child of anything the suite started."""
    import psutil

    return {
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if "supervisor.compose.projection_service" in (p.info["cmdline"] or [])
    }


def _boot_logs() -> set[str]:
    """gVisor's boot logs (`supervisor.docker.gvisor`): each belongs to one container."""
    return {str(p) for p in Path("/var/log/runsc").glob("runsc.log.*.boot.txt")}


@pytest.fixture(scope="session", autouse=True)
def _suite_leaves_nothing_behind() -> Iterator[None]:
    """After the whole suite: no managed container, no temp dir, no nats-server child, no
    projection process, no gVisor boot log of a container it made."""
    before = set(_managed_containers())
    services_before = projection_services()
    logs_before = _boot_logs()
    yield
    logs = sorted(_boot_logs() - logs_before)
    assert not logs, f"the suite left gVisor boot logs: {logs}"
    left = sorted(set(_managed_containers()) - before)
    dirs = _leftover_temp_dirs()
    servers = _nats_children()
    services = sorted(projection_services() - services_before)
    assert not left, f"the suite leaked managed containers: {left}"
    assert not dirs, f"the suite leaked temp dirs: {dirs}"
    assert not servers, f"the suite leaked server processes (nats-server, dockerd): {servers}"
    assert not services, f"the suite leaked projection processes: {services}"
