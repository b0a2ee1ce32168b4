"""The projected states the divergence tests build (`World`), the fixed clock and rule
configuration they are judged with, and shorthands over `decide`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from schemas.projected import (
    AttemptRecord,
    ContainerRecord,
    InstanceRecord,
    Inventory,
    ProjectedState,
    SeenContainer,
    SeenWorkspace,
    TaskRecord,
    WorkspaceRecord,
    workspace_owner,
)
from supervisor.policy.divergence import (
    Divergence,
    RuleConfig,
    decide,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
CFG = RuleConfig(
    creation_grace_s=30,
    deadline_grace_s=10,
    heartbeat_timeout_s=20,
    lost_attempt_grace_s=60,
    max_attempt_s=1200,
)
ROOT = "/data/workspaces"
INV_SEQ = 500


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


@dataclass
class World:
    """A projected state built step by step; `build()` freezes it."""

    node: str = "n1"
    seen: dict[str, SeenContainer] = field(default_factory=dict)
    seen_ws: dict[str, SeenWorkspace] = field(default_factory=dict)
    containers: dict[str, ContainerRecord] = field(default_factory=dict)
    workspaces: dict[str, WorkspaceRecord] = field(default_factory=dict)
    attempts: dict[tuple[str, int], AttemptRecord] = field(default_factory=dict)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    open_commands: set[str] = field(default_factory=set)
    finals: dict[tuple[str, str], int] = field(default_factory=dict)
    finals_at: dict[tuple[str, str], datetime] = field(default_factory=dict)

    def serve(self, iid: str, heartbeat_s_ago: float | None = 1.0, seq: int = 10) -> World:
        hb = None if heartbeat_s_ago is None else ago(heartbeat_s_ago)
        self.instances[iid] = InstanceRecord(
            iid,
            self.node,
            "serve",
            started_seq=seq,
            heartbeat_seq=seq + 1 if hb else None,
            heartbeat_at=hb,
            heartbeat_timeout_s=None,
        )
        return self

    def run_instance(self, iid: str, seq: int = 10) -> World:
        self.instances[iid] = InstanceRecord(iid, self.node, "run", started_seq=seq)
        return self

    def stopped(self, iid: str, seq: int = 90) -> World:
        inst = self.instances[iid]
        self.instances[iid] = dataclasses.replace(inst, stopped_seq=seq, stopped_at=ago(100))
        return self

    def task(
        self,
        tid: str,
        *,
        state: str = "running",
        finished_seq: int | None = None,
        quiet_s: float = 0.0,
        seq: int = 20,
    ) -> World:
        fin = ago(quiet_s) if finished_seq is not None else None
        self.tasks[tid] = TaskRecord(
            tid,
            state,
            finished_seq or seq,
            ago(quiet_s),
            finished_seq,
            fin,
            correlation_id=f"corr-{tid}",
        )
        return self

    def attempt(
        self,
        tid: str,
        n: int,
        iid: str,
        *,
        finished_seq: int | None = None,
        started_s_ago: float = 100.0,
        seq: int = 21,
    ) -> World:
        fin = ago(50) if finished_seq is not None else None
        self.attempts[(tid, n)] = AttemptRecord(
            tid, n, self.node, iid, seq, ago(started_s_ago), finished_seq, fin
        )
        return self

    def container(
        self,
        cid: str,
        tid: str,
        n: int,
        iid: str,
        *,
        state: str = "running",
        created_s_ago: float = 100.0,
        deadline_in_s: float | None = 300.0,
        observed: bool = True,
        recorded: bool = True,
        node: str | None = None,
        managed: bool = True,
        removed_seq: int | None = None,
        failed_seq: int | None = None,
        seq: int = 22,
    ) -> World:
        deadline = NOW + timedelta(seconds=deadline_in_s) if deadline_in_s is not None else None
        if observed:
            self.seen[cid] = SeenContainer(
                cid, state, ago(created_s_ago), tid, n, iid, deadline, managed, node or self.node
            )
        if recorded:
            self.containers[cid] = ContainerRecord(
                cid,
                tid,
                n,
                node or self.node,
                iid,
                seq,
                ago(created_s_ago),
                deadline,
                removed_seq,
                failed_seq,
                ago(40) if failed_seq else None,
            )
        return self

    def workspace(
        self,
        name: str,
        tid: str,
        n: int,
        iid: str,
        *,
        created_s_ago: float = 100.0,
        observed: bool = True,
        recorded: bool = True,
        removed_seq: int | None = None,
        failed_seq: int | None = None,
        root: str = ROOT,
        seq: int = 23,
    ) -> World:
        path = f"{root}/{name}"
        if observed:
            self.seen_ws[path] = SeenWorkspace(path, ago(created_s_ago), *workspace_owner(path))
        if recorded:
            self.workspaces[path] = WorkspaceRecord(
                path,
                tid,
                n,
                self.node,
                iid,
                seq,
                ago(created_s_ago),
                removed_seq,
                failed_seq,
                ago(40) if failed_seq else None,
            )
        return self

    def build(self) -> ProjectedState:
        inv = Inventory(INV_SEQ, ago(1), ROOT, dict(self.seen), dict(self.seen_ws))
        return ProjectedState(
            self.node,
            inv,
            dict(self.containers),
            dict(self.workspaces),
            dict(self.attempts),
            dict(self.tasks),
            dict(self.instances),
            frozenset(self.open_commands),
            dict(self.finals),
            dict(self.finals_at),
            self_instance="me",
        )


def found(world: World, now: datetime = NOW) -> list[tuple[str, str, str]]:
    return [(d.rule, d.resource_kind, d.resource) for d in decide(world.build(), now, CFG)]


def only(world: World) -> Divergence:
    ds = decide(world.build(), NOW, CFG)
    assert len(ds) == 1, ds
    return ds[0]


def running_task(w: World, tid: str = "t-1", iid: str = "boot-1") -> World:
    return w.task(tid).attempt(tid, 1, iid)


# --- orphan_container ---------------------------------------------------------------------
