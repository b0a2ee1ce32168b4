"""The Docker adapter: the only module that calls docker-py for task containers.

A task container's own calls (create, start, wait, inspect, kill, remove) are made on the
event loop (`supervisor.docker.aio`) when the engine is on a Unix socket; every other
blocking docker-py call runs in this adapter's own thread pool (the default executor is
far too small for one streaming thread per running container). Every library error is
translated into the project's exception tree: connection failures -> DockerUnavailable,
5xx -> DockerApiError, a missing image -> ImageNotFound, a missing container ->
ContainerVanished.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import docker
import docker.errors
import docker.types
import requests.exceptions
import urllib3.exceptions
from docker.utils.socket import STDERR, STDOUT, frames_iter_no_tty

from schemas.errors import (
    ContainerVanished,
    DockerApiError,
    DockerError,
    DockerRequestRefused,
    DockerUnavailable,
    ImageNotFound,
    RuntimeUnavailable,
)
from schemas.labels import node_filter
from supervisor.docker.aio import EngineCalls
from supervisor.docker.gvisor import RuntimeInfo, boot_logs, engine_runtimes, host_pids
from supervisor.docker.internals import close_socket, share_unix_pool, unix_socket_path

__all__ = [
    "ContainerRequest",
    "ContainerState",
    "DockerRuntime",
    "EventStream",
    "Output",
    "read_output",
    "translate",
    "write_stdin",
]

T = TypeVar("T")


def translate(operation: str, e: BaseException) -> DockerError:
    """Map a docker-py / transport exception to the project's class (by type, not text)."""
    if isinstance(e, DockerError):
        return e
    if isinstance(e, docker.errors.ImageNotFound):
        return ImageNotFound(operation, str(e.explanation or e))
    if isinstance(e, docker.errors.NotFound):
        return ContainerVanished(operation, str(e.explanation or e))
    if isinstance(e, docker.errors.APIError) and e.is_client_error():
        return DockerRequestRefused(
            operation, f"HTTP {e.status_code}: {e.explanation}", status=e.status_code
        )
    if isinstance(e, docker.errors.APIError):
        return DockerApiError(
            operation, f"HTTP {e.status_code}: {e.explanation}", status=e.status_code
        )
    if isinstance(
        e,
        requests.exceptions.ConnectionError
        | requests.exceptions.Timeout
        | urllib3.exceptions.HTTPError
        | aiohttp.ClientError
        | TimeoutError
        | ConnectionError
        | FileNotFoundError
        | docker.errors.DockerException,
    ):
        return DockerUnavailable(operation, type(e).__name__)
    return DockerApiError(operation, type(e).__name__)


@dataclass
class ContainerState:
    exit_code: int | None
    oom_killed: bool
    running: bool
    status: str


@dataclass
class Output:
    """What a container printed, each stream capped; `*_bytes` count everything seen."""

    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False


@dataclass
class ContainerRequest:
    """Everything `create` needs; built by the executor from a spec and the config."""

    image: str
    command: list[str]
    labels: dict[str, str]
    env: dict[str, str]
    workspace: str
    workspace_mount: str
    user: str
    memory_mb: int
    cpus: float
    pids: int
    tmpfs_size: str
    network: str = "none"
    privileged: bool = False
    cap_add: list[str] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    name: str | None = None
    stdin: bool = False
    """Open the container's stdin (written through the attach socket, see `write_stdin`)."""
    runtime: RuntimeInfo | None = None
    """The OCI runtime (None: the engine's default). Under gVisor the task's process limit
    is `RLIMIT_NPROC` and the pids cgroup a backstop (`supervisor.docker.gvisor`)."""


