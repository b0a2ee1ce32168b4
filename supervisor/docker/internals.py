"""docker-py's internals, quarantined: the only module of the project that reads them.

Three things the public API does not give, each measured and each with a fallback:

- **One keep-alive connection pool for every call** (`share_unix_pool`). docker-py's
  Unix-socket adapter keeps one pool per request URL, and a container's URLs are its own
  (`/containers/<id>/start`, ...): nearly every call made a new connection to dockerd and
  evicted an older pool. The adapter is `APIClient._custom_adapter`, a private attribute.
  `bench/bench_executor.py --public` measures what sharing gains.
- **What an attach socket holds** (`close_socket`): docker-py hands the standard library's
  `socket.SocketIO`, whose OS socket (`_sock`) its `close` leaves open, and hangs the HTTP
  response that owns it on `_response`; all three are closed here when present (else the
  garbage collector closes them later, with a `ResourceWarning`). Writing the container's
  stdin and shutting the connection down use public calls only: `fileno()`, and a
  duplicate of that descriptor (`stdin_socket`).
- **docker-py's judgement of an error answer** (`api_error`) for a request made without it
  (`supervisor.docker.aio`, used only where `share_unix_pool` took, on the socket path its
  adapter holds: `unix_socket_path`): its `create_api_error_from_http_exception` takes a
  `requests` response, built here from the answer's status and body (`Response._content`,
  how requests itself fills one).

`pyproject.toml` pins docker-py to the version this was written against
(`DOCKER_PY_VERSION`); `shared_pool_supported` checks that version and the shapes read
here, and without them the client is left as docker-py made it (one pool per URL: slower,
still correct). `tests/test_docker_internals.py` runs both ways against a real dockerd.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import os
import socket
from typing import Any

import docker
import docker.errors
import requests
from docker.transport.unixconn import UnixHTTPAdapter, UnixHTTPConnectionPool

DOCKER_PY_VERSION = "7.2.0"
"""The docker-py this module was written against (and `pyproject.toml` pins)."""

_GET_CONNECTION = ["self", "url", "proxies"]


def shared_pool_supported(api: Any) -> bool:
    """Whether this docker-py is the pinned one and `api` has the adapter shape
    `share_unix_pool` replaces (an unchanged `UnixHTTPAdapter` with its `pools`)."""
    try:
        if importlib.metadata.version("docker") != DOCKER_PY_VERSION:
            return False
    except importlib.metadata.PackageNotFoundError:
        return False
    adapter = getattr(api, "_custom_adapter", None)
    if type(adapter) is not UnixHTTPAdapter:
        return False
    params = list(inspect.signature(UnixHTTPAdapter.get_connection).parameters)  # type: ignore[union-attr]
    needed = ("socket_path", "timeout", "max_pool_size", "pools")
    return params == _GET_CONNECTION and all(hasattr(adapter, a) for a in needed)


class _SharedPoolAdapter(UnixHTTPAdapter):
    """Every URL reaches the same socket, so one pool serves them all."""

    def get_connection(self, url: str, proxies: Any = None) -> UnixHTTPConnectionPool:
        with self.pools.lock:
            pool = self.pools.get(self.socket_path)
            if pool is None:
                pool = UnixHTTPConnectionPool(
                    "http+docker://localhost",
                    self.socket_path,
                    self.timeout,
                    maxsize=self.max_pool_size,
                )
                self.pools[self.socket_path] = pool
        return pool


def share_unix_pool(api: docker.APIClient) -> bool:
    """On a Unix socket: one keep-alive pool for all calls, and no proxy lookup (requests
    scans the environment for proxy settings on every call; a Unix socket takes none).
    Returns whether it did; other transports, and another docker-py, are left as made."""
    if not shared_pool_supported(api):
        return False
    adapter = api._custom_adapter
    shared = _SharedPoolAdapter(
        "http+unix://" + adapter.socket_path, adapter.timeout, max_pool_size=adapter.max_pool_size
    )
    adapter.close()
    api._custom_adapter = shared
    api.mount("http+docker://", shared)
    api.trust_env = False
    return True


def unix_socket_path(api: docker.APIClient) -> str | None:
    """The engine's socket path when `api` reaches it over a Unix socket (its adapter's
    `socket_path`), else None."""
    adapter = getattr(api, "_custom_adapter", None)
    path = getattr(adapter, "socket_path", None) if isinstance(adapter, UnixHTTPAdapter) else None
    return path if isinstance(path, str) else None


def stdin_socket(sock: Any) -> socket.socket:
    """A socket of its own on the connection of attach socket `sock` (a duplicate of its
    descriptor): what the container's stdin is written on and half-closed, by a thread
    that closes it when done. Raises `ValueError` or `OSError` when `sock` is closed."""
    return socket.socket(fileno=os.dup(sock.fileno()))


def close_socket(sock: Any) -> None:
    """Close an attach socket and the HTTP response that owns it (docker-py leaves both).
    The connection is shut down first: a thread blocked writing the container's stdin on
    its own duplicate returns at once (a close alone would leave it blocked)."""
    with contextlib.suppress(OSError, ValueError, AttributeError), stdin_socket(sock) as dup:
        dup.shutdown(socket.SHUT_RDWR)
    for obj in (sock, getattr(sock, "_sock", None), getattr(sock, "_response", None)):
        close = getattr(obj, "close", None)
        if close is not None:
            with contextlib.suppress(OSError, ValueError):
                close()


def api_error(status: int, reason: str, url: str, body: bytes) -> docker.errors.APIError:
    """The exception docker-py raises for the engine's error answer `status` with `body`
    (`ImageNotFound`, `NotFound`, `APIError`: it reads the message the engine sent)."""
    response = requests.Response()
    response.status_code, response.reason, response.url = status, reason, url
    response._content = body
    try:
        response.raise_for_status()
    except requests.exceptions.HTTPError as e:
        try:
            docker.errors.create_api_error_from_http_exception(e)
        except docker.errors.APIError as judged:
            return judged
    return docker.errors.APIError(f"HTTP {status}", response=response)
