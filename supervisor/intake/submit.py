"""Durable, bounded intake: submissions go to the work-queue stream `SUP_TASKS` on
`suptask.<priority>`, each priority bounded with discard-new, so a full queue is refused by
JetStream at publish time and the submitter learns it at once (`resource/QUEUE_FULL`).

Order of facts: a spec that fails validation or policy is rejected before anything is
queued (`error.raised` + `task.rejected`). An accepted one first has its `task.submitted`
made durable in JetStream, then is queued, so the stream never shows an attempt before its
submission.

One outcome per task id, whatever the client does:
- a refusal for a passing reason (the queue full, the disk full, NATS not answering) is
  `task.refused`, not terminal: the id stays free, and the same spec sent again is accepted
  and runs once;
- a refusal of a submission under an id that already names a task (a bad spec, another
  spec) is only an `error.raised` about that submission (attempt 0): the task keeps its
  own, single outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import PubAck
from nats.js.client import JetStreamContext

from schemas import (
    Event,
    Evidence,
    ExecutionError,
    Result,
    TaskRefused,
    TaskRejected,
    TaskSpec,
    TaskSubmitted,
    event_type,
)
from schemas.config import Config
from schemas.errors import EventLogError, NatsUnavailable, SpecError
from schemas.lifecycle import InvalidTransition, Keyring, next_task_state
from schemas.spec import public_spec
from schemas.streams import EVENTS_STREAM, TASKS_STREAM
from supervisor.eventlog.emitter import Emitter, new_id
from supervisor.eventlog.history import read_task_messages
from supervisor.eventlog.outcomes import emit_error, execution_error, record_refusal
from supervisor.eventlog.ports import EventSink
from supervisor.observability.metrics import Metrics
from supervisor.policy.admission import admit
from supervisor.policy.classify import Classification, catalogue_entry, classify

__all__ = [
    "IdState",
    "Intake",
    "Submission",
    "id_state",
    "prepare",
    "same_spec",
    "submitted_event_id",
    "task_subject",
]

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


def submitted_event_id(task_id: str, generation: int = 0) -> str:
    """The deterministic id of a `task.submitted`: two submissions of one id racing each
    other store one (JetStream drops the second by its Nats-Msg-Id). `generation` counts
    the passing refusals before it, so a submission after a refusal is a new event."""
    return f"submitted.{task_id}" if generation == 0 else f"submitted.{task_id}.{generation}"


@dataclass(frozen=True)
class IdState:
    """What the stream says of a task id: the task machine's state after its task events
    (None: never seen), the latest submission (seq, event), and how many passing
    refusals (`task.refused`) it has had."""

    state: str | None = None
    submitted: tuple[int, TaskSubmitted] | None = None
    refusals: int = 0

    @property
    def free(self) -> bool:
        """Whether a submission under this id starts the task: never seen, or refused."""
        return self.state is None or self.state == "refused"


def id_state(messages: list[tuple[int, Event]]) -> IdState:
    """Pure: fold a task's (seq, event) history into its `IdState`."""
    state: str | None = None
    submitted: tuple[int, TaskSubmitted] | None = None
    refusals = 0
    for seq, e in messages:
        if isinstance(e, TaskSubmitted):
            submitted = (seq, e)
        elif isinstance(e, TaskRefused):
            refusals += 1
        try:
            state = next_task_state(state, event_type(e))
        except InvalidTransition:
            continue
    return IdState(state, submitted, refusals)


def same_spec(a: TaskSpec, b: TaskSpec) -> bool:
    """One task: the same spec but for the correlation id (a new one is drawn for each
    submission that names none), compared in their public forms (`public_spec`)."""
    return msgspec.structs.replace(public_spec(a), correlation_id=None) == msgspec.structs.replace(
        public_spec(b), correlation_id=None
    )


def prepare(spec: TaskSpec) -> TaskSpec:
    """Give the spec its task id and correlation id (kept if the submitter chose them)."""
    return msgspec.structs.replace(
        spec,
        task_id=spec.task_id or f"t-{new_id()[:16]}",
        correlation_id=spec.correlation_id or new_id(),
    )


