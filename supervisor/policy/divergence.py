"""The divergence rules: where what the node observes differs from the projected lifecycle.

Pure: every rule is a function of (projected state, now, rule config) and returns the
`Divergence`s it finds, each with its rule's name, the resource, the action that repairs
it, the `SUP_EVENTS` sequences that prove it and the moment it began (for the leak age).
The projected state is what `supervisor.reconcile.reconciler.StateSource` reads from the projection:
the node's latest `node.inventory` (the only reading of Docker and the disk) and the
lifecycle of containers, workspaces, attempts, tasks and instances.

Rules, in the order they claim a resource (one divergence per resource):

- `unresolved_cleanup_failure`: a `cleanup.failed` whose resource is still observed;
- `overdue_container`: running `deadline_grace_s` past its `supervisor.deadline`;
- `orphan_container`: observed, and its task or attempt is terminal, or its task is
  unknown, or its instance is dead; spared while younger than `creation_grace_s` unless its
  instance is known dead; an exited one of a live instance is spared for
  `creation_grace_s` after its attempt ended (that instance removes it right after the
  outcome; `leaked_workspace` spares a workspace alike). A warm pool's parked container (never adopted) is spared while
  the instance that parked it lives, and removed once it is dead or its retirement failed;
- `vanished_container`: recorded as created and not removed, absent from an inventory taken
  `creation_grace_s` after its creation: its removal is recorded, and its attempt, if left
  open by a dead instance, is closed as `CONTAINER_VANISHED`;
- `leaked_workspace`: a workspace dir on disk whose attempt is terminal, whose instance is
  dead, or (past the grace) that the log does not know;
- `vanished_workspace`: recorded as present, gone from the disk, its attempt over;
- `lost_attempt`: an attempt the projection says runs, whose instance is dead (no
  heartbeat within its timeout, or stopped) or, for an instance that publishes no
  heartbeats, that is past its deadline; closed as `SUPERVISOR_LOST` once its task has been
  quiet for `lost_attempt_grace_s`.

Liveness: an instance that stopped is dead; one that published heartbeats is dead once the
last is older than its timeout; one that never did (a `supervisor run`, an older daemon) is
of unknown liveness and presumed alive: only deadlines end its work. Nothing here ever
proposes to touch a container that the inventory does not show with
`supervisor.managed=true` and this node's id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from schemas import NO_TASK, CleanupAction, ResourceKind
from schemas.projected import (
    ContainerRecord,
    ParkedRecord,
    ProjectedState,
    SeenContainer,
    WorkspaceRecord,
)
from supervisor.policy.liveness import Life as Life
from supervisor.policy.liveness import Liveness as Liveness
from supervisor.policy.liveness import RuleConfig as RuleConfig
from supervisor.policy.liveness import age_s as _age_s
from supervisor.policy.liveness import liveness as liveness


@dataclass(frozen=True, kw_only=True)
class Divergence:
    rule: str
    resource_kind: ResourceKind
    resource: str
    action: CleanupAction
    evidence: tuple[int, ...]
    reason: str
    since: datetime
    task_id: str = NO_TASK
    attempt: int = 0
    error_code: str | None = None
    fail_task: bool = False


# --- helpers -------------------------------------------------------------------------------


def _in_grace(life: Life, now: datetime, created_at: datetime, cfg: RuleConfig) -> bool:
    """Too young to judge: made less than `creation_grace_s` ago by a process not dead."""
    return life.status != "dead" and _age_s(now, created_at) < cfg.creation_grace_s


def _removal(
    rule: str,
    resource: str,
    why: tuple[str, tuple[int, ...], datetime],
    state: ProjectedState,
    rec: ContainerRecord | WorkspaceRecord | None,
    owner: tuple[str, int],
) -> Divergence:
    """The removal of a container or workspace (`rule` ends with its kind) that nothing
    owns: `why` is (reason, proving sequences, since when)."""
    reason, proof, since = why
    container = rule.endswith("container")
    return Divergence(
        rule=rule,
        resource_kind="container" if container else "workspace",
        resource=resource,
        action="remove_container" if container else "remove_workspace",
        evidence=_seqs(state.inventory.seq, rec.created_seq if rec else None, *proof),
        reason=f"{'observed' if container else 'on disk'}, and {reason}",
        since=since,
        task_id=owner[0],
        attempt=owner[1],
    )


def command_id(node_id: str, action: str, resource: str, generation: int) -> str:
    """The deterministic id of the command for (action, resource) after `generation` final
    outcomes: every reconciler reading the same projection computes the same id, and
    JetStream's duplicate window keeps one copy."""
    key = "\x00".join((node_id, action, resource, str(generation)))
    return "cmd-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def attempt_resource(task_id: str, attempt: int) -> str:
    return f"{task_id}/{attempt}"


