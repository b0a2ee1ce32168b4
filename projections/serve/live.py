"""The projection inside the daemon: `ProjectionPart` follows `SUP_EVENTS` live into
`<data_dir>/projection.duckdb` and serves the `/v1` read API from it.

It is a `supervisor.daemon.extension.Part` and a `ReadSide`. `start` opens the file, catches up
with the stream (in bulk mode, as a replay does, when it is far behind), then returns and
follows the stream in a background task until the daemon's stack closes. A projector that
fails (NATS gone, a batch DuckDB refused: rolled back, the watermark unmoved) is restarted
with a back-off and resumes after the watermark; meanwhile the readiness check fails and
says why.

Queries and task lookups run on cursors of the projector's own database
(`projections.query.endpoint`): one process owns a DuckDB file.

Lag, two ways. Per event, the delay from publish (the stream's timestamp) to visible
(the commit of its batch) goes into the histogram `supervisor_projection_lag_seconds`
and a window of recent delays whose exact quantiles are the gauge
`supervisor_projection_lag_recent_seconds{quantile}`. Per moment, `lag()` asks the stream
how far ahead it is and how old the oldest message not yet applied is; it is sampled
every second into `supervisor_projection_behind_{messages,seconds}` and measured afresh
by the readiness check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb
import nats.errors
import nats.js.errors
from prometheus_client import CollectorRegistry, Gauge, Histogram

from projections.errors import (
    ProjectionDamaged,
    ProjectionError,
    ProjectionVersionMismatch,
    StreamUnavailable,
    is_damage,
)
from projections.query.endpoint import QueryEndpoint, QueryLimits, unavailable
from projections.serve.projector import Progress, Projector
from projections.serve.replay import BULK_BATCH, replay
from schemas.config import ProjectionConfig
from schemas.connection import SigningConfig
from schemas.http import Check
from schemas.streams import EVENTS_STREAM

__all__ = ["Lag", "LiveSettings", "ProjectionPart"]

T = TypeVar("T")

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from schemas.config import Config
    from schemas.http import PartHost

log = logging.getLogger(__name__)

DB_NAME = "projection.duckdb"
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60)
RECENT_DELAYS = 10_000


_CONFIGURED = ProjectionConfig()
"""The `[projection]` section's defaults: the settings it sets default to them."""


@dataclass(frozen=True)
class LiveSettings:
    """How the daemon's projection runs. A live batch is applied at the latest
    `batch_age_s` after its first message arrived, and the writer applies batches at most
    `max_busy` of the time, resting no longer than `rest_lag_s` after a batch's first
    message arrived (see `projections.serve.projector.Projector`) with `threads` DuckDB
    worker threads (None: one per core) within `memory_limit` (and `temp_limit` of spill);
    at start-up, more
    than `bulk_backlog` messages behind are caught up in bulk mode first. Readiness fails while the oldest
    message not yet applied is older than `max_lag_s`; the lag gauges are sampled every
    `sample_every_s`. At most `query_workers` queries run at once, within `limits`. A
    failed projector restarts after `retry_min_s`, doubling up to `retry_max_s`."""

    batch_size: int = 20_000
    batch_age_s: float = _CONFIGURED.batch_age_s
    max_busy: float = _CONFIGURED.max_busy
    rest_lag_s: float = _CONFIGURED.rest_lag_s
    threads: int | None = _CONFIGURED.threads
    memory_limit: str = _CONFIGURED.memory_limit
    temp_limit: str = _CONFIGURED.temp_limit
    bulk_backlog: int = 200_000
    max_lag_s: float = _CONFIGURED.max_lag_s
    sample_every_s: float = 1.0
    query_workers: int = 4
    limits: QueryLimits = field(default_factory=QueryLimits)
    retry_min_s: float = 0.5
    retry_max_s: float = 10.0

    @classmethod
    def configured(cls, c: ProjectionConfig) -> LiveSettings:
        """The settings with what the `[projection]` section sets."""
        return cls(
            batch_age_s=c.batch_age_s,
            max_busy=c.max_busy,
            rest_lag_s=c.rest_lag_s,
            max_lag_s=c.max_lag_s,
            threads=c.threads,
            memory_limit=c.memory_limit,
            temp_limit=c.temp_limit,
        )


