"""`SUP_COMMANDS`: publishing cleanup commands, and carrying them out on the node.

`JetStreamCommands` publishes a command on `supcmd.<node>.cleanup` with
`Nats-Msg-Id = command_id`. `CommandExecutor` is the node's side: one durable pull
consumer per node (`cmd-<node>`, filtered on `supcmd.<node>.>`), shared by whichever
process of the node pulls (the daemon, `supervisor reconcile`). For each command it

- re-checks before touching anything: a container must still carry
  `supervisor.managed=true` and this node's id (whoever asked), a workspace must be a dir
  directly under this node's workspace root, an attempt must still be open in the log;
  anything else is `refused` and left alone;
- acts idempotently through the executor's `Cleaner` (kill, force-remove, remove the dir,
  each step a `cleanup.*` event) or, for a lost attempt, records its end; a resource
  already gone counts as done (`already_gone`);
- publishes a `reconcile.outcome`, then acks. A failed delivery is retried with
  exponential backoff (`nak` with a delay) until `command_attempts` deliveries, the last
  one `final`; the commands failing meanwhile are listed by `failing` (readiness details).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from schemas import (
    CleanupCommand,
    ExecutionError,
    KillIssued,
    ReconcileOutcome,
    ReconcileOutcomeKind,
    Result,
    RetryPolicy,
    TaskFailed,
    TaskSubmitted,
    decode_command,
    encode_command,
)
from schemas.config import ReconcileConfig
from schemas.errors import CommandBusError, ContainerVanished, SupervisorError
from schemas.labels import MANAGED as MANAGED_LABEL
from schemas.labels import NODE as NODE_LABEL
from schemas.labels import is_ours
from schemas.lifecycle import Keyring
from schemas.streams import COMMANDS_STREAM
from supervisor.docker.runtime import DockerRuntime
from supervisor.eventlog.emitter import Emitter
from supervisor.eventlog.history import read_task_events, summarize
from supervisor.eventlog.nats_client import MSG_ID_HEADER
from supervisor.execution.cleanup import Cleaner
from supervisor.execution.executor import KillClaim
from supervisor.execution.recovery import record_closing
from supervisor.execution.workspace import WORKSPACES
from supervisor.observability.metrics import Metrics
from supervisor.policy.classify import catalogue_entry
from supervisor.policy.retry import backoff_delay, should_retry
from supervisor.reconcile.reconciler import ReconcileMetrics

log = logging.getLogger("supervisor.reconcile.command_executor")

_ACK_WAIT_S = 120.0
_FETCH_S = 1.0


def consumer_name(node_id: str) -> str:
    return f"cmd-{node_id}"


class JetStreamCommands:
    """The `CommandBus` adapter."""

    def __init__(self, js: JetStreamContext, timeout: float = 5.0) -> None:
        self.js = js
        self.timeout = timeout

    async def publish(self, command: CleanupCommand) -> bool:
        try:
            ack = await self.js.publish(
                command.subject(),
                encode_command(command),
                timeout=self.timeout,
                stream=COMMANDS_STREAM,
                headers={MSG_ID_HEADER: command.command_id},
            )
        except (nats.errors.Error, OSError, TimeoutError) as e:
            raise CommandBusError(f"cannot publish command {command.command_id}: {e!r}") from e
        return not ack.duplicate


@dataclass(frozen=True)
class Failing:
    """A command whose last delivery failed; it will be delivered again."""

    command_id: str
    action: str
    resource: str
    deliveries: int
    detail: str


class CommandExecutor:
    """Carries out this node's cleanup commands (see the module docstring)."""

    def __init__(
        self,
        *,
        js: JetStreamContext,
        runtime: DockerRuntime,
        cleaner: Cleaner,
        emitter: Emitter,
        data_dir: Path,
        config: ReconcileConfig,
        metrics: Metrics,
        reconcile_metrics: ReconcileMetrics | None = None,
        claim_kill: Callable[[str, str], KillClaim] | None = None,
        claim_workspace: Callable[[str], str | None] | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        self.js = js
        self.keyring = keyring  # an end its node did not sign does not close an attempt
        self.claim_kill = claim_kill
        self.claim_workspace = claim_workspace
        self.runtime = runtime
        self.cleaner = cleaner
        self.emitter = emitter
        self.node_id = emitter.node_id
        self.workspace_root = Path(data_dir).resolve() / WORKSPACES
        self.config = config
        self.metrics = metrics
        self.rmetrics = reconcile_metrics
        self.retry = RetryPolicy(
            max_attempts=config.command_attempts,
            base_delay_s=config.command_backoff_s,
            max_delay_s=config.command_backoff_max_s,
            jitter=False,
        )
        self.failing: dict[str, Failing] = {}
        self._sub: JetStreamContext.PullSubscription | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, *, background: bool = True) -> None:
        """Create (or update) the node's consumer and bind to it; with `background`, pull
        and execute until `stop`. Raises CommandBusError."""
        cfg = ConsumerConfig(
            durable_name=consumer_name(self.node_id),
            filter_subject=f"supcmd.{self.node_id}.>",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=_ACK_WAIT_S,
            # A backstop: the executor ends a command itself after `command_attempts`; this
            # bounds a command that kills its executor each time.
            max_deliver=self.config.command_attempts + 2,
            max_ack_pending=-1,
        )
        try:
            await self.js.add_consumer(COMMANDS_STREAM, cfg)
            self._sub = await self.js.pull_subscribe_bind(
                durable=consumer_name(self.node_id), stream=COMMANDS_STREAM
            )
        except (nats.errors.Error, OSError, TimeoutError) as e:
            raise CommandBusError(f"cannot consume {COMMANDS_STREAM}: {e!r}") from e
        if background:
            self._loop_task = asyncio.create_task(self._loop(), name="command-executor")

    async def stop(self) -> None:
        """Stop pulling; let the commands under way finish (their teardown is cleanup)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._inflight:
            await asyncio.wait(self._inflight)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def drain(self, timeout: float = _FETCH_S) -> int:
        """Execute what the consumer holds now (not in the background); returns how many
        deliveries were handled. For `supervisor reconcile` and tests."""
        handled = 0
        while True:
            msgs = await self._fetch(self.config.command_concurrency, timeout)
            if not msgs:
                return handled
            await asyncio.gather(*(self._handle(m) for m in msgs))
            handled += len(msgs)

    async def _loop(self) -> None:
        limit = max(self.config.command_concurrency, 1)
        while True:
            free = limit - len(self._inflight)
            if free <= 0:
                await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await self._fetch(free, _FETCH_S)
            except CommandBusError as e:
                log.warning("%s; retrying", e)
                await asyncio.sleep(_FETCH_S)
                continue
            for msg in msgs:
                task = asyncio.create_task(self._handle(msg))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def _fetch(self, batch: int, timeout: float) -> list[Msg]:
        assert self._sub is not None, "start() first"
        try:
            return await self._sub.fetch(batch, timeout=timeout)
        except TimeoutError:  # nothing came (nats-py raises its own or asyncio's)
            return []
        except (nats.errors.Error, OSError) as e:
            raise CommandBusError(f"cannot pull from {COMMANDS_STREAM}: {e!r}") from e

    # --- one delivery --------------------------------------------------------------------------

    async def _handle(self, msg: Msg) -> None:
        delivery = msg.metadata.num_delivered or 1
        try:
            cmd = decode_command(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            msg_id = (msg.headers or {}).get(MSG_ID_HEADER, "")
            self.emitter.emit(
                ReconcileOutcome,
                command_id=msg_id,
                outcome="refused",
                delivery=delivery,
                detail=f"undecodable command: {e}",
            )
            await _settle(msg.term())
            return
        try:
            outcome, detail = await self.execute(cmd)
        except SupervisorError as e:
            outcome, detail = "failed", f"{type(e).__name__}: {e}"
        except Exception as e:  # a bug must not lose the command: it is retried, and logged
            log.exception("command %s crashed", cmd.command_id)
            outcome, detail = "failed", f"{type(e).__name__}: {e}"
        final = outcome != "failed" or not should_retry(self.retry, delivery, True)
        self.emitter.emit(
            ReconcileOutcome,
            command_id=cmd.command_id,
            outcome=outcome,
            final=final,
            delivery=delivery,
            rule=cmd.rule,
            action=cmd.action,
            resource_kind=cmd.resource_kind,
            resource=cmd.resource,
            resource_task_id=cmd.task_id,
            resource_attempt=cmd.attempt,
            decision_id=cmd.decision_id,
            detail=detail,
        )
        self._count(cmd, outcome, final)
        if final:
            self.failing.pop(cmd.command_id, None)
            await _settle(msg.ack() if outcome != "failed" else msg.term())
        else:
            self.failing[cmd.command_id] = Failing(
                cmd.command_id, cmd.action, cmd.resource, delivery, detail
            )
            await _settle(msg.nak(delay=backoff_delay(self.retry, delivery)))
        if self.rmetrics is not None:
            self.rmetrics.failing.set(len(self.failing))

    def _count(self, cmd: CleanupCommand, outcome: str, final: bool) -> None:
        m = self.rmetrics
        if m is None:
            return
        if outcome in ("succeeded", "already_gone"):
            m.succeeded.labels(cmd.action).inc()
        elif outcome == "refused":
            m.refused.labels(cmd.action).inc()
        else:
            m.failed.labels(cmd.action, str(final).lower()).inc()

    async def execute(self, cmd: CleanupCommand) -> tuple[ReconcileOutcomeKind, str]:
        """Carry out one command: (outcome, detail). Raises the project's errors for a
        failure worth retrying (Docker unreachable, the stream unreadable)."""
        if cmd.node_id != self.node_id:
            return "refused", f"addressed to node {cmd.node_id}, this is {self.node_id}"
        em = self.emitter.for_task(cmd.task_id, cmd.correlation_id).for_attempt(cmd.attempt)
        match cmd.action:
            case "remove_container":
                return await self._remove_container(em, cmd.resource)
            case "remove_workspace":
                return await self._remove_workspace(em, cmd.resource)
            case "close_attempt":
                return await self._close_attempt(em, cmd)
        return "refused", f"unknown action {cmd.action}"  # pragma: no cover (Literal)

    async def _remove_container(self, em: Emitter, cid: str) -> tuple[ReconcileOutcomeKind, str]:
        try:
            labels: dict[str, str] | None = await self.runtime.labels(cid)
        except ContainerVanished:
            labels = None
        if labels is not None and not is_ours(labels, self.node_id, str(self.workspace_root)):
            return "refused", (
                f"container {cid[:12]} is not a managed container of node {self.node_id} "
                f"(managed={labels.get(MANAGED_LABEL)!r}, node={labels.get(NODE_LABEL)!r})"
            )
        running = False
        if labels is not None:
            try:
                running = (await self.runtime.inspect(cid)).running
            except ContainerVanished:
                labels = None
        if running:
            # The executor's own knowledge first: a live attempt of this instance is never
            # killed before its deadline, and one past it records the kill as its own.
            claim = self.claim_kill(cid, "reconcile") if self.claim_kill else None
            if claim is not None and claim.status == "refused":
                return "refused", claim.reason
            if claim is None or claim.status == "not_ours":
                em.emit(KillIssued, container_id=cid, reason="reconcile")
        # Also when it is gone: the removal step then records it as already gone.
        report = await self.cleaner.clean(em, cid, None, running=running)
        if not report.ok:
            return "failed", "a cleanup step failed (its cleanup.failed event has the reason)"
        # Killed here, it may still be removed by its attempt's own cleanup first.
        if labels is None or (report.container_already_gone and not running):
            return "already_gone", f"container {cid[:12]} was gone already"
        return "succeeded", f"container {cid[:12]} {'killed and ' if running else ''}removed"

    async def _remove_workspace(self, em: Emitter, raw: str) -> tuple[ReconcileOutcomeKind, str]:
        path = Path(raw)
        parent = Path(os.path.realpath(path.parent)) if path.is_absolute() else None
        if parent != self.workspace_root or path.name in ("", ".", "..") or path.is_symlink():
            return "refused", f"{raw} is not a workspace dir under {self.workspace_root}"
        refused = self.claim_workspace(str(path)) if self.claim_workspace else None
        if refused is not None:
            return "refused", refused
        gone = not path.exists()
        report = await self.cleaner.clean(em, None, path, running=False)
        if not report.ok:
            return "failed", "removing the dir failed (its cleanup.failed event has the reason)"
        return (
            ("already_gone", f"{raw} was gone already") if gone else ("succeeded", f"{raw} removed")
        )

    async def _close_attempt(
        self, em: Emitter, cmd: CleanupCommand
    ) -> tuple[ReconcileOutcomeKind, str]:
        # The stream, not the projection, is the authority at the moment of acting.
        try:
            events = await read_task_events(self.js, cmd.task_id, keyring=self.keyring)
            history = summarize(events)
        except (nats.errors.Error, TimeoutError) as e:
            raise CommandBusError(f"cannot read the history of {cmd.task_id}: {e!r}") from e
        if history.terminal is not None or history.open_attempt != cmd.attempt:
            return "already_gone", f"attempt {cmd.attempt} of {cmd.task_id} is already closed"
        code = cmd.error_code or "SUPERVISOR_LOST"
        c = catalogue_entry(
            code,
            f"closed by the reconciler ({cmd.rule})",
            lost_instance=history.open_instance,
            command_id=cmd.command_id,
            decision_id=cmd.decision_id,
        )
        # Deterministic ids: a command carried out twice, or racing the redelivery of the
        # task, records the closing once.
        record_closing(em, cmd.task_id, cmd.attempt, c)
        self.metrics.errors.labels(c.type, c.code).inc()
        if cmd.fail_task:
            error = ExecutionError(
                type=c.type,
                code=c.code,
                message=c.message,
                retryable=c.retryable,
                details=c.details,
                task_id=cmd.task_id,
                timestamp=em.clock().isoformat(),
            )
            result = Result(task_id=cmd.task_id, status="failed", attempts=cmd.attempt, error=error)
            submitted = next((e for e in events if isinstance(e, TaskSubmitted)), None)
            em.emit(
                TaskFailed,
                event_id=f"{cmd.command_id}.task",
                result=result,
                callback_url=submitted.spec.callback_url if submitted else None,
            )
            self.metrics.tasks.labels("failed").inc()
        return "succeeded", f"attempt {cmd.attempt} of {cmd.task_id} closed as {code}"


async def _settle(action: Awaitable[None]) -> None:
    """Ack/nak/term, ignoring a connection lost meanwhile (the delivery then comes back)."""
    with contextlib.suppress(Exception):
        await action
