"""The circuit breaker around the Docker engine.

The decision is pure: a frozen `BreakerState` and three functions of (state, now, evidence)
that return the next state and, when the status changed, an event-ready `Transition`.

- closed: work flows. Each engine failure adds one to `failures`; a success resets it;
  `failure_threshold` consecutive failures open the breaker.
- open: no work. Once its interval has passed since it opened, `allow` hands out one
  probe and moves to half-open. The interval is `open_interval_s`, doubled for each probe
  that failed since the breaker was last closed, up to `max_open_interval_s`: a long
  outage is probed less and less often, a short one is noticed at once.
- half_open: only that probe. Its success closes the breaker (and the interval starts
  over from `open_interval_s`), its failure reopens it for a doubled interval. A probe
  whose outcome never came back is replaced by a new one after another interval, so a
  lost probe cannot wedge the breaker.

Only engine failures count: the project's `DockerUnavailable` and `DockerApiError` (or a
classified error of type `infrastructure` with code DOCKER_UNAVAILABLE/DOCKER_API_ERROR).
User errors, resource limits, a container someone else removed, and the breaker's own
refusal (`CircuitOpen`) never count: none of them says the engine is unwell, and counting
its own refusals would keep the breaker open forever. Time is a monotonic float in
seconds, given by the caller.

`supervisor.docker.engine_breaker.DockerBreaker` is the small async service that holds the
state, reads an injected clock, emits `breaker.transition` on each change and probes the
engine with `ping`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol

from msgspec import Struct
from msgspec.structs import replace

from schemas import BreakerStatus
from schemas.config import BreakerConfig
from schemas.errors import DockerApiError, DockerUnavailable, SupervisorError

ENGINE_FAILURE_CODES = frozenset({"DOCKER_UNAVAILABLE", "DOCKER_API_ERROR"})
STATUS_VALUE: dict[BreakerStatus, int] = {"closed": 0, "half_open": 1, "open": 2}
_DEFAULT = BreakerConfig()


class CircuitOpen(SupervisorError):
    """Raised instead of calling Docker while the breaker is not closed (`circuit_open`,
    classified as infrastructure/CIRCUIT_OPEN, retryable)."""

    tag = "circuit_open"

    def __init__(self, status: BreakerStatus, failures: int, retry_in_s: float | None) -> None:
        self.status = status
        self.failures = failures
        self.retry_in_s = retry_in_s
        when = f"; next probe in {retry_in_s:.1f}s" if retry_in_s is not None else ""
        super().__init__(
            f"the Docker circuit breaker is {status} after {failures} engine failures{when}"
        )


class ClassifiedError(Protocol):
    """What the breaker reads of a classified error (`Classification`, `ExecutionError`)."""

    @property
    def type(self) -> str: ...

    @property
    def code(self) -> str: ...


class BreakerState(Struct, frozen=True, kw_only=True):
    """`failures`: consecutive engine failures. `opened_at`: when it last opened (None while
    closed). `probe_at`: when the outstanding half-open probe was handed out. `reopens`:
    probes that failed since it was last closed (each doubles the open interval)."""

    status: BreakerStatus = "closed"
    failures: int = 0
    opened_at: float | None = None
    probe_at: float | None = None
    reopens: int = 0


def open_interval(state: BreakerState, config: BreakerConfig = _DEFAULT) -> float:
    """How long the breaker stays open before a probe: `open_interval_s` doubled per failed
    probe (`state.reopens`), capped at `max_open_interval_s` (never below the first)."""
    cap = max(config.max_open_interval_s, config.open_interval_s)
    return min(config.open_interval_s * 2.0 ** min(state.reopens, 64), cap)


class Transition(Struct, frozen=True, kw_only=True):
    """A change of status, with the fields of the `breaker.transition` event."""

    from_state: BreakerStatus
    to_state: BreakerStatus
    reason: str
    failures: int


class Step(NamedTuple):
    state: BreakerState
    transition: Transition | None = None


class Decision(Struct, frozen=True, kw_only=True):
    """`kind`: `allow` (closed), `probe` (the one half-open probe) or `reject`.
    `retry_in_s`: for a rejection, how long until the next probe may go."""

    kind: Literal["allow", "probe", "reject"]
    transition: Transition | None = None
    retry_in_s: float | None = None

    @property
    def allowed(self) -> bool:
        return self.kind != "reject"


def counts(error: BaseException | ClassifiedError) -> bool:
    """Whether this error is evidence that the Docker engine itself is failing."""
    if isinstance(error, BaseException):
        return isinstance(error, DockerUnavailable | DockerApiError)
    return error.type == "infrastructure" and error.code in ENGINE_FAILURE_CODES


def _describe(error: BaseException | ClassifiedError) -> str:
    if isinstance(error, SupervisorError):
        return f"{error.tag}: {error}"
    if isinstance(error, BaseException):
        return type(error).__name__
    return f"{error.type}/{error.code}"


def _move(state: BreakerState, new: BreakerState, reason: str) -> Step:
    if new.status == state.status:
        return Step(new)
    return Step(
        new,
        Transition(
            from_state=state.status, to_state=new.status, reason=reason, failures=new.failures
        ),
    )


def on_success(state: BreakerState, now: float, *, config: BreakerConfig = _DEFAULT) -> Step:
    """A Docker call succeeded. Closed: the failure count resets. Half-open: the breaker
    closes. Open: no change (a late success of a call that started before it opened does
    not override the interval; only a probe closes it)."""
    if state.status == "open":
        return Step(state)
    if state.status == "half_open":
        return _move(state, BreakerState(), "probe succeeded: Docker answered")
    return Step(state if state.failures == 0 else BreakerState())


def on_failure(
    state: BreakerState,
    now: float,
    error: BaseException | ClassifiedError,
    *,
    config: BreakerConfig = _DEFAULT,
) -> Step:
    """A Docker call failed with `error`. An error that does not `count` changes nothing.
    Closed: one more failure; at the threshold it opens (at `now`). Half-open: it reopens
    for a doubled interval. Open: the count grows, the interval is unchanged."""
    if not counts(error):
        return Step(state)
    failures = state.failures + 1
    if state.status == "open":
        return Step(replace(state, failures=failures))
    if state.status == "half_open":
        new = replace(
            state,
            status="open",
            failures=failures,
            opened_at=now,
            probe_at=None,
            reopens=state.reopens + 1,
        )
        return _move(state, new, f"probe failed: {_describe(error)}")
    if failures >= config.failure_threshold:
        new = BreakerState(status="open", failures=failures, opened_at=now)
        return _move(state, new, f"{failures} consecutive engine failures, last {_describe(error)}")
    return Step(BreakerState(failures=failures))


def allow(
    state: BreakerState, now: float, *, config: BreakerConfig = _DEFAULT
) -> tuple[Decision, BreakerState]:
    """May a Docker call (or a task) go now? Closed: yes. Open: no until the interval has
    passed, then one probe (and half-open). Half-open: no while the probe is out, unless it
    has been out for a whole interval (its outcome is presumed lost: a new probe)."""
    if state.status == "closed":
        return Decision(kind="allow"), state
    interval = open_interval(state, config)
    if state.status == "open":
        opened = state.opened_at if state.opened_at is not None else now
        wait = opened + interval - now
        if wait > 0:
            return Decision(kind="reject", retry_in_s=wait), state
        new = replace(state, status="half_open", probe_at=now)
        step = _move(state, new, f"open for {interval:g}s: probing Docker")
        return Decision(kind="probe", transition=step.transition), new
    probe_at = state.probe_at if state.probe_at is not None else now - interval
    wait = probe_at + interval - now
    if wait > 0:
        return Decision(kind="reject", retry_in_s=wait), state
    return Decision(kind="probe"), replace(state, probe_at=now)