class Intake:
    """Takes submissions for the work queue. `submit` answers each with a `Submission`:
    accepted (queued now, or the same spec known already) or refused with a classified
    error; every refusal is recorded, and none ever ends a task that exists."""

    def __init__(
        self,
        js: JetStreamContext,
        emitter: Emitter,
        sink: EventSink,
        config: Config,
        *,
        metrics: Metrics | None = None,
        disk_full: Callable[[], str | None] = lambda: None,
        keyring: Keyring | None = None,
        track: Callable[[str], None] | None = None,
        ack_of: Callable[[str], asyncio.Future[PubAck]] | None = None,
    ) -> None:
        self.js = js
        # JetStream's ack of one event this process emits (`EventLog.ack_of`): a
        # `task.submitted` stored as new needs no reading back.
        self.ack_of = ack_of
        # Told of each task whose id the stream had never seen, before its first event.
        self.track = track
        self.keyring = keyring  # an end its node did not sign does not end a task
        self.metrics = metrics
        self.disk_full = disk_full
        self.emitter = emitter
        self.sink = sink
        self.config = config
        self._encoder = msgspec.json.Encoder()

    async def submit(self, spec: TaskSpec) -> Submission:
        """Queue `spec` or refuse it. Raises `NatsUnavailable` when nothing could be queued
        because NATS is unreachable (then no event claims the task was queued)."""
        given_id = spec.task_id is not None
        spec = prepare(spec)
        assert spec.task_id is not None and spec.correlation_id is not None
        em = self.emitter.for_task(spec.task_id, spec.correlation_id)
        try:
            admit(
                spec,
                self.config.bounds,
                self.config.policy,
                self.config.callbacks.allowed,
                self.config.sandbox.runtimes,
            )
        except SpecError as e:
            c = classify(Evidence(adapter_error=e.tag, adapter_message=str(e)))
            assert c is not None
            ids = await self._id_state(spec.task_id) if given_id else IdState()
            if not ids.free:
                return self._refuse_submission(em, spec, c, str(e))
            return self._end(em, spec, c, str(e), TaskRejected)
        ids = await self._id_state(spec.task_id) if given_id else IdState()
        known = self._known(ids, spec)
        if known is not None:
            return known
        full = self.disk_full()
        if full is not None:
            return self._end(em, spec, catalogue_entry("DISK_FULL", full), full, TaskRefused)
        if ids.state is None and self.track is not None:
            self.track(spec.task_id)
        msg_id = submitted_event_id(spec.task_id, ids.refusals)
        stored = self.ack_of(msg_id) if self.ack_of is not None else None
        try:
            submitted = em.emit(
                TaskSubmitted, event_id=msg_id, spec=public_spec(spec), priority=spec.priority
            )
            durable = await self.sink.flush(_SUBMITTED_DURABLE_S)
        finally:
            if stored is not None and not stored.done():
                stored.cancel()
        if not durable:
            # Refused to the client, so refused in the log too: the `task.submitted` waiting
            # in the outbox lands later with its `task.refused` behind it, never as a task
            # that was queued; the id stays free for the same spec.
            full = self.disk_full()
            if full is not None:
                return self._end(em, spec, catalogue_entry("DISK_FULL", full), full, TaskRefused)
            message = "task.submitted could not be made durable: NATS did not answer"
            self._end(em, spec, catalogue_entry("NATS_UNAVAILABLE", message), message, TaskRefused)
            raise NatsUnavailable("jetstream", "task.submitted could not be made durable")
        # A racing submission of the same id may have stored its `task.submitted` first:
        # JetStream's ack says so (a duplicate of its id), or the stream is read back.
        if stored is not None and not stored.cancelled() and not stored.result().duplicate:
            after = IdState(submitted=(stored.result().seq, submitted))
        else:
            after = await self._id_state(spec.task_id)
        if after.submitted is None:
            raise NatsUnavailable("jetstream", "task.submitted is not in the stream")
        if not same_spec(after.submitted[1].spec, spec):
            return self._duplicate(em, spec, after.submitted[0])
        try:
            ack = await self.js.publish(
                task_subject(spec.priority),
                self._encoder.encode(spec),
                headers={"Nats-Msg-Id": submitted_event_id(spec.task_id, ids.refusals)},
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
                refused = self._end(em, spec, c, c.message, TaskRefused)
                # Durable before the answer: a client that retries at once must find the
                # id free, not a task that seems queued.
                await self.sink.flush(_SUBMITTED_DURABLE_S)
                return refused
            raise EventLogError(f"SUP_TASKS refused the task: {e}") from e
        except (nats.errors.Error, OSError) as e:
            raise NatsUnavailable("jetstream", repr(e)) from e
        return Submission(spec.task_id, spec.correlation_id, True, stream_seq=ack.seq)

    def _known(self, ids: IdState, spec: TaskSpec) -> Submission | None:
        """The answer for an id that names a task already: the same spec again is that task
        (accepted, nothing recorded); another one is refused as DUPLICATE_TASK_ID. None for
        a free id (new, or refused for a passing reason)."""
        assert spec.task_id is not None and spec.correlation_id is not None
        if ids.free:
            return None
        em = self.emitter.for_task(spec.task_id, spec.correlation_id)
        if ids.submitted is None:  # rejected at admission: no spec was ever recorded
            return self._duplicate(em, spec, None)
        seq, stored = ids.submitted
        if same_spec(stored.spec, spec):
            return Submission(
                spec.task_id, stored.correlation_id, True, stream_seq=None, existing=True
            )
        return self._duplicate(em, spec, seq)

    def _duplicate(self, em: Emitter, spec: TaskSpec, seq: int | None) -> Submission:
        where = f"submitted at stream seq {seq}" if seq is not None else "rejected before"
        message = (
            f"task id {spec.task_id} is taken by another spec ({where}); submit again with "
            "another id, or the same spec"
        )
        c = Classification(
            type="validation",
            code="DUPLICATE_TASK_ID",
            retryable=False,
            message=message,
            details={"submitted_seq": seq},
        )
        return self._refuse_submission(em, spec, c, message)

    async def _id_state(self, task_id: str) -> IdState:
        """The id's state in the stream: one cheap look-up for an id never seen, its task
        events read back otherwise."""
        subject = f"sup.task.*.*.{task_id}"
        try:
            await self.js.get_msg(EVENTS_STREAM, seq=1, next=True, subject=subject)
        except nats.js.errors.NotFoundError:
            return IdState()
        except (nats.errors.Error, OSError) as e:
            raise NatsUnavailable("jetstream", f"looking up task {task_id}: {e!r}") from e
        try:
            messages = await read_task_messages(self.js, task_id, keyring=self.keyring)
        except (nats.errors.Error, OSError, TimeoutError) as e:
            raise NatsUnavailable("jetstream", f"reading task {task_id}: {e!r}") from e
        return id_state(messages)

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

    def _refuse_submission(
        self, em: Emitter, spec: TaskSpec, c: Classification, message: str
    ) -> Submission:
        """A submission refused under an id that names a task: an error about the
        submission (attempt 0), the task left as it is."""
        assert spec.task_id is not None and spec.correlation_id is not None
        emit_error(em, c, message)
        self._count(c)
        error = execution_error(em, c, message)
        return Submission(spec.task_id, spec.correlation_id, False, error=error)

    def _end(
        self,
        em: Emitter,
        spec: TaskSpec,
        c: Classification,
        message: str,
        kind: type[TaskRejected] | type[TaskRefused],
    ) -> Submission:
        """Refuse a submission under a free id (`supervisor.eventlog.outcomes.record_refusal`)."""
        assert spec.task_id is not None and spec.correlation_id is not None
        result = record_refusal(em, c, message, kind=kind)
        self._count(c)
        if self.metrics is not None:
            self.metrics.tasks.labels("rejected").inc()
        return Submission(spec.task_id, spec.correlation_id, False, error=result.error)
