"""Whether the instance that made a resource is alive, dead (with the proof) or of unknown
liveness, from the projected state; and the rules' configuration. Pure.

An instance that stopped is dead; one that published heartbeats is dead once the last is
older than its timeout; one that never did (a `supervisor run`, an older daemon) is of
unknown liveness and presumed alive: only deadlines end its work.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from schemas.projected import ProjectedState

__all__ = ["Life", "Liveness", "RuleConfig", "age_s", "liveness"]

Liveness = Literal["live", "dead", "unknown"]


@dataclass(frozen=True)
class RuleConfig:
    creation_grace_s: float = 30.0
    deadline_grace_s: float = 10.0
    heartbeat_timeout_s: float = 20.0
    lost_attempt_grace_s: float = 60.0
    max_attempt_s: float = 1200.0


@dataclass(frozen=True)
class Life:
    status: Liveness
    reason: str
    evidence: tuple[int, ...] = ()
    since: datetime | None = None


def liveness(
    state: ProjectedState, instance_id: str | None, now: datetime, cfg: RuleConfig
) -> Life:
    """Whether `instance_id` is alive, dead (with the proof) or unknown (presumed alive)."""
    if instance_id is not None and instance_id == state.self_instance:
        return Life("live", "it is the reconciling instance")
    inst = state.instances.get(instance_id) if instance_id else None
    if inst is None:
        return Life("unknown", f"instance {instance_id or '(none)'} is not in the log")
    if inst.stopped_seq is not None:
        return Life(
            "dead", f"instance {inst.instance_id} stopped", (inst.stopped_seq,), inst.stopped_at
        )
    if inst.heartbeat_seq is not None and inst.heartbeat_at is not None:
        timeout = inst.heartbeat_timeout_s or cfg.heartbeat_timeout_s
        silent = (now - inst.heartbeat_at).total_seconds()
        if silent > timeout:
            return Life(
                "dead",
                f"instance {inst.instance_id} sent no heartbeat for {silent:.0f}s "
                f"(timeout {timeout:g}s)",
                (inst.heartbeat_seq,),
                inst.heartbeat_at,
            )
        return Life("live", f"instance {inst.instance_id} heartbeats")
    return Life(
        "unknown",
        f"instance {inst.instance_id} ({inst.role or 'unknown role'}) publishes no heartbeats",
    )


def age_s(now: datetime, then: datetime) -> float:
    return (now - then).total_seconds()
