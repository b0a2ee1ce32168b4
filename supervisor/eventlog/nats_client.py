"""Connections to NATS and the streams of the contract: `connect_nats` (bounded, with or
without reconnection), `close_quietly`, and `ensure_streams`, which creates `SUP_EVENTS`,
`SUP_TASKS` and `SUP_COMMANDS` or brings an existing one to its configuration."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext

from schemas.connection import connect_options
from schemas.errors import EventLogError, HistoryUnprotected, NatsUnavailable
from schemas.streams import EVENTS_STREAM
from supervisor.eventlog.nats_auth import redact
from supervisor.eventlog.streams import (
    commands_stream_config,
    events_stream_config,
    tasks_stream_config,
)

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
_STREAM_NAME_IN_USE = 10058  # JSStreamNameExistErr: same name, different configuration

# What nats-py raises when the server is unreachable or the connection went away.
CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    nats.errors.NoServersError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


def default_stream_configs() -> list[StreamConfig]:
    return [events_stream_config(), tasks_stream_config(), commands_stream_config()]


async def ensure_streams(
    js: JetStreamContext, configs: Iterable[StreamConfig] | None = None, *, url: str = "nats"
) -> None:
    """Create `SUP_EVENTS`, `SUP_TASKS` and `SUP_COMMANDS` (or `configs`), or update a stream
    that exists with a different configuration. Idempotent.

    Raises `NatsUnavailable` (naming `url`) when NATS or JetStream does not answer, and
    `EventLogError` when a stream cannot be brought to its configuration (e.g. a change the
    server forbids, such as another retention policy).
    """
    for config in default_stream_configs() if configs is None else configs:
        await _ensure_stream(js, config, url)


async def provision_streams(
    url: str, configs: Iterable[StreamConfig], *, update: bool = True
) -> None:
    """Create the streams of `configs` on the NATS of `url` (a credential that may: the
    embedded server's `admin`, or the operator's), and with `update` bring existing ones
    to their configuration; without it an existing stream is left as it is (a passing
    client never resets the daemon's settings). Then check that history is protected
    (`check_history_protected`). Raises NatsUnavailable, EventLogError."""
    nc = await connect_nats(url, reconnect=False, timeout=10.0, name="supervisor-provision")
    try:
        js = nc.jetstream()
        for config in configs:
            if update:
                await _ensure_stream(js, config, url)
            else:
                await ensure_stream_exists(js, config, url)
        await check_history_protected(js, url)
    finally:
        await close_quietly(nc)


async def ensure_stream_exists(js: JetStreamContext, config: StreamConfig, url: str) -> None:
    """Create the stream of `config` if it does not exist; never change one that does (so
    that a credential that may not configure streams only reads here)."""
    try:
        await js.stream_info(config.name or EVENTS_STREAM)
        return
    except nats.js.errors.NotFoundError:
        pass
    except CONNECTION_ERRORS as e:
        raise NatsUnavailable(url, f"JetStream did not answer: {e!r}") from e
    except nats.js.errors.APIError as e:
        raise EventLogError(f"cannot read stream {config.name}: {e}") from e
    await _ensure_stream(js, config, url)


async def check_history_protected(js: JetStreamContext, url: str = "nats") -> None:
    """Raise `HistoryUnprotected` unless `SUP_EVENTS` denies deletes and purges (a stream
    that lost them, or was made without them, could be erased through the API)."""
    try:
        config = (await js.stream_info(EVENTS_STREAM)).config
    except nats.js.errors.NotFoundError as e:
        raise HistoryUnprotected(f"{EVENTS_STREAM} does not exist") from e
    except CONNECTION_ERRORS as e:
        raise NatsUnavailable(url, f"JetStream did not answer: {e!r}") from e
    if not (config.deny_delete and config.deny_purge):
        raise HistoryUnprotected(
            f"{EVENTS_STREAM} allows {'deletes' if not config.deny_delete else 'purges'} "
            "through the API (deny_delete and deny_purge must be set: the stream's admin "
            "sets them, and they cannot be taken back)"
        )


async def _ensure_stream(js: JetStreamContext, config: StreamConfig, url: str) -> None:
    try:
        try:
            await js.add_stream(config)
            return
        except nats.js.errors.BadRequestError as e:
            if e.err_code != _STREAM_NAME_IN_USE:
                raise
        current = (await js.stream_info(config.name or EVENTS_STREAM)).config
        # Limits left unset keep the stream's (a client without retention configured must
        # not reset the daemon's).
        if config.max_age is None:
            config = replace(config, max_age=current.max_age)
        if config.max_bytes is None:
            config = replace(config, max_bytes=current.max_bytes)
        if config.max_age and config.duplicate_window and config.duplicate_window > config.max_age:
            config = replace(config, duplicate_window=config.max_age)
        log.info("stream %s exists with another configuration; updating it", config.name)
        await js.update_stream(config)
    except CONNECTION_ERRORS as e:
        raise NatsUnavailable(url, f"JetStream did not answer: {e!r}") from e
    except nats.js.errors.APIError as e:
        raise EventLogError(f"cannot create or update stream {config.name}: {e}") from e


async def connect_nats(
    url: str,
    *,
    reconnect: bool,
    timeout: float | None = 2.0,
    name: str | None = None,
    reconnect_wait: float = 0.25,
    disconnected_cb: Callable[[], Awaitable[None]] | None = None,
) -> NATS:
    """Connect to `url`, trying again every `reconnect_wait` for up to `timeout` seconds
    (None: until cancelled). With `reconnect`, the connection then reconnects by itself
    forever; without, it closes on the first disconnection.

    Raises `NatsUnavailable` when no connection was made in time.
    """

    async def _quiet_error(e: Exception) -> None:
        log.debug("nats %s: %r", redact(url), e)

    nc = NATS()
    options: dict[str, object] = {
        **connect_options(url),
        "name": name,
        "allow_reconnect": reconnect,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": reconnect_wait,
        "connect_timeout": 2,
        "error_cb": _quiet_error,
    }
    if disconnected_cb is not None:
        options["disconnected_cb"] = disconnected_cb
    try:
        async with asyncio.timeout(timeout):
            await nc.connect(**options)  # type: ignore[arg-type]
    except (*CONNECTION_ERRORS, nats.errors.Error) as e:
        await close_quietly(nc)
        detail = f"no connection within {timeout}s" if isinstance(e, TimeoutError) else repr(e)
        raise NatsUnavailable(url, detail) from e
    except BaseException:
        await close_quietly(nc)
        raise
    return nc


async def close_quietly(nc: NATS | None, timeout: float = 2.0, *, drain: bool = False) -> None:
    """Drain (if asked and connected) or close `nc`, within `timeout`, ignoring errors."""
    if nc is None or nc.is_closed:
        return
    try:
        if drain and nc.is_connected:
            async with asyncio.timeout(timeout):
                await nc.drain()
        if not nc.is_closed:
            async with asyncio.timeout(timeout):
                await nc.close()
    except (TimeoutError, nats.errors.Error, OSError, AssertionError) as e:
        log.debug("closing a NATS connection: %r", e)