@dataclass(frozen=True)
class Lag:
    """How far the projection trails the stream: the watermark `seq`, the stream's last
    sequence, the messages in between, and the age in seconds of the oldest of them (0
    when caught up)."""

    seq: int
    stream_seq: int
    behind: int
    seconds: float


class ProjectionPart:
    """The daemon's projection and read side: `ProjectionPart(config)`, handed to `Daemon`
    both as a part and as its `read_side`. `db_path` overrides `<data_dir>/projection.duckdb`.
    """

    name = "projection"

    def __init__(
        self,
        config: Config | None = None,
        *,
        settings: LiveSettings | None = None,
        db_path: str | Path | None = None,
        stream: str = EVENTS_STREAM,
    ) -> None:
        self.config = config
        if settings is None and config is not None:
            settings = LiveSettings.configured(config.projection)
        self.settings = settings or LiveSettings()
        self.db_path: Path | None = Path(db_path) if db_path is not None else None
        self.stream = stream
        self._signing = config.signing if config is not None else SigningConfig()
        self._projector: Projector | None = None
        self._js: JetStreamContext | None = None
        self._nats_url = ""
        self._seq = 0
        self._lag = Lag(0, 0, 0, 0.0)
        self._failure: str | None = None
        self._progressed = False
        self._stop = asyncio.Event()
        # Set to stop the projector: at close (with `_stop`), or to rebuild a damaged file.
        self._halt = asyncio.Event()
        self._applied = asyncio.Event()  # set, then replaced, at each batch applied
        self._awaited: Counter[str] = Counter()  # task ids waited for, and how many wait
        self._rebuild = False
        self.rebuilds = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._endpoint: QueryEndpoint | None = None
        self._recent: deque[float] = deque(maxlen=RECENT_DELAYS)
        self._delays: Histogram | None = None
        self._batches: Histogram | None = None

    # --- the part -----------------------------------------------------------------------

    async def start(self, ctx: PartHost, stack: contextlib.AsyncExitStack) -> None:
        """Open the file (rebuilt from the stream if another DDL version made it), catch up,
        then follow in the background; register the `projection` readiness check and the
        metrics. Raises ProjectionStoreError (the file cannot be opened: held by another
        process) and StreamUnavailable."""
        await self.open(
            data_dir=Path(ctx.data_dir),
            nats_url=ctx.nats_url,
            js=ctx.js,
            registry=ctx.registry,
            stack=stack,
        )
        ctx.add_check("projection", self.check)

    async def open(
        self,
        *,
        data_dir: Path,
        nats_url: str,
        js: JetStreamContext,
        registry: CollectorRegistry,
        stack: contextlib.AsyncExitStack,
    ) -> None:
        """`start` without a daemon (the projection's own process uses it): open
        `<data_dir>/projection.duckdb` (unless `db_path` was given), catch up, follow, and
        register the metrics on `registry`; the teardown goes on `stack`."""
        self.db_path = self.db_path or data_dir / DB_NAME
        self._js = js
        self._nats_url = nats_url
        stack.push_async_callback(self.close)
        await self._open_caught_up()
        self._serve_queries()
        self._register(registry)
        self._tasks = [
            asyncio.create_task(self._follow(), name="projection-follow"),
            asyncio.create_task(self._sample(), name="projection-lag"),
        ]
        log.info("projection %s caught up at seq %d; following", self.db_path, self._seq)

    async def close(self) -> None:
        """Stop following (the batch being gathered is applied first), interrupt running
        queries, and close the file checkpointed. Queries after this answer 503."""
        self._stop.set()
        self._halt.set()
        tasks, self._tasks = self._tasks, []
        if tasks:
            follow, sampler = tasks
            sampler.cancel()
            try:
                await asyncio.wait_for(follow, 30)
            except TimeoutError:
                log.warning("the projector did not stop within 30s; its batch is rolled back")
            await asyncio.gather(sampler, return_exceptions=True)
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            await endpoint.close()
        projector, self._projector = self._projector, None
        if projector is not None:
            await asyncio.to_thread(projector.close)

    async def _open_caught_up(self) -> None:
        """`_open_and_catch_up`; a file found damaged meanwhile is set aside and rebuilt
        from the stream, once."""
        try:
            await self._open_and_catch_up()
        except ProjectionError as e:
            if not is_damage(e):
                raise
            await self._set_aside(e)
            await self._open_and_catch_up()

    async def _open_and_catch_up(self) -> None:
        s, path = self.settings, self.db_path
        assert path is not None
        live = partial(
            Projector,
            path,
            self._nats_url,
            batch_size=s.batch_size,
            batch_age_s=s.batch_age_s,
            stream=self.stream,
            max_busy=s.max_busy,
            rest_lag_s=s.rest_lag_s,
            threads=s.threads,
            memory_limit=s.memory_limit,
            temp_limit=s.temp_limit,
            keyring=self._signing.keyring(),
        )
        try:
            projector = await asyncio.to_thread(live)
        except ProjectionVersionMismatch as e:
            # The file is derived data the daemon owns: rebuild it from the log.
            log.warning("%s; rebuilding it from the stream", e)
            await replay(path, self._nats_url)
            projector = await asyncio.to_thread(live)
        try:
            behind = await self._stream_seq() - projector.last_seq
            if behind > s.bulk_backlog:
                log.info("projection: %d messages behind, catching up in bulk mode", behind)
                await asyncio.to_thread(projector.close)
                bulk = await asyncio.to_thread(
                    Projector,
                    path,
                    self._nats_url,
                    batch_size=BULK_BATCH,
                    stream=self.stream,
                    bulk=True,
                )
                try:
                    await bulk.catch_up()
                finally:
                    await asyncio.to_thread(bulk.close)
                projector = await asyncio.to_thread(live)
            self._seq = (await projector.catch_up()).seq
        except BaseException:
            await asyncio.to_thread(projector.close)
            raise
        projector.awaited = self._awaited
        self._projector = projector

    async def _set_aside(self, error: BaseException | str) -> None:
        """Move a damaged file (and its WAL) aside, as evidence, and rebuild it from the
        stream; the reason is logged as an error and kept as the part's failure."""
        path = self.db_path
        assert path is not None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        aside = path.with_name(f"{path.name}.damaged-{stamp}")
        wal = path.with_name(path.name + ".wal")
        with contextlib.suppress(FileNotFoundError):
            path.rename(aside)
        with contextlib.suppress(FileNotFoundError):
            wal.rename(aside.with_name(aside.name + ".wal"))
        log.error(
            "projection %s is damaged (%s); set aside as %s, rebuilding it from the stream",
            path,
            error,
            aside.name,
        )
        self.rebuilds += 1
        await replay(path, self._nats_url)

    def _damaged(self, error: BaseException) -> ProjectionDamaged:
        """A read met damage: ask the follower to set the file aside and rebuild it."""
        self._rebuild = True
        self._halt.set()
        return ProjectionDamaged(str(error))

    async def _rebuilt(self, error: BaseException | str) -> None:
        """Close the damaged projector and its readers, set the file aside, rebuild it and
        open it again (queries answer 503 meanwhile)."""
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            await endpoint.close()
        projector, self._projector = self._projector, None
        if projector is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(projector.close)
        await self._set_aside(error)
        await self._open_caught_up()
        self._serve_queries()
        self._rebuild = False

    def _serve_queries(self) -> None:
        """Answer queries on the open projector's file."""
        assert self._projector is not None
        self._endpoint = QueryEndpoint(
            self._projector.store.con,
            workers=self.settings.query_workers,
            limits=self.settings.limits,
        )

    async def _follow(self) -> None:
        """Run the projector until stopped; restart it after a failure (with a back-off
        that starts over once it applies a batch again); set a damaged file aside and
        rebuild it (`_rebuilt`) when the projector or a read meets the damage."""
        assert self._projector is not None
        s = self.settings
        delay = s.retry_min_s
        while not self._stop.is_set():
            self._progressed = False
            try:
                if self._rebuild:
                    await self._rebuilt(self._failure or "a read met damage")
                assert self._projector is not None
                # A fresh event per run, so that no stop asked meanwhile is ever cleared.
                self._halt = halt = asyncio.Event()
                if self._stop.is_set():
                    return
                await self._projector.run(halt, progress=self._on_progress)
                if self._stop.is_set() or not self._rebuild:
                    return
                continue
            except Exception as e:
                self._failure = str(e)
                if is_damage(e):
                    self._rebuild = True
                    log.error("the projection file is damaged: %s", e)
                    continue
                if isinstance(e, ProjectionError):
                    log.warning("the projector failed (%s); restarting in %.1fs", e, delay)
                else:
                    log.exception("the projector crashed; restarting in %.1fs", delay)
            delay = s.retry_min_s if self._progressed else min(delay * 2, s.retry_max_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    def _on_progress(self, p: Progress) -> None:
        self._seq = p.seq
        self._applied.set()
        self._applied = asyncio.Event()
        self._failure = None
        self._progressed = True
        r = p.last
        if r is None or r.stored_ns is None or self._delays is None:
            return
        if self._batches is not None:
            self._batches.observe(r.apply_s)
        for stored in r.stored_ns.to_pylist():
            delay = max(r.committed_ns - stored, 0) / 1e9
            self._delays.observe(delay)
            self._recent.append(delay)

    async def _sample(self) -> None:
        while True:
            try:
                self._lag = await self.lag()
            except ProjectionError as e:
                log.debug("projection lag not sampled: %s", e)
            await asyncio.sleep(self.settings.sample_every_s)

    # --- lag, readiness, metrics ----------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The last stream sequence applied (and visible to queries)."""
        return self._seq

    @property
    def lag_seconds(self) -> float:
        """The lag at the last sample (every `sample_every_s`; see `lag()` for a fresh one)."""
        return self._lag.seconds

    @property
    def failure(self) -> str | None:
        """Why the projector last failed, until it applies a batch again."""
        return self._failure

    async def lag(self) -> Lag:
        """Measure the lag now (two JetStream requests at most). Raises StreamUnavailable."""
        assert self._js is not None
        seq = self._seq
        last = await self._stream_seq()
        if last <= seq:
            return Lag(seq, last, 0, 0.0)
        try:
            oldest = await self._js.get_msg(self.stream, seq=seq + 1, subject=">", next=True)
        except nats.js.errors.NotFoundError:
            return Lag(seq, last, 0, 0.0)  # nothing is left after seq (deleted meanwhile)
        except (OSError, TimeoutError, nats.errors.Error) as e:
            raise StreamUnavailable(self._nats_url, repr(e)) from e
        stored = oldest.time or datetime.now(UTC)
        seconds = max((datetime.now(UTC) - stored).total_seconds(), 0.0)
        return Lag(seq, last, last - seq, seconds)

    async def _stream_seq(self) -> int:
        """The stream's last sequence (0 while it does not exist). Raises StreamUnavailable."""
        assert self._js is not None
        try:
            info = await self._js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            return 0
        except (OSError, TimeoutError, nats.errors.Error) as e:
            raise StreamUnavailable(self._nats_url, repr(e)) from e
        return int(info.state.last_seq)

    async def check(self) -> Check:
        """The `projection` readiness check: the projector runs, is not failing, and the
        oldest message it has not applied is at most `max_lag_s` old."""
        follow = self._tasks[0] if self._tasks else None
        if follow is None or follow.done():
            return Check(ok=False, reason="the projector is not running")
        if self._failure is not None:
            return Check(ok=False, reason=f"the projector failed, restarting: {self._failure}")
        try:
            lag = await self.lag()
        except ProjectionError as e:
            return Check(ok=False, reason=f"cannot measure the projection's lag: {e}")
        details = {
            "seq": lag.seq,
            "stream_seq": lag.stream_seq,
            "behind": lag.behind,
            "lag_s": round(lag.seconds, 3),
        }
        where = f"applied up to seq {lag.seq}, {lag.behind} behind ({lag.seconds:.2f}s)"
        if lag.seconds > self.settings.max_lag_s:
            return Check(
                ok=False, reason=f"{where}: more than {self.settings.max_lag_s:g}s", details=details
            )
        return Check(ok=True, reason=where, details=details)

    def _register(self, registry: CollectorRegistry) -> None:
        r = registry
        self._delays = Histogram(
            "supervisor_projection_lag_seconds",
            "Delay of each event from publish (stream timestamp) to visible in the projection",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self._batches = Histogram(
            "supervisor_projection_batch_seconds",
            "Time to apply one batch to the projection (one transaction)",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        recent = Gauge(
            "supervisor_projection_lag_recent_seconds",
            f"Quantiles of the publish-to-visible delay of the last {RECENT_DELAYS} events",
            ["quantile"],
            registry=r,
        )
        for q in (0.5, 0.99, 1.0):
            recent.labels(str(q)).set_function(partial(self._recent_quantile, q))
        Gauge(
            "supervisor_projection_seq",
            "Last stream sequence applied to the projection",
            registry=r,
        ).set_function(lambda: self._seq)
        Gauge(
            "supervisor_projection_behind_messages",
            "Stream messages not yet applied (sampled)",
            registry=r,
        ).set_function(lambda: self._lag.behind)
        Gauge(
            "supervisor_projection_behind_seconds",
            "Age of the oldest stream message not yet applied, 0 when caught up (sampled)",
            registry=r,
        ).set_function(lambda: self._lag.seconds)

    def _recent_quantile(self, q: float) -> float:
        values = sorted(self._recent)
        if not values:
            return 0.0
        return values[min(int(q * len(values)), len(values) - 1)]

    # --- the read side --------------------------------------------------------------------

    async def query(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """`QueryEndpoint.query` on the live projection (ApiError 503 while it is closed)."""
        if self._endpoint is None:
            raise unavailable()
        try:
            return await self._endpoint.query(request)
        except ProjectionError as e:
            if is_damage(e):
                raise self._damaged(e) from e
            raise

    async def on_cursor(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run `fn` on one of the live projection's read cursors, in its thread pool (the
        reconciler reads its projected state this way). ApiError 503 while closed."""
        if self._endpoint is None:
            raise unavailable()
        try:
            return await self._endpoint._on_cursor(fn)
        except duckdb.Error as e:
            if is_damage(e):
                raise self._damaged(e) from e
            raise

    async def tasks(self, params: Mapping[str, str]) -> dict[str, Any]:
        """`QueryEndpoint.tasks` on the live projection (ApiError 503 while it is closed)."""
        if self._endpoint is None:
            raise unavailable()
        try:
            return await self._endpoint.tasks(params)
        except ProjectionError as e:
            if is_damage(e):
                raise self._damaged(e) from e
            raise

    async def task(self, task_id: str, wait_s: float = 0.0) -> dict[str, Any] | None:
        """`QueryEndpoint.task` on the live projection: None also while the task is not
        projected yet (it trails the stream by the lag). With `wait_s`, read again after
        each batch applied until the task has an outcome or `wait_s` passed: the answer
        comes right after the batch that applied the task's end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        self._awaited[task_id] += 1  # the batch with its end is applied at once
        try:
            while True:
                applied = self._applied  # set by the next batch applied
                doc = await self._task(task_id)
                left = deadline - loop.time()
                if (doc is not None and doc.get("outcome") is not None) or left <= 0:
                    return doc
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(applied.wait(), left)
        finally:
            self._awaited[task_id] -= 1
            if not self._awaited[task_id]:
                del self._awaited[task_id]

    async def _task(self, task_id: str) -> dict[str, Any] | None:
        if self._endpoint is None:
            raise unavailable()
        try:
            return await self._endpoint.task(task_id)
        except ProjectionError as e:
            if is_damage(e):
                raise self._damaged(e) from e
            raise
