"""The circuit breaker's service around the Docker engine: it holds this process's
`BreakerState` (the decisions are `supervisor.policy.breaker`'s), reads an injected clock,
emits `breaker.transition` on each change, shows the state in the metrics and probes the
engine with `ping` while it is open."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from schemas import BreakerStatus, BreakerTransition
from schemas.config import BreakerConfig
from schemas.errors import DockerUnavailable, SupervisorError
from supervisor.eventlog.emitter import Emitter
from supervisor.observability.metrics import Metrics
from supervisor.policy.breaker import (
    STATUS_VALUE,
    BreakerState,
    CircuitOpen,
    ClassifiedError,
    Step,
    Transition,
    allow,
    on_failure,
    on_success,
)

log = logging.getLogger("supervisor.docker.engine_breaker")
_DEFAULT = BreakerConfig()


class Pingable(Protocol):
    async def ping(self) -> None: ...


class DockerBreaker:
    """Holds the breaker state of this process and publishes its transitions.

    Call `record(None)` after a Docker call that the engine answered (including a task that
    failed by its own fault) and `record(error)` with the project's exception or
    classification otherwise. Work is pulled only while `allows_work`. `watch(runtime)`
    runs the probes: while open, it waits for the interval, then pings once (half-open).
    `on_change` is called after every transition (the scheduler uses it to look again).
    """

    def __init__(
        self,
        emitter: Emitter,
        config: BreakerConfig = _DEFAULT,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        on_change: Callable[[Transition], None] | None = None,
        ping_timeout_s: float = 5.0,
    ) -> None:
        self.emitter = emitter
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.on_change = on_change
        self.ping_timeout_s = ping_timeout_s
        self._state = BreakerState()
        self._changed = asyncio.Event()
        if metrics is not None:
            _show(metrics, "closed")

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def allows_work(self) -> bool:
        return self._state.status == "closed"

    def record_success(self) -> None:
        self._apply(on_success(self._state, self.clock(), config=self.config))

    def record_failure(self, error: BaseException | ClassifiedError) -> None:
        self._apply(on_failure(self._state, self.clock(), error, config=self.config))

    def record(self, error: BaseException | ClassifiedError | None) -> None:
        if error is None:
            self.record_success()
        else:
            self.record_failure(error)

    def check(self) -> None:
        """Raise `CircuitOpen` unless the breaker is closed (for a caller about to call Docker)."""
        if self._state.status == "closed":
            return
        decision, _ = allow(self._state, self.clock(), config=self.config)
        raise CircuitOpen(self._state.status, self._state.failures, decision.retry_in_s)

    async def probe(self, runtime: Pingable) -> bool:
        """If a probe is due, ping Docker and record the outcome. Returns whether the breaker
        is closed afterwards (True at once while closed; False while no probe is due)."""
        decision, new = allow(self._state, self.clock(), config=self.config)
        self._apply(Step(new, decision.transition))
        if decision.kind == "allow":
            return True
        if decision.kind == "reject":
            return False
        try:
            async with asyncio.timeout(self.ping_timeout_s):
                await runtime.ping()
        except TimeoutError:
            self.record_failure(DockerUnavailable("ping", f"no answer in {self.ping_timeout_s}s"))
        except SupervisorError as e:
            self.record_failure(e)
        else:
            self.record_success()
        return self.allows_work

    async def watch(
        self, runtime: Pingable, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep
    ) -> None:
        """Run forever (cancel to stop): probe whenever the breaker is open and due."""
        while True:
            if self.allows_work:
                self._changed.clear()
                await self._changed.wait()
                continue
            if await self.probe(runtime):
                continue
            decision, _ = allow(self._state, self.clock(), config=self.config)
            await sleep(max(decision.retry_in_s or self.config.open_interval_s, 0.01))

    def _apply(self, step: Step) -> None:
        self._state = step.state
        t = step.transition
        if t is None:
            return
        self._changed.set()
        log.warning(
            "docker breaker %s -> %s: %s",
            t.from_state,
            t.to_state,
            t.reason,
            extra={"failures": t.failures},
        )
        self.emitter.emit(
            BreakerTransition,
            from_state=t.from_state,
            to_state=t.to_state,
            reason=t.reason,
            failures=t.failures,
        )
        if self.metrics is not None:
            _show(self.metrics, t.to_state)
            self.metrics.breaker_transitions.labels(t.to_state).inc()
        if self.on_change is not None:
            self.on_change(t)


def _show(metrics: Metrics, status: BreakerStatus) -> None:
    """`supervisor_breaker_state{state}`: 1 for `status`, 0 for the others."""
    for s in STATUS_VALUE:
        metrics.breaker_state.labels(s).set(1 if s == status else 0)
