"""Durable, bounded intake: submissions go to the work-queue stream `SUP_TASKS` on
`suptask.<priority>`, each priority bounded with discard-new, so a full queue is refused by
JetStream at publish time and the submitter learns it at once (`resource/QUEUE_FULL`).

Order of facts: a spec that fails validation or policy is rejected before anything is
queued (`error.raised` + `task.rejected`). An accepted one first has its `task.submitted`
made durable in JetStream, then is queued, so the stream never shows an attempt before its
submission; if the queue refuses it, `task.rejected` follows.
"""

from __future__ import annotations

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
)
from supervisor.admission import admit
from supervisor.classify import Classification, classify
from supervisor.config import Config
from supervisor.emitter import Emitter, new_id
from supervisor.errors import EventLogError, NatsUnavailable, SpecError
from supervisor.ports import EventSink
from supervisor.streams import TASKS_STREAM

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

    def result(self) -> Result | None:
        """The final Result of a submission that was refused (None when accepted)."""
        if self.accepted:
            return None
        return Result(task_id=self.task_id, status="rejected", attempts=0, error=self.error)


def prepare(spec: TaskSpec) -> TaskSpec:
    """Give the spec its task id and correlation id (kept if the submitter chose them)."""
    return msgspec.structs.replace(
        spec,
        task_id=spec.task_id or f"t-{new_id()[:16]}",
        correlation_id=spec.correlation_id or new_id(),
    )


class Intake:
    def __init__(
        self, js: JetStreamContext, emitter: Emitter, sink: EventSink, config: Config
    ) -> None:
        self.js = js
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
            admit(spec, self.config.bounds, self.config.policy)
        except SpecError as e:
            c = classify(Evidence(adapter_error=e.tag, adapter_message=str(e)))
            assert c is not None
            return self._reject(em, spec, c, str(e))
        em.emit(TaskSubmitted, spec=spec, priority=spec.priority)
        if not await self.sink.flush(_SUBMITTED_DURABLE_S):
            raise NatsUnavailable("jetstream", "task.submitted could not be made durable")
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
                    type="resource", code="QUEUE_FULL", retryable=True,
                    message=f"the {spec.priority} queue is full ({bound} tasks queued or running); try again later",
                    details={"priority": spec.priority, "bound": bound},
                )  # fmt: skip
                return self._reject(em, spec, c, c.message)
            raise EventLogError(f"SUP_TASKS refused the task: {e}") from e
        except (nats.errors.Error, OSError) as e:
            raise NatsUnavailable("jetstream", repr(e)) from e
        return Submission(spec.task_id, spec.correlation_id, True, stream_seq=ack.seq)

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
            type=c.type, code=c.code, message=message, retryable=c.retryable, details=c.details,
            task_id=spec.task_id, timestamp=self.emitter.clock().isoformat(),
        )  # fmt: skip
        em.emit(ErrorRaised, error_type=c.type, code=c.code, message=message,
                retryable=c.retryable, details=c.details)  # fmt: skip
        result = Result(task_id=spec.task_id, status="rejected", attempts=0, error=error)
        em.emit(TaskRejected, error=error, result=result)
        return Submission(spec.task_id, spec.correlation_id, False, error=error)
