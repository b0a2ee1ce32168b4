"""One reconcile pass: observe the node, publish what it saw, decide from the projection,
and order the cleanups.

A pass (1) lists the containers carrying `supervisor.managed=true` and this node's id and
the workspace dirs on disk (the only reading of Docker and the disk) and publishes them as a
`node.inventory` event; (2) waits until the projection shows that very event, so it judges
the node on facts at least as new as its own observation; (3) runs the pure rules of
`supervisor.policy.divergence` over the projected state; (4) records each new divergence as a
`reconcile.decision` event and, unless it is a dry run, waits for those to be durable in
`SUP_EVENTS` and then publishes one cleanup command per divergence to `SUP_COMMANDS`.

Decisions and commands carry deterministic ids (from the rule's resource and the number of
final outcomes it already had), published as `Nats-Msg-Id`: two passes, or two reconcilers
racing on the same leak, store one decision and one command. A divergence whose command is
already in the log without a final outcome gets no new decision; its command is published
again, which JetStream drops unless the first copy was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas import (
    NO_TASK,
    CleanupCommand,
    NodeInventory,
    ObservedContainer,
    ObservedWorkspace,
    ReconcileDecision,
)
from schemas.config import ReconcileConfig
from schemas.errors import CommandBusError, ProjectionLagging
from schemas.labels import is_ours
from schemas.projected import ProjectedState
from supervisor.eventlog.emitter import Emitter, new_id, utcnow
from supervisor.execution.workspace import WORKSPACES
from supervisor.policy.divergence import RULES, Planned, RuleConfig, oldest_leak_s, plan

log = logging.getLogger("supervisor.reconcile.reconciler")

_POLL_S = 0.025


class StateSource(Protocol):
    """The projection, as the rules read it."""

    async def load(self, node_id: str, inventory_id: str) -> ProjectedState | None:
        """The projected state of `node_id` once the projection holds the `node.inventory`
        event `inventory_id` (its latest inventory is then at least that one); None while it
        does not yet. Raises the project's errors when the projection cannot be read."""
        ...


class Observer(Protocol):
    """Docker, as far as a pass reads it (`supervisor.docker.runtime.DockerRuntime`)."""

    async def list_managed(self, node_id: str) -> list[dict[str, Any]]: ...


class CommandBus(Protocol):
    """`SUP_COMMANDS` (`supervisor.reconcile.command_executor.JetStreamCommands`)."""

    async def publish(self, command: CleanupCommand) -> bool:
        """Publish with `Nats-Msg-Id = command_id`; True if stored, False if JetStream
        dropped it as a duplicate. Raises CommandBusError."""
        ...


class ReconcileMetrics:
    """The reconciler's Prometheus metrics, in the node's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.passes = Counter(
            "supervisor_reconcile_passes", "Reconcile passes by outcome", ["outcome"], registry=r
        )
        self.pass_duration = Histogram(
            "supervisor_reconcile_pass_duration_seconds",
            "Wall time of a reconcile pass",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.divergences = Counter(
            "supervisor_reconcile_divergences",
            "Divergences decided (new decisions), by rule",
            ["rule"],
            registry=r,
        )
        self.open = Gauge(
            "supervisor_reconcile_open_divergences",
            "Divergences found by the last pass, by rule",
            ["rule"],
            registry=r,
        )
        self.oldest_leak = Gauge(
            "supervisor_reconcile_oldest_leak_seconds",
            "Age of the oldest divergence the last pass found",
            registry=r,
        )
        self.issued = Counter(
            "supervisor_reconcile_commands_issued",
            "Cleanup commands stored in SUP_COMMANDS",
            ["action"],
            registry=r,
        )
        self.succeeded = Counter(
            "supervisor_reconcile_commands_succeeded",
            "Cleanup commands carried out (or found already done)",
            ["action"],
            registry=r,
        )
        self.failed = Counter(
            "supervisor_reconcile_commands_failed",
            "Failed deliveries of cleanup commands (retried until the last)",
            ["action", "final"],
            registry=r,
        )
        self.refused = Counter(
            "supervisor_reconcile_commands_refused",
            "Cleanup commands refused: not this node's managed resource",
            ["action"],
            registry=r,
        )
        self.failing = Gauge(
            "supervisor_reconcile_commands_failing",
            "Commands whose last delivery failed and that will be retried",
            registry=r,
        )
        self.last_pass = Gauge(
            "supervisor_reconcile_last_pass_timestamp_seconds",
            "When the last successful pass ended (Unix time)",
            registry=r,
        )


@dataclass
class PassReport:
    """What one pass saw and did. `planned` holds every divergence found (pending ones,
    already being carried out, included); `decided` the decision events of this pass;
    `commands` the ids of the commands it published (`issued` of them were new, the rest
    duplicates JetStream dropped); `deferred` divergences were left for the next pass
    (`max_commands_per_pass`); `projection_wait_s` is how long the projection took to show
    the pass's inventory (and the state was read)."""

    pass_id: str
    dry_run: bool
    inventory_id: str
    inventory_seq: int
    containers: int
    workspaces: int
    planned: list[Planned] = field(default_factory=list)
    decided: list[ReconcileDecision] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    deferred: int = 0
    issued: int = 0
    duplicates: int = 0
    oldest_leak_s: float = 0.0
    duration_s: float = 0.0
    projection_wait_s: float = 0.0