def _seqs(*seqs: int | None) -> tuple[int, ...]:
    return tuple(sorted({s for s in seqs if s is not None}))


def _ours(state: ProjectedState) -> Iterable[SeenContainer]:
    """The observed containers a rule may propose to touch."""
    for c in state.inventory.containers.values():
        if c.managed and c.node_id == state.node_id:
            yield c


def _over(state: ProjectedState, task_id: str, attempt: int) -> tuple[str, int, datetime] | None:
    """(why, proof, since) when the task or the attempt has reached its end."""
    task = state.tasks.get(task_id)
    if task is not None and task.finished_seq is not None and task.finished_at is not None:
        return f"its task {task.state}", task.finished_seq, task.finished_at
    att = state.attempts.get((task_id, attempt))
    if att is not None and att.finished_seq is not None and att.finished_at is not None:
        return f"its attempt {attempt} finished", att.finished_seq, att.finished_at
    return None


def _unowned(
    state: ProjectedState, task_id: str, attempt: int, life: Life, created_at: datetime
) -> tuple[str, tuple[int, ...], datetime] | None:
    """Why a resource of (task, attempt) has nobody to clean it up, or None."""
    over = _over(state, task_id, attempt)
    if over is not None:
        return over[0], (over[1],), over[2]
    if life.status == "dead":
        return life.reason, life.evidence, life.since or created_at
    if task_id not in state.tasks and (task_id, attempt) not in state.attempts:
        return f"its task {task_id} is unknown to the log", (), created_at
    return None


def _being_removed(
    life: Life, why: tuple[str, tuple[int, ...], datetime], now: datetime, cfg: RuleConfig
) -> bool:
    """A live instance removes an attempt's resources right after the attempt's outcome
    (the removal follows it): within `creation_grace_s` of that end, leave them to it."""
    return life.status == "live" and _age_s(now, why[2]) < cfg.creation_grace_s


def _parked_unowned(
    state: ProjectedState, p: ParkedRecord, now: datetime, cfg: RuleConfig
) -> tuple[str, tuple[int, ...], datetime] | None:
    """Why a warm pool's parked container (or its workspace) has nobody to remove it: its
    pool gave it up and the removal failed, or the instance that parked it is dead. None
    while that instance may still adopt or retire it."""
    if p.state == "retire_failed":
        proof = (p.parked_seq, p.retired_seq) if p.retired_seq else (p.parked_seq,)
        return "its pool retired it and the removal failed", proof, p.retired_at or p.parked_at
    life = liveness(state, p.instance_id, now, cfg)
    if life.status != "dead":
        return None
    return (
        f"it is parked by a dead instance: {life.reason}",
        (p.parked_seq, *life.evidence),
        (life.since or p.parked_at),
    )


def _parked_workspaces(state: ProjectedState) -> dict[str, ParkedRecord]:
    return {p.workspace: p for p in state.parked.values()}


# --- the rules -----------------------------------------------------------------------------


def unresolved_cleanup_failure(
    state: ProjectedState, now: datetime, cfg: RuleConfig
) -> list[Divergence]:
    inv = state.inventory
    found: list[tuple[ResourceKind, str, ContainerRecord | WorkspaceRecord | None, str]] = [
        ("container", c.container_id, state.containers.get(c.container_id), "still there")
        for c in _ours(state)
    ] + [
        ("workspace", w.path, state.workspaces.get(w.path), "still on disk")
        for w in inv.workspaces.values()
    ]
    out = []
    for kind, resource, rec, where in found:
        if rec is None or rec.failed_seq is None or rec.removed_seq is not None:
            continue
        out.append(
            Divergence(
                rule="unresolved_cleanup_failure",
                resource_kind=kind,
                resource=resource,
                action="remove_container" if kind == "container" else "remove_workspace",
                evidence=_seqs(inv.seq, rec.failed_seq),
                reason=f"a cleanup of it failed and it is {where}",
                since=rec.failed_at or inv.observed_at,
                task_id=rec.task_id,
                attempt=rec.attempt,
            )
        )
    return out