class EventStream:
    """The engine's event stream (`DockerRuntime.open_events`): iterate it (a thread's
    blocking loop); `close` from another thread ends the iteration."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._stream
        except Exception as e:
            raise translate("events", e) from e

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self._stream.close()


class DockerRuntime:
    """Async façade over docker-py. Thread-safe; one per process."""

    # A fixed API version keeps construction offline: a daemon that is down at start-up
    # surfaces as DockerUnavailable on the first call, not as a crash. 1.41 = Docker 20.10.
    API_VERSION = "1.41"
    IMAGE_CACHE_S = 10.0
    RUNTIMES_CACHE_S = 10.0
    REMOVAL_WAIT_S = 10.0

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float = 60,
        workers: int = 64,
        shared_pool: bool = True,
    ) -> None:
        """`shared_pool` False leaves docker-py's connection pools as it makes them (the
        benchmark's baseline; `supervisor.docker.internals`)."""
        try:
            if base_url:
                self.client = docker.DockerClient(
                    base_url=base_url,
                    version=self.API_VERSION,
                    timeout=timeout,
                    max_pool_size=workers,
                )
            else:
                self.client = docker.from_env(
                    version=self.API_VERSION, timeout=timeout, max_pool_size=workers
                )
        except docker.errors.DockerException as e:
            raise DockerUnavailable("connect", type(e).__name__) from e
        self.api = self.client.api
        self.shared_pool = share_unix_pool(self.api) if shared_pool else False
        # The loop's own calls read docker-py's internals too: only where those were
        # checked (the pinned version, a Unix socket); else docker-py's public API.
        socket_path = unix_socket_path(self.api) if self.shared_pool else None
        self.calls = EngineCalls(socket_path, self.API_VERSION, timeout) if socket_path else None
        """A task container's own calls, on the loop (None: all through docker-py)."""
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docker")
        self._images: dict[str, float] = {}
        self._runtimes: tuple[float, dict[str, RuntimeInfo]] = (0.0, {})

    async def _call(self, operation: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kw))
        except DockerError:
            raise
        except Exception as e:
            raise translate(operation, e) from e

    async def _request(
        self, operation: str, calls: EngineCalls, method: str, path: str, **kw: Any
    ) -> Any:
        """`calls.call(method, path, **kw)`, its errors translated as docker-py's are."""
        return await self._translated(operation, calls.call(method, path, **kw))

    @staticmethod
    async def _translated(operation: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except DockerError:
            raise
        except Exception as e:
            raise translate(operation, e) from e

    def run_blocking(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run a blocking callable in the adapter's pool (for streaming readers)."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def open_events(self, filters: dict[str, Any], since: float | None) -> EventStream:
        """Blocking: the engine's events matching `filters`, from `since` (a UNIX time;
        None: from now) on, as they come. Raises DockerUnavailable or DockerApiError when
        the stream cannot be opened; iterating raises them when it breaks."""
        try:
            return EventStream(self.api.events(decode=True, filters=filters, since=since))
        except Exception as e:
            raise translate("events", e) from e

    async def ping(self) -> None:
        await self._call("ping", self.api.ping)

    async def image_exists(self, image: str) -> bool:
        """Whether the image is present locally. A positive answer is cached for
        `IMAGE_CACHE_S` (an image removed meanwhile shows up as ImageNotFound at create)."""
        now = time.monotonic()
        if self._images.get(image, 0.0) > now:
            return True
        try:
            await self._call("inspect_image", self.api.inspect_image, image)
        except (ImageNotFound, ContainerVanished):
            self._images.pop(image, None)
            return False
        self._images[image] = now + self.IMAGE_CACHE_S
        return True

    async def runtimes(self) -> dict[str, RuntimeInfo]:
        """The OCI runtimes the engine has registered, by name (cached `RUNTIMES_CACHE_S`).
        Raises DockerUnavailable / DockerApiError when the engine cannot say."""
        at, known = self._runtimes
        if time.monotonic() - at < self.RUNTIMES_CACHE_S:
            return known
        known = engine_runtimes(await self._call("info", self.api.info))
        self._runtimes = (time.monotonic(), known)
        return known

    async def runtime_info(self, name: str) -> RuntimeInfo:
        """The engine's runtime `name`; raises RuntimeUnavailable when it has none of that
        name (never a retried DockerApiError: the engine is fine, the node lacks it)."""
        known = await self.runtimes()
        if name not in known:
            raise RuntimeUnavailable(
                f"runtime {name!r} is not registered with the Docker engine "
                f"(it has: {', '.join(sorted(known)) or 'none'})"
            )
        return known[name]

    async def create(self, req: ContainerRequest) -> str:
        rt = req.runtime
        gvisor = rt is not None and rt.gvisor
        host_config = self.api.create_host_config(
            runtime=rt.name if rt is not None else None,
            ulimits=[docker.types.Ulimit(name="nproc", soft=req.pids, hard=req.pids)]
            if gvisor
            else None,
            init=True,
            network_mode=req.network,
            cap_drop=["ALL"],
            cap_add=req.cap_add or None,
            privileged=req.privileged,
            security_opt=["no-new-privileges"],
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={req.tmpfs_size},mode=1777"},
            pids_limit=host_pids(req.pids) if gvisor else req.pids,
            mem_limit=f"{req.memory_mb}m",
            memswap_limit=f"{req.memory_mb}m",
            nano_cpus=int(req.cpus * 1e9),
            binds=_binds(req),
        )
        config = dict(
            user=req.user,
            environment=req.env,
            labels=req.labels,
            working_dir=req.workspace_mount,
            host_config=host_config,
            network_disabled=req.network == "none",
            stdin_open=req.stdin,  # and so StdinOnce: stdin ends when the write ends
            tty=False,
        )
        calls = self.calls
        if calls is None:
            resp = await self._call(
                "create", self.api.create_container, req.image, req.command, name=req.name, **config
            )
            return str(resp["Id"])
        # The body docker-py would send, without the proxy variables of the Docker client's
        # own config file that it adds to the environment: a task's is its spec's.
        body = self.api.create_container_config(req.image, req.command, **config)
        resp = await self._request(
            "create",
            calls,
            "POST",
            "/containers/create",
            params={"name": req.name} if req.name else None,
            body={k: v for k, v in body.items() if v is not None},
        )
        return str(resp["Id"])

    async def attach(self, container_id: str, *, stdin: bool = False) -> Any:
        """Open the raw output socket (multiplexed frames). Call before `start`: the engine
        subscribes the stream before it answers, so no byte printed afterwards is missed;
        what was printed before is not replayed (the engine's `logs` replay, read from its
        log file while the stream already runs, would double what a container started at
        once prints meanwhile). `read_output` drains and closes it. With `stdin`, the
        socket also takes the container's standard input (`write_stdin`)."""
        path = _container("attach", container_id, "/attach")
        params = {"stdout": "1", "stderr": "1", "stream": "1"}
        if stdin:
            params["stdin"] = "1"
        if (calls := self.calls) is None:
            return await self._call("attach", self.api.attach_socket, container_id, params=params)
        return await self._translated("attach", calls.attach(path, params))

    async def start(self, container_id: str) -> None:
        path = _container("start", container_id, "/start")
        if (calls := self.calls) is None:
            await self._call("start", self.api.start, container_id)
        else:
            await self._request("start", calls, "POST", path)

    async def wait(self, container_id: str) -> int:
        path = _container("wait", container_id, "/wait")
        if (calls := self.calls) is None:
            resp = await self._call("wait", self.api.wait, container_id, timeout=None)
        else:
            resp = await self._request("wait", calls, "POST", path, wait=True)
        return int(resp.get("StatusCode", -1))

    async def _inspect(self, container_id: str) -> dict[str, Any]:
        path = _container("inspect", container_id, "/json")
        if (calls := self.calls) is None:
            return await self._call("inspect", self.api.inspect_container, container_id)
        return dict(await self._request("inspect", calls, "GET", path))

    async def inspect(self, container_id: str) -> ContainerState:
        attrs = await self._inspect(container_id)
        st = attrs.get("State") or {}
        running = bool(st.get("Running"))
        return ContainerState(
            exit_code=None if running else st.get("ExitCode"),
            oom_killed=bool(st.get("OOMKilled")),
            running=running,
            status=str(st.get("Status", "")),
        )

    async def labels(self, container_id: str) -> dict[str, str]:
        attrs = await self._inspect(container_id)
        return dict((attrs.get("Config") or {}).get("Labels") or {})

    async def kill(self, container_id: str, signal: str = "SIGKILL") -> bool:
        """False when there was nothing to kill (already exited or gone)."""
        try:
            path = _container("kill", container_id, "/kill")
            if (calls := self.calls) is None:
                await self._call("kill", self.api.kill, container_id, signal=signal)
            else:
                await self._request("kill", calls, "POST", path, params={"signal": signal})
        except ContainerVanished:
            return False
        except DockerApiError as e:
            if e.status == 409:  # not running: nothing to kill
                return False
            raise
        return True

    async def remove(self, container_id: str, *, gvisor: bool = True) -> bool:
        """Force-remove with volumes, and what a gVisor runtime left of it (its boot log;
        `gvisor=False` for a container known to have run under another runtime, whose
        removal then lists no boot log dir). True if it was already gone, or another
        removal (a cleanup command, a `docker rm -f`) held it and it is gone now."""
        deadline = time.monotonic() + self.REMOVAL_WAIT_S
        while True:
            try:
                await self._remove(container_id)
            except ContainerVanished:
                gone = True
            except DockerRequestRefused as e:
                # A forced removal is refused (409) only while another removal holds the
                # container: asked again, it ends gone (that removal succeeded), or removed
                # here (that removal failed).
                if e.status != 409 or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.05)
                continue
            else:
                gone = False
            if gvisor:
                await self._forget_boot_logs(container_id)
            return gone

    async def _remove(self, container_id: str) -> None:
        path = _container("remove", container_id)
        if (calls := self.calls) is None:
            await self._call("remove", self.api.remove_container, container_id, force=True, v=True)
        else:
            await self._request("remove", calls, "DELETE", path, params={"v": "1", "force": "1"})

    async def _forget_boot_logs(self, container_id: str) -> None:
        """Delete the gVisor boot log of a removed container (an attempt reads and deletes
        its own; this one is a reconciler's removal, or a parked container's)."""
        try:
            dirs = {i.fork_log_dir for i in (await self.runtimes()).values() if i.fork_log_dir}
        except DockerError:
            return
        for d in dirs:
            await asyncio.to_thread(boot_logs(d).discard, container_id)

    async def list_managed(self, node_id: str) -> list[dict[str, Any]]:
        filters = {"label": node_filter(node_id)}
        return await self._call("list", self.api.containers, all=True, filters=filters)

    @contextlib.asynccontextmanager
    async def pooled(self) -> AsyncIterator[None]:
        """While open, this loop's engine calls share keep-alive connections (`EngineCalls`
        `.pooled`): for a process that runs many tasks on one loop, the daemon's node."""
        if self.calls is None:
            yield
            return
        async with self.calls.pooled():
            yield

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


_CONTAINER_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""A container's id or name as the engine makes them: never a `/` or a `..` alone, which
the engine's router would resolve to another endpoint (a forged cleanup command's
`container/../../images/...` is an image)."""


def _container(operation: str, container_id: str, action: str = "") -> str:
    """The API path of a container; ContainerVanished (there is no such container) for a
    reference that is not an id or a name."""
    if not _CONTAINER_REF.fullmatch(container_id) or set(container_id) == {"."}:
        raise ContainerVanished(operation, f"no such container: {container_id[:80]!r}")
    return f"/containers/{container_id}{action}"


def _binds(req: ContainerRequest) -> dict[str, dict[str, str]]:
    binds = {req.workspace: {"bind": req.workspace_mount, "mode": "ro"}}
    for m in req.mounts:
        binds[str(m["source"])] = {
            "bind": str(m["target"]),
            "mode": "ro" if m.get("read_only", True) else "rw",
        }
    return binds


def write_stdin(raw: socket.socket, data: bytes) -> None:
    """Send `data` as the container's standard input on `raw` (`stdin_socket`'s own
    socket), end it (half-close: the output keeps flowing) and close `raw`. Blocking: runs
    in the adapter's pool. A script that exits without reading all of it ends the write
    quietly (see `end_stdin`)."""
    with raw:
        try:
            raw.sendall(data)
            raw.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            pass


def read_output(sock: Any, cap: int, out: Output, on_overflow: Callable[[], None]) -> Output:
    """Drain an attach socket into `out`, keeping at most `cap` bytes per stream.

    Blocking: runs in the adapter's pool. Past the cap the rest is counted and dropped, and
    `on_overflow` is called once, so memory stays bounded whatever the script prints.
    """
    overflowed = False
    try:
        for stream_id, chunk in frames_iter_no_tty(sock):
            if not chunk or stream_id not in (STDOUT, STDERR):
                continue
            if stream_id == STDOUT:
                buf, seen = out.stdout, out.stdout_bytes
                out.stdout_bytes += len(chunk)
            else:
                buf, seen = out.stderr, out.stderr_bytes
                out.stderr_bytes += len(chunk)
            room = cap - seen
            if room > 0:
                buf += chunk[:room]
            if len(chunk) > max(room, 0):
                if stream_id == STDOUT:
                    out.stdout_truncated = True
                else:
                    out.stderr_truncated = True
                if not overflowed:
                    overflowed = True
                    on_overflow()
    except (OSError, ValueError):
        pass  # the stream ends with the container; a broken stream ends it early
    finally:
        close_socket(sock)
    return out
