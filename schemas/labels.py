"""The labels every task container carries (the contract: extend, don't rename). They are
how the reconciler and the command executor know a container is a task's, and whose.

A warm pool's container is labelled when it is parked, before any task is known: it
carries `supervisor.pool` (its shape) and no task, attempt or deadline, also once an
attempt has adopted it. The log says whose it is (`pool.adopted`, `container.created` with
`adopted`; in the projection, `containers.task_id`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

MANAGED: Final = "supervisor.managed"
NODE: Final = "supervisor.node"
INSTANCE: Final = "supervisor.instance"
TASK: Final = "supervisor.task"
ATTEMPT: Final = "supervisor.attempt"
DEADLINE: Final = "supervisor.deadline"  # epoch seconds
WORKSPACE: Final = "supervisor.workspace"
POOL: Final = "supervisor.pool"  # a warm pool's parked container: its shape


def container_labels(
    *, node_id: str, instance_id: str, task_id: str, attempt: int, deadline: float, workspace: str
) -> dict[str, str]:
    """The labels of one attempt's container."""
    return {
        MANAGED: "true",
        NODE: node_id,
        INSTANCE: instance_id,
        TASK: task_id,
        ATTEMPT: str(attempt),
        DEADLINE: f"{deadline:.3f}",
        WORKSPACE: workspace,
    }


def parked_labels(*, node_id: str, instance_id: str, workspace: str, shape: str) -> dict[str, str]:
    """The labels of a warm pool's parked container: no task, attempt or deadline (labels
    are fixed at creation; the attempt that adopts it is recorded by `pool.adopted`)."""
    return {
        MANAGED: "true",
        NODE: node_id,
        INSTANCE: instance_id,
        WORKSPACE: workspace,
        POOL: shape,
    }


def is_ours(labels: Mapping[str, str], node_id: str, workspace_root: str | None = None) -> bool:
    """Whether a container with these labels is a managed container of `node_id`: the only
    ones a node ever removes, whoever asks. With `workspace_root`, its workspace must also
    lie under it: a node id shared by two data dirs by mistake (two daemons on one host)
    never makes one remove the other's containers, whose instances it cannot prove dead."""
    if labels.get(MANAGED) != "true" or labels.get(NODE) != node_id:
        return False
    where = labels.get(WORKSPACE)
    if workspace_root is None or not where:
        return True
    return where.startswith(workspace_root.rstrip("/") + "/")


def node_filter(node_id: str) -> list[str]:
    """Docker's label filter for the managed containers of `node_id`."""
    return [f"{MANAGED}=true", f"{NODE}={node_id}"]
