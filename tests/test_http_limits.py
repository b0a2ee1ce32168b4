"""What an HTTP client may not do to the daemon: wedge it with bad parameters, slow heads
or bodies, or more connections than it serves. Against a real daemon, by raw sockets."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.daemon import DaemonProc


@pytest.fixture(scope="module")
def daemon(module_tmp_dir: Path, docker_client) -> Iterator[DaemonProc]:  # type: ignore[no-untyped-def]
    d = DaemonProc(
        module_tmp_dir / "data",
        None,
        {"http": {"header_timeout_s": 1.0, "body_timeout_s": 1.0, "max_connections": 24}},
    ).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/errors?limit=0",
        "/v1/errors?limit=-5",
        "/v1/errors?limit=abc",
        "/v1/tasks?limit=%C2%B9",
        "/v1/tasks?limit=0",
        "/v1/tasks?cursor=%D9%A3",
        "/v1/tasks?limit=99999999999999999999999",
    ],
)
def test_a_bad_parameter_is_a_400_that_names_it(daemon: DaemonProc, path: str) -> None:
    status, body = daemon.get(path)

    assert status == 400
    error = json.loads(body)["error"]
    name = path.split("?")[1].split("=")[0]
    assert error["type"] == "validation"
    assert f"{name} '" in error["message"]


def _connect(d: DaemonProc) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    s.settimeout(5)
    return s


def _closed_within(s: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed `s` within `seconds`, and what it sent before."""
    s.settimeout(seconds)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        pass
    return True, got


def test_a_client_that_never_finishes_its_head_is_cut_off(daemon: DaemonProc) -> None:
    s = _connect(daemon)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: never ends
        closed, got = _closed_within(s, 5)
    finally:
        s.close()

    assert (closed, got) == (True, b"")


def test_a_body_that_never_comes_is_a_408_and_a_huge_one_a_413_at_once(
    daemon: DaemonProc,
) -> None:
    slow, huge = _connect(daemon), _connect(daemon)
    try:
        auth = f"Authorization: Bearer {daemon.token}\r\n".encode()
        slow.sendall(
            b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + auth
            + b"Content-Length: 100\r\n\r\n{"
        )
        started = time.monotonic()
        huge.sendall(
            b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + auth
            + b"Content-Length: 2000000000\r\n\r\n"
        )
        huge_answer = huge.recv(4096)
        huge_took = time.monotonic() - started
        slow_answer = slow.recv(4096)
        slow_took = time.monotonic() - started
    finally:
        slow.close()
        huge.close()

    assert huge_answer.startswith(b"HTTP/1.1 413 ")
    assert huge_took < 1.0
    assert slow_answer.startswith(b"HTTP/1.1 408 ")
    assert b"REQUEST_TIMEOUT" in slow_answer
    assert 0.9 <= slow_took < 5


def test_connections_past_the_cap_are_closed_and_the_daemon_still_answers(
    daemon: DaemonProc,
) -> None:
    idle = [_connect(daemon) for _ in range(24)]
    try:
        extra = _connect(daemon)
        with contextlib.suppress(OSError):  # closed before the request could even be sent
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        closed, answer = _closed_within(extra, 3)
        extra.close()
        for s in idle:
            s.close()
        time.sleep(0.3)
        status, _ = daemon.get("/healthz")
    finally:
        for s in idle:
            s.close()

    assert (closed, answer) == (True, b"")  # refused, never served
    assert status == 200