def overdue_container(state: ProjectedState, now: datetime, cfg: RuleConfig) -> list[Divergence]:
    out = []
    for c in _ours(state):
        rec = state.containers.get(c.container_id)
        deadline = c.deadline or (rec.deadline if rec else None)
        if not c.running or deadline is None:
            continue
        late = _age_s(now, deadline)
        if late <= cfg.deadline_grace_s:
            continue
        task_id, attempt = _owner(c, rec)
        out.append(
            Divergence(
                rule="overdue_container",
                resource_kind="container",
                resource=c.container_id,
                action="remove_container",
                evidence=_seqs(state.inventory.seq, rec.created_seq if rec else None),
                reason=f"running {late:.0f}s past its deadline (grace {cfg.deadline_grace_s:g}s)",
                since=deadline,
                task_id=task_id,
                attempt=attempt,
            )
        )
    return out


def orphan_container(state: ProjectedState, now: datetime, cfg: RuleConfig) -> list[Divergence]:
    out = []
    for c in _ours(state):
        rec = state.containers.get(c.container_id)
        parked = state.parked.get(c.container_id)
        if parked is not None and rec is None:  # a warm pool's, never adopted
            why = _parked_unowned(state, parked, now, cfg)
            if why is not None:
                out.append(
                    _removal("orphan_container", c.container_id, why, state, None, (NO_TASK, 0))
                )
            continue
        task_id, attempt = _owner(c, rec)
        life = liveness(state, c.instance_id or (rec.instance_id if rec else None), now, cfg)
        why = _unowned(state, task_id, attempt, life, c.created_at)
        if why is None or _in_grace(life, now, c.created_at, cfg):
            continue
        if not c.running and _being_removed(life, why, now, cfg):
            continue
        out.append(
            _removal("orphan_container", c.container_id, why, state, rec, (task_id, attempt))
        )
    return out


def vanished_container(state: ProjectedState, now: datetime, cfg: RuleConfig) -> list[Divergence]:
    inv = state.inventory
    index = _Attempts.of(state)
    out = []
    for p in state.parked.values():
        # A parked container gone from the engine: its live pool records that itself; for a
        # dead pool (or a failed retirement) the removal is recorded here.
        if (
            p.container_id in inv.containers
            or p.container_id in state.containers
            or _age_s(inv.observed_at, p.parked_at) < cfg.creation_grace_s
            or _parked_unowned(state, p, now, cfg) is None
        ):
            continue
        out.append(
            Divergence(
                rule="vanished_container",
                resource_kind="container",
                resource=p.container_id,
                action="remove_container",
                evidence=_seqs(inv.seq, p.parked_seq),
                reason="parked, absent from the inventory: its removal is recorded",
                since=inv.observed_at,
            )
        )
    for rec in state.containers.values():
        if (
            rec.node_id != state.node_id
            or rec.removed_seq is not None
            or rec.created_at is None
            or rec.container_id in inv.containers
            or _age_s(inv.observed_at, rec.created_at) < cfg.creation_grace_s
        ):
            continue
        evidence = _seqs(inv.seq, rec.created_seq)
        out.append(
            Divergence(
                rule="vanished_container",
                resource_kind="container",
                resource=rec.container_id,
                action="remove_container",
                evidence=evidence,
                reason="recorded as created, absent from the inventory: its removal is recorded",
                since=inv.observed_at,
                task_id=rec.task_id,
                attempt=rec.attempt,
            )
        )
        closing = _closable(state, rec.task_id, rec.attempt, now, cfg, index)
        if closing is not None:
            life, fail_task = closing
            out.append(
                Divergence(
                    rule="vanished_container",
                    resource_kind="attempt",
                    resource=attempt_resource(rec.task_id, rec.attempt),
                    action="close_attempt",
                    evidence=_seqs(*evidence, *life.evidence),
                    reason=f"its container vanished and {life.reason}",
                    since=life.since or inv.observed_at,
                    task_id=rec.task_id,
                    attempt=rec.attempt,
                    error_code="CONTAINER_VANISHED",
                    fail_task=fail_task,
                )
            )
    return out


