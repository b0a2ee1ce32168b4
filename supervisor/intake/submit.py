"""Durable, bounded intake: submissions go to the work-queue stream `SUP_TASKS` on
`suptask.<priority>`, each priority bounded with discard-new, so a full queue is refused by
JetStream at publish time and the submitter learns it at once (`resource/QUEUE_FULL`).

Order of facts: a spec that fails validation or policy is rejected before anything is
queued (`error.raised` + `task.rejected`). An accepted one first has its `task.submitted`
made durable in JetStream, then is queued, so the stream never shows an attempt before its
submission; if the queue refuses it, `task.rejected` follows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext

from schemas import (
    ErrorRaised,
    Evidence,
    ExecutionError,
    Result,
    TaskRejected,
    TaskSpec,
    TaskSubmitted,
    decode_event,
)
from schemas.config import Config
from schemas.errors import EventLogError, NatsUnavailable, SpecError
from schemas.streams import EVENTS_STREAM, TASKS_STREAM
from supervisor.daemon.metrics import Metrics
from supervisor.eventlog.emitter import Emitter, new_id
from supervisor.eventlog.ports import EventSink
from supervisor.execution.classify import Classification, catalogue_entry, classify
from supervisor.intake.admission import admit

# JetStream's error code for "maximum messages per subject exceeded" (discard-new refusal).
JS_ERR_MAX_MSGS_PER_SUBJECT = 10077
_SUBMITTED_DURABLE_S = 10.0


def task_subject(priority: str) -> str:
    return f"suptask.{priority}"


@dataclass(frozen=True)
class Submission:
    task_id: str
    correlation_id: str
    accepted: bool
    error: ExecutionError | None = None
    stream_seq: int | None = None
    # The same spec was submitted under this id before: this is that task.
    existing: bool = False

    def result(self) -> Result | None:
        """The final Result of a submission that was refused (None when accepted)."""
        if self.accepted:
            return None
        return Result(task_id=self.task_id, status="rejected", attempts=0, error=self.error)


def submitted_event_id(task_id: str) -> str:
    return f"submitted.{task_id}"


def same_spec(a: TaskSpec, b: TaskSpec) -> bool:
    """One task: the same spec but for the correlation id (a new one is drawn for each
    submission that names none)."""
    return msgspec.structs.replace(a, correlation_id=None) == msgspec.structs.replace(
        b, correlation_id=None
    )


def prepare(spec: TaskSpec) -> TaskSpec:
    """Give the spec its task id and correlation id (kept if the submitter chose them)."""
    return msgspec.structs.replace(
        spec,
        task_id=spec.task_id or f"t-{new_id()[:16]}",
        correlation_id=spec.correlation_id or new_id(),
    )


class Intake:
    def __init__(
        self,
        js: JetStreamContext,
        emitter: Emitter,
        sink: EventSink,
        config: Config,
        *,
        metrics: Metrics | None = None,
        disk_full: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.js = js
        self.metrics = metrics
        self.disk_full = disk_full
        self.emitter = emitter
        self.sink = sink
        self.config = config
        self._encoder = msgspec.json.Encoder()

    async def submit(self, spec: TaskSpec) -> Submission:
        """Queue `spec` or refuse it. Raises `NatsUnavailable` when nothing could be queued
        because NATS is unreachable (then no event claims the task was submitted)."""
        spec = prepare(spec)
        assert spec.task_id is not None and spec.correlation_id is not None
        em = self.emitter.for_task(spec.task_id, spec.correlation_id)
        try:
            admit(spec, self.config.bounds, self.config.policy, self.config.callbacks.allowed)
        except SpecError as e:
            c = classify(Evidence(adapter_error=e.tag, adapter_message=str(e)))
            assert c is not None
            return self._reject(em, spec, c, str(e))
        full = self.disk_full()
        if full is not None:
            return self._reject(em, spec, catalogue_entry("DISK_FULL", full), full)
        known = await self._known(spec)
        if known is not None:
            return known
        # A deterministic id: two submissions of one id racing each other store one
        # `task.submitted` (JetStream drops the second by its Nats-Msg-Id); the loser sees
        # the winner's spec below.
        em.emit(
            TaskSubmitted,
            event_id=submitted_event_id(spec.task_id),
            spec=spec,
            priority=spec.priority,
        )
        if not await self.sink.flush(_SUBMITTED_DURABLE_S):
            # Refused to the client, so closed in the log too: the `task.submitted` waiting
            # in the outbox lands later with its `task.rejected` behind it, never as a task
            # that was queued.
            full = self.disk_full()
            if full is not None:
                return self._reject(em, spec, catalogue_entry("DISK_FULL", full), full)
            message = "task.submitted could not be made durable: NATS did not answer"
            self._reject(em, spec, catalogue_entry("NATS_UNAVAILABLE", message), message)
            raise NatsUnavailable("jetstream", "task.submitted could not be made durable")
        known = await self._known(spec, after_own=True)
        if known is not None:
            return known
        try:
            ack = await self.js.publish(
                task_subject(spec.priority),
                self._encoder.encode(spec),
                headers={"Nats-Msg-Id": spec.task_id},
            )
        except nats.js.errors.APIError as e:
            if e.err_code == JS_ERR_MAX_MSGS_PER_SUBJECT:
                bound = await self._bound()
                c = Classification(
                    type="resource",
                    code="QUEUE_FULL",
                    retryable=True,
                    message=f"the {spec.priority} queue is full ({bound} tasks queued or running); try again later",
                    details={"priority": spec.priority, "bound": bound},
                )
                return self._reject(em, spec, c, c.message)
            raise EventLogError(f"SUP_TASKS refused the task: {e}") from e
        except (nats.errors.Error, OSError) as e:
            raise NatsUnavailable("jetstream", repr(e)) from e
        return Submission(spec.task_id, spec.correlation_id, True, stream_seq=ack.seq)

    async def _known(self, spec: TaskSpec, *, after_own: bool = False) -> Submission | None:
        """The answer for a task id known already: the same spec again is the existing task
        (accepted, nothing recorded); a different one is refused as DUPLICATE_TASK_ID with
        an `error.raised` (not a `task.rejected`: the id's one outcome is the first
        task's). None for a new id, or, `after_own`, when the stored submission is ours."""
        assert spec.task_id is not None and spec.correlation_id is not None
        first = await self._first_submission(spec.task_id)
        if first is None:
            if after_own:
                raise NatsUnavailable("jetstream", "task.submitted is not in the stream")
            return None
        seq, stored = first
        if same_spec(stored.spec, spec):
            if after_own:
                return None
            return Submission(
                spec.task_id, stored.correlation_id, True, stream_seq=None, existing=True
            )
        message = (
            f"task id {spec.task_id} is taken by another spec (submitted at stream "
            f"seq {seq}); submit again with another id, or the same spec"
        )
        c = Classification(
            type="validation",
            code="DUPLICATE_TASK_ID",
            retryable=False,
            message=message,
            details={"submitted_seq": seq},
        )
        em = self.emitter.for_task(spec.task_id, spec.correlation_id)
        error = ExecutionError(
            type=c.type,
            code=c.code,
            message=message,
            retryable=False,
            details=c.details,
            task_id=spec.task_id,
            timestamp=self.emitter.clock().isoformat(),
        )
        em.emit(
            ErrorRaised,
            error_type=c.type,
            code=c.code,
            message=message,
            retryable=False,
            details=c.details,
        )
        self._count(c)
        return Submission(spec.task_id, spec.correlation_id, False, error=error)

    async def _first_submission(self, task_id: str) -> tuple[int, TaskSubmitted] | None:
        subject = f"sup.task.submitted.*.{task_id}"
        try:
            msg = await self.js.get_msg(EVENTS_STREAM, seq=1, next=True, subject=subject)
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, OSError) as e:
            raise NatsUnavailable("jetstream", f"looking up task {task_id}: {e!r}") from e
        try:
            event = decode_event(msg.data or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if not isinstance(event, TaskSubmitted):
            return None
        return int(msg.seq or 0), event

    def _count(self, c: Classification) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(c.type, c.code).inc()

    async def _bound(self) -> int | None:
        """The per-priority bound the stream enforces (set by the daemon that created it,
        which may differ from this process's configuration)."""
        try:
            info = await self.js.stream_info(TASKS_STREAM)
        except (nats.errors.Error, OSError):
            return None
        return info.config.max_msgs_per_subject

    def _reject(self, em: Emitter, spec: TaskSpec, c: Classification, message: str) -> Submission:
        assert spec.task_id is not None and spec.correlation_id is not None
        error = ExecutionError(
            type=c.type,
            code=c.code,
            message=message,
            retryable=c.retryable,
            details=c.details,
            task_id=spec.task_id,
            timestamp=self.emitter.clock().isoformat(),
        )
        em.emit(
            ErrorRaised,
            error_type=c.type,
            code=c.code,
            message=message,
            retryable=c.retryable,
            details=c.details,
        )
        result = Result(task_id=spec.task_id, status="rejected", attempts=0, error=error)
        em.emit(TaskRejected, error=error, result=result)
        self._count(c)
        if self.metrics is not None:
            self.metrics.tasks.labels("rejected").inc()
        return Submission(spec.task_id, spec.correlation_id, False, error=error)
