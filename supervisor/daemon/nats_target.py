"""The NATS a node or a one-shot command uses: the URL it is given, else the configured
one, else the one the data dir's running daemon wrote, else an embedded server of its own
(started with the data dir's credentials, its streams made by its `admin` user). Apart from
`supervisor.daemon.node` so that a command that only publishes (`submit`, `node retire`)
does not import the Docker engine's side."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from nats.js.api import StreamConfig

from schemas.config import Config
from schemas.errors import NatsUnavailable, NoDaemon
from supervisor.daemon.datadir import node_signer
from supervisor.eventlog.emitter import new_id
from supervisor.eventlog.log import EventLog
from supervisor.eventlog.nats_auth import ensure_credentials, with_user, write_server_config
from supervisor.eventlog.nats_client import default_stream_configs, provision_streams
from supervisor.eventlog.nats_server import NatsServer, config_path, resolve_nats_url
from supervisor.eventlog.streams import (
    commands_stream_config,
    events_stream_config,
    tasks_stream_config,
)

__all__ = ["connected_event_log", "events_stream", "nats_for", "node_nats", "stream_configs"]


@contextlib.asynccontextmanager
async def nats_for(cli_url: str | None, data_dir: Path) -> AsyncIterator[str]:
    """The NATS URL to use; starts (and finally stops) the embedded server if none is known."""
    async with node_nats(cli_url, data_dir) as (url, _):
        yield url


@contextlib.asynccontextmanager
async def connected_event_log(
    config: Config, nats_url: str | None, purpose: str
) -> AsyncIterator[EventLog]:
    """An event log of a one-shot command (`submit`, `node retire`) on the NATS that
    `nats_url` (else the configuration, else the data dir) names, connected: NatsUnavailable
    ("cannot <purpose> without NATS") when it does not connect within 10 s. Closed (its
    events flushed, within 5 s) on the way out."""
    data_dir = Path(config.data_dir).resolve()
    if resolve_nats_url(nats_url or config.nats_target, data_dir) is None:
        # An embedded server of its own would hold nothing and run nothing: say so, and
        # leave no data dir behind.
        raise NoDaemon(purpose, str(data_dir))
    async with nats_for(nats_url or config.nats_target, data_dir) as url:
        events = EventLog(
            data_dir,
            url,
            instance_id=new_id()[:16],
            stream=events_stream(config),
            signer=node_signer(data_dir, config.signing.seed_file, config.nats.nkey_seed),
        )
        await events.start()
        try:
            if not await events.wait_connected(10):
                raise NatsUnavailable(url, f"cannot {purpose} without NATS")
            yield events
        finally:
            await events.close(5.0)


@contextlib.asynccontextmanager
async def node_nats(
    cli_url: str | None,
    data_dir: Path,
    streams: list[StreamConfig] | None = None,
    *,
    configure: bool = False,
) -> AsyncIterator[tuple[str, NatsServer | None]]:
    """The NATS to use, and the embedded server if this process starts it. A server it
    starts has its streams made (`streams`, else the defaults) by its `admin` user, and with
    `configure` (the daemon) brought to their configuration; then only `node` is used."""
    url = resolve_nats_url(cli_url, data_dir)
    if url is not None:
        yield url, None
        return
    # Never anonymous: the data dir's users, made on its first start (supervisor.eventlog.nats_auth).
    creds = ensure_credentials(data_dir)
    conf = write_server_config(data_dir, config_path(data_dir), creds)
    server = NatsServer(data_dir / "nats", conf=conf)
    url = server.start()
    try:
        configs = streams if streams is not None else default_stream_configs()
        await provision_streams(with_user(url, "admin", creds.admin), configs, update=configure)
        yield with_user(url, "node", creds.node), server
    finally:
        server.stop()


def stream_configs(config: Config) -> list[StreamConfig]:
    """`SUP_EVENTS`, `SUP_TASKS` and `SUP_COMMANDS` as `config` wants them."""
    sc = config.scheduling
    return [
        events_stream(config),
        tasks_stream_config(sc.queue_bound_per_priority, config.nats.replicas),
        commands_stream_config(config.nats.replicas),
    ]


def events_stream(config: Config) -> StreamConfig:
    """`SUP_EVENTS` as `config` wants it: its copies and its retention (`[events]`)."""
    return events_stream_config(
        config.nats.replicas, config.events.max_age_s(), config.events.max_bytes
    )