def leaked_workspace(state: ProjectedState, now: datetime, cfg: RuleConfig) -> list[Divergence]:
    inv = state.inventory
    parked = _parked_workspaces(state)
    out = []
    for w in inv.workspaces.values():
        rec = state.workspaces.get(w.path)
        p = parked.get(w.path)
        if p is not None and rec is None:  # a parked container's, never adopted
            pwhy = _parked_unowned(state, p, now, cfg)
            if pwhy is not None:
                out.append(_removal("leaked_workspace", w.path, pwhy, state, None, (NO_TASK, 0)))
            continue
        task_id = rec.task_id if rec else (w.task_id or NO_TASK)
        attempt = rec.attempt if rec else (w.attempt or 0)
        att = state.attempts.get((task_id, attempt))
        instance = rec.instance_id if rec else (att.instance_id if att else None)
        life = liveness(state, instance, now, cfg)
        if rec is not None and rec.removed_seq is not None:
            why: tuple[str, tuple[int, ...], datetime] | None = (
                "recorded as removed yet still on disk",
                (rec.removed_seq,),
                w.created_at,
            )
        else:
            why = _unowned(state, task_id, attempt, life, w.created_at)
        if why is None or _in_grace(life, now, w.created_at, cfg):
            continue
        if (rec is None or rec.removed_seq is None) and _being_removed(life, why, now, cfg):
            continue
        out.append(_removal("leaked_workspace", w.path, why, state, rec, (task_id, attempt)))
    return out


def vanished_workspace(state: ProjectedState, now: datetime, cfg: RuleConfig) -> list[Divergence]:
    inv = state.inventory
    root = inv.workspace_root.rstrip("/") + "/"
    out = []
    for rec in state.workspaces.values():
        if (
            rec.node_id != state.node_id
            or rec.removed_seq is not None
            or rec.created_at is None
            or not rec.path.startswith(root)
            or rec.path in inv.workspaces
            or _age_s(inv.observed_at, rec.created_at) < cfg.creation_grace_s
        ):
            continue
        life = liveness(state, rec.instance_id, now, cfg)
        over = _over(state, rec.task_id, rec.attempt)
        if over is None and life.status != "dead":
            continue  # its attempt runs: its own cleanup will record it
        proof = over[1] if over else None
        out.append(
            Divergence(
                rule="vanished_workspace",
                resource_kind="workspace",
                resource=rec.path,
                action="remove_workspace",
                evidence=_seqs(inv.seq, rec.created_seq, proof, *life.evidence),
                reason="recorded as present, gone from the disk: its removal is recorded",
                since=inv.observed_at,
                task_id=rec.task_id,
                attempt=rec.attempt,
            )
        )
    return out


def lost_attempt(state: ProjectedState, now: datetime, cfg: RuleConfig) -> list[Divergence]:
    out = []
    index = _Attempts.of(state)
    for att in state.attempts.values():
        if att.node_id != state.node_id:
            continue
        closing = _closable(state, att.task_id, att.attempt, now, cfg, index)
        if closing is None:
            continue
        life, fail_task = closing
        out.append(
            Divergence(
                rule="lost_attempt",
                resource_kind="attempt",
                resource=attempt_resource(att.task_id, att.attempt),
                action="close_attempt",
                evidence=_seqs(att.started_seq, *life.evidence),
                reason=f"the attempt runs on record but {life.reason}",
                since=life.since or att.started_at or now,
                task_id=att.task_id,
                attempt=att.attempt,
                error_code="SUPERVISOR_LOST",
                fail_task=fail_task,
            )
        )
    return out


def _owner(c: SeenContainer, rec: ContainerRecord | None) -> tuple[str, int]:
    task_id = c.task_id or (rec.task_id if rec else None) or NO_TASK
    attempt = c.attempt if c.attempt is not None else (rec.attempt if rec else 0)
    return task_id, attempt


