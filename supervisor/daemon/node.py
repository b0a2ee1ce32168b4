"""Wiring of one node's execution path, owned by an `AsyncExitStack` so teardown runs in
the reverse order of start-up: NATS (embedded when no URL is known) -> event log ->
Docker runtime -> event watcher -> cgroup sampler -> executor."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from schemas import EmbeddedNatsRestarted, SupervisorStarted, SupervisorStopped
from schemas.config import Config
from schemas.errors import ConfigError
from schemas.lifecycle import Keyring
from supervisor.daemon.datadir import node_id_for, node_signer
from supervisor.daemon.nats_target import events_stream, node_nats, stream_configs
from supervisor.docker.observe import CgroupSampler, DockerEventWatcher
from supervisor.docker.runtime import DockerRuntime
from supervisor.eventlog.diskguard import DiskGuard
from supervisor.eventlog.emitter import Emitter, new_id
from supervisor.eventlog.log import EventLog
from supervisor.eventlog.nats_server import NatsWatch
from supervisor.execution.executor import Executor
from supervisor.intake.wait import own_keyring
from supervisor.observability.metrics import Metrics
from supervisor.policy.classify import Classification

__all__ = ["Node", "open_node"]

VERSION = "0.1.0"


@dataclass
class Node:
    config: Config
    data_dir: Path
    instance_id: str
    nats_url: str
    events: EventLog
    emitter: Emitter
    runtime: DockerRuntime
    watcher: DockerEventWatcher
    executor: Executor
    metrics: Metrics
    nats_watch: NatsWatch | None = None
    disk: DiskGuard | None = None
    # This process started the embedded server and configured its streams as its admin.
    provisioned: bool = False
    # Whose signatures make an end count, as this process reads a task's history.
    keyring: Keyring | None = None


@contextlib.asynccontextmanager
async def open_node(
    config: Config,
    *,
    nats_url: str | None,
    role: str = "run",
    flush_timeout: float = 10.0,
    instance_id: str | None = None,
    on_attempt: Callable[[Classification | None], None] | None = None,
    gate: Callable[[], None] | None = None,
) -> AsyncIterator[Node]:
    """Everything a process that runs tasks needs, built in order and closed in reverse:
    NATS (the embedded server if none is known), the event log, the Docker runtime and its
    event watcher, the cgroup sampler and the executor (with the daemon's `on_attempt`
    and `gate`, see `Executor`)."""
    data_dir = Path(config.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    node_id = node_id_for(data_dir, config.node_id, keep=True)
    if node_id != config.node_id:
        config = msgspec.structs.replace(config, node_id=node_id)
    instance_id = instance_id or new_id()[:16]
    signer = node_signer(data_dir, config.signing.seed_file, config.nats.nkey_seed)
    pinned = config.signing.keys.get(node_id)
    if pinned is not None and signer.public_key not in pinned:
        raise ConfigError(
            f"[signing] keys pins node {node_id} to {', '.join(pinned)}, "
            f"not to its own key {signer.public_key}: its events would not count"
        )
    metrics = Metrics()
    async with contextlib.AsyncExitStack() as stack:
        url, server = await stack.enter_async_context(
            node_nats(
                nats_url or config.nats_target,
                data_dir,
                stream_configs(config),
                configure=role == "serve",
            )
        )
        events = EventLog(
            data_dir,
            url,
            instance_id=instance_id,
            stream=events_stream(config),
            signer=signer,
        )
        await events.start()
        stack.push_async_callback(events.close, flush_timeout)
        emitter = Emitter(events, config.node_id, instance_id)
        emitter.emit(SupervisorStarted, version=VERSION, pid=os.getpid(), role=role)
        disk = DiskGuard(
            data_dir,
            min_free_bytes=int(config.thresholds.disk_min_free_mb * 1024 * 1024),
            held=lambda: events.disk_full,
        )
        watch = None
        if server is not None and role == "serve":
            # A daemon keeps the server it started alive (a foreground command just ends).
            def restarted(code: int | None, restarts: int, down_s: float) -> None:
                emitter.emit(
                    EmbeddedNatsRestarted, exit_code=code, restarts=restarts, down_s=down_s
                )

            watch = NatsWatch(server, restarted, space_ok=disk.space_ok)
            watching = asyncio.ensure_future(watch.run())
            stack.push_async_callback(_cancel, watching)
        runtime = DockerRuntime(config.docker_url)
        stack.callback(runtime.close)
        await stack.enter_async_context(runtime.pooled())
        watcher = DockerEventWatcher(runtime, config.node_id)
        watcher.start()
        stack.callback(watcher.stop)
        await watcher.wait_connected(timeout=2.0)
        sampler = CgroupSampler(config.cgroup_sample_s)
        stack.callback(sampler.stop)
        executor = Executor(
            runtime,
            emitter,
            config,
            metrics,
            watcher=watcher,
            sampler=sampler,
            data_dir=data_dir,
            on_attempt=on_attempt,
            gate=gate,
        )
        node = Node(
            config,
            data_dir,
            instance_id,
            url,
            events,
            emitter,
            runtime,
            watcher,
            executor,
            metrics,
            watch,
            disk,
            provisioned=server is not None,
            keyring=own_keyring(config.signing, node_id, signer),
        )
        try:
            yield node
        finally:
            # The removals that followed their tasks' outcomes end before the instance.
            await executor.attempts.drain()
            emitter.emit(SupervisorStopped, reason="exit")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