def rule_config(cfg: ReconcileConfig) -> RuleConfig:
    return RuleConfig(
        creation_grace_s=cfg.creation_grace_s,
        deadline_grace_s=cfg.deadline_grace_s,
        heartbeat_timeout_s=cfg.heartbeat_timeout_s,
        lost_attempt_grace_s=cfg.lost_attempt_grace_s,
        max_attempt_s=cfg.max_attempt_s,
    )


def list_workspaces(root: Path) -> list[ObservedWorkspace]:
    """Every dir directly under `root` (none when it does not exist)."""
    out = []
    with contextlib.suppress(FileNotFoundError), os.scandir(root) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    out.append(ObservedWorkspace(path=entry.path, created=entry.stat().st_mtime))
    return sorted(out, key=lambda w: w.path)


def observed_container(raw: dict[str, Any]) -> ObservedContainer:
    """A `docker ps --all` entry, keeping only the `supervisor.*` labels."""
    labels = raw.get("Labels") or {}
    return ObservedContainer(
        container_id=str(raw["Id"]),
        state=str(raw.get("State") or ""),
        created=float(raw.get("Created") or 0.0),
        labels={k: str(v) for k, v in labels.items() if k.startswith("supervisor.")},
    )


class Reconciler:
    """Runs passes for one node. `emitter` is the node's (its sink must offer `flush`);
    `bus` may be None for dry runs only."""

    def __init__(
        self,
        *,
        emitter: Emitter,
        observer: Observer,
        state: StateSource,
        bus: CommandBus | None,
        data_dir: Path,
        config: ReconcileConfig,
        metrics: ReconcileMetrics | None = None,
        clock: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.emitter = emitter
        self.node_id = emitter.node_id
        self.observer = observer
        self.state = state
        self.bus = bus
        self.workspace_root = Path(data_dir).resolve() / WORKSPACES
        self.config = config
        self.rules = rule_config(config)
        self.metrics = metrics
        self.clock = clock
        self.sleep = sleep
        self.last: PassReport | None = None
        self.last_error: str | None = None
        self.failures_in_row = 0

    async def run_pass(self, *, dry_run: bool = False) -> PassReport:
        """One pass. Raises ProjectionLagging, CommandBusError, DockerError: the pass is
        then counted as failed and the next one starts from scratch."""
        started = time.monotonic()
        try:
            report = await self._pass(dry_run)
        except Exception as e:
            self.failures_in_row += 1
            self.last_error = f"{type(e).__name__}: {e}"
            if self.metrics is not None:
                self.metrics.passes.labels("failed").inc()
            raise
        report.duration_s = time.monotonic() - started
        self.last, self.last_error, self.failures_in_row = report, None, 0
        if self.metrics is not None:
            self._measure(report)
        return report

    async def _pass(self, dry_run: bool) -> PassReport:
        pass_id = new_id()[:16]
        observed_at = self.clock()
        listed = await self.observer.list_managed(self.node_id)
        root = str(self.workspace_root)
        containers = tuple(
            observed_container(c)
            for c in listed
            if is_ours(c.get("Labels") or {}, self.node_id, root)
        )
        workspaces = tuple(await asyncio.to_thread(list_workspaces, self.workspace_root))
        inventory = self.emitter.emit(
            NodeInventory,
            observed_at=observed_at,
            workspace_root=str(self.workspace_root),
            containers=containers,
            workspaces=workspaces,
            pass_id=pass_id,
        )
        waiting = time.monotonic()
        state = await self._projected(inventory.event_id)
        waited = time.monotonic() - waiting
        now = self.clock()
        planned = plan(state, now, self.rules)
        report = PassReport(
            pass_id,
            dry_run,
            inventory.event_id,
            state.inventory.seq,
            len(containers),
            len(workspaces),
            planned,
            oldest_leak_s=oldest_leak_s((p.divergence for p in planned), now),
            projection_wait_s=waited,
        )
        due = [p for p in planned if dry_run or not p.pending]
        cap = self.config.max_commands_per_pass
        report.deferred = max(len(due) - cap, 0)
        decided = {p.command_id: self._decide(p, state, pass_id, dry_run) for p in due[:cap]}
        report.decided = list(decided.values())
        if dry_run:
            return report
        if self.bus is None:
            raise ValueError("a reconciler without a command bus can only do dry runs")
        # Decisions are in the stream before their commands: whoever carries a command
        # out, its cleanup events follow the decision that explains them.
        if decided and not await self.emitter.sink.flush(self.config.projection_wait_s):
            raise CommandBusError(
                "the decisions are not in SUP_EVENTS yet; no command is "
                "ordered before the decision that explains it"
            )
        for p in planned:
            if p.pending or p.command_id in decided:
                stored = await self.bus.publish(self._command(p, state, decided))
                report.commands.append(p.command_id)
                report.issued += stored
                report.duplicates += not stored
                if stored and self.metrics is not None:
                    self.metrics.issued.labels(p.divergence.action).inc()
        return report

    async def _projected(self, inventory_id: str) -> ProjectedState:
        """Poll the projection (a cheap lookup while the inventory is not there) until it
        shows `inventory_id`, at most `projection_wait_s`."""
        limit = self.config.projection_wait_s
        started = time.monotonic()
        while True:
            state = await self.state.load(self.node_id, inventory_id)
            if state is not None:
                return dataclasses.replace(state, self_instance=self.emitter.instance_id)
            if time.monotonic() - started >= limit:
                raise ProjectionLagging(inventory_id, limit)
            await self.sleep(_POLL_S)

    def _decide(
        self, p: Planned, state: ProjectedState, pass_id: str, dry_run: bool
    ) -> ReconcileDecision:
        d = p.divergence
        return self.emitter.emit(
            ReconcileDecision,
            # A dry run records what it would do each time it is asked; a real decision is
            # one event per command, whoever takes it.
            event_id=None if dry_run else f"dec-{p.command_id}",
            rule=d.rule,
            resource_kind=d.resource_kind,
            resource=d.resource,
            action=d.action,
            evidence_seqs=d.evidence,
            reason=d.reason,
            dry_run=dry_run,
            command_id=p.command_id,
            resource_task_id=d.task_id,
            resource_attempt=d.attempt,
            since=d.since,
            pass_id=pass_id,
        )

    def _command(
        self, p: Planned, state: ProjectedState, decided: dict[str, ReconcileDecision]
    ) -> CleanupCommand:
        d = p.divergence
        task = state.tasks.get(d.task_id)
        decision = decided.get(p.command_id)
        # Its cleanup events belong to the attempt the log knows; a resource of an attempt
        # the log never saw start is cleaned up outside any task.
        known = (d.task_id, d.attempt) in state.attempts
        return CleanupCommand(
            command_id=p.command_id,
            node_id=self.node_id,
            action=d.action,
            resource_kind=d.resource_kind,
            resource=d.resource,
            rule=d.rule,
            decision_id=decision.event_id if decision else f"dec-{p.command_id}",
            issued_at=self.clock(),
            task_id=d.task_id if known else NO_TASK,
            attempt=d.attempt if known else 0,
            correlation_id=task.correlation_id if task and known else "",
            error_code=d.error_code,
            fail_task=d.fail_task,
        )

    def _measure(self, report: PassReport) -> None:
        m = self.metrics
        assert m is not None
        m.passes.labels("ok").inc()
        m.pass_duration.observe(report.duration_s)
        m.oldest_leak.set(report.oldest_leak_s)
        m.last_pass.set(time.time())
        found = Tally(p.divergence.rule for p in report.planned)
        for rule, _ in RULES:
            m.open.labels(rule).set(found.get(rule, 0))
        if not report.dry_run:
            for decision in report.decided:
                m.divergences.labels(decision.rule).inc()