@dataclass(frozen=True)
class _Attempts:
    """Per (task, attempt): whether a container of it is observed running, and the deadline
    its container was given. Built once per rule, not once per attempt."""

    running: frozenset[tuple[str | None, int | None]]
    deadlines: dict[tuple[str, int], datetime]

    @classmethod
    def of(cls, state: ProjectedState) -> _Attempts:
        running = frozenset(
            (c.task_id, c.attempt) for c in state.inventory.containers.values() if c.running
        )
        deadlines = {
            (r.task_id, r.attempt): r.deadline
            for r in state.containers.values()
            if r.deadline is not None
        }
        return cls(running, deadlines)


def _closable(
    state: ProjectedState,
    task_id: str,
    attempt: int,
    now: datetime,
    cfg: RuleConfig,
    index: _Attempts,
) -> tuple[Life, bool] | None:
    """(why its owner is gone, whether the task must be ended too) when the open attempt
    (task, attempt) may be closed now; None while it must be left alone."""
    att = state.attempts.get((task_id, attempt))
    task = state.tasks.get(task_id)
    if (
        att is None
        or att.started_seq is None
        or att.finished_seq is not None
        or task is None
        or task.finished_seq is not None
        or _age_s(now, task.last_event_at) < cfg.lost_attempt_grace_s
    ):
        return None
    if (task_id, attempt) in index.running:
        return None  # its container goes first (orphan or overdue)
    life = liveness(state, att.instance_id, now, cfg)
    if life.status == "live":
        return None
    if life.status == "unknown":
        deadline = index.deadlines.get((task_id, attempt))
        if deadline is None:
            if att.started_at is None or _age_s(now, att.started_at) < cfg.max_attempt_s:
                return None
        elif _age_s(now, deadline) <= cfg.deadline_grace_s:
            return None
        life = Life(
            "unknown",
            f"{life.reason} and the attempt is past its deadline",
            life.evidence,
            deadline or att.started_at,
        )
    inst = state.instances.get(att.instance_id)
    fail_task = inst is not None and inst.role is not None and inst.role != "serve"
    return life, fail_task


# --- deciding --------------------------------------------------------------------------------

Rule = Callable[[ProjectedState, datetime, RuleConfig], list[Divergence]]

RULES: Final[tuple[tuple[str, Rule], ...]] = (
    ("unresolved_cleanup_failure", unresolved_cleanup_failure),
    ("overdue_container", overdue_container),
    ("orphan_container", orphan_container),
    ("vanished_container", vanished_container),
    ("leaked_workspace", leaked_workspace),
    ("vanished_workspace", vanished_workspace),
    ("lost_attempt", lost_attempt),
)
"""Every rule by name, in the order they claim a resource."""


def decide(state: ProjectedState, now: datetime, cfg: RuleConfig) -> list[Divergence]:
    """Every divergence, one per resource (the first rule in `RULES` that finds it wins),
    oldest first."""
    claimed: set[tuple[str, str]] = set()
    out: list[Divergence] = []
    for _, rule in RULES:
        for d in rule(state, now, cfg):
            key = (d.resource_kind, d.resource)
            if key not in claimed:
                claimed.add(key)
                out.append(d)
    return sorted(out, key=lambda d: (d.since, d.resource_kind, d.resource))


@dataclass(frozen=True)
class Planned:
    """A divergence and its command. `pending`: a decision with this command id is already
    in the log with no final outcome (it is being carried out; no new decision is due)."""

    divergence: Divergence
    command_id: str
    pending: bool


def plan(state: ProjectedState, now: datetime, cfg: RuleConfig) -> list[Planned]:
    """The commands due. A resource whose last command ended after the inventory's listing
    began is left to the next pass: the listing may predate that command's work (Docker
    lists a container while it is being removed) and proves nothing about it."""
    out = []
    for d in decide(state, now, cfg):
        last = state.finals_at.get((d.action, d.resource))
        if last is not None and last >= state.inventory.observed_at:
            continue
        generation = state.finals.get((d.action, d.resource), 0)
        cid = command_id(state.node_id, d.action, d.resource, generation)
        out.append(Planned(d, cid, cid in state.open_commands))
    return out


def oldest_leak_s(divergences: Iterable[Divergence], now: datetime) -> float:
    """Age in seconds of the oldest divergence (0 when there is none)."""
    return max((max(_age_s(now, d.since), 0.0) for d in divergences), default=0.0)
