"""Commands of the `SUP_COMMANDS` stream (`supcmd.<node>.<command>`).

A command is an order addressed to the node that owns a resource, published with
`Nats-Msg-Id = command_id`; the id is deterministic (see `supervisor.policy.divergence`), so the
stream's duplicate window drops a second copy and two reconcilers never double-act.
Unlike events, commands are decoded strictly (`forbid_unknown_fields`): a node must not
act on an order it only half understands.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec
from msgspec import Struct

from schemas.events import NO_TASK

CleanupAction = Literal["remove_container", "remove_workspace", "close_attempt"]
ResourceKind = Literal["container", "workspace", "attempt"]


class CleanupCommand(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Remove a container or a workspace, or close an attempt its supervisor left open.

    `resource` is the container id, the workspace path, or `<task>/<attempt>`; `task_id`,
    `attempt` and `correlation_id` are those of the resource's task. `decision_id` is the
    `reconcile.decision` event that ordered it. For `close_attempt`, `error_code` is the
    catalogue code recorded (`SUPERVISOR_LOST`, `CONTAINER_VANISHED`) and `fail_task` also
    ends the task (nobody is left to retry it). The node re-checks everything before it acts.
    """

    command_id: str
    node_id: str
    action: CleanupAction
    resource_kind: ResourceKind
    resource: str
    rule: str
    decision_id: str
    issued_at: datetime
    task_id: str = NO_TASK
    attempt: int = 0
    correlation_id: str = ""
    error_code: str | None = None
    fail_task: bool = False

    def subject(self) -> str:
        return f"supcmd.{self.node_id}.cleanup"


_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[CleanupCommand] = msgspec.json.Decoder(CleanupCommand)


def encode_command(command: CleanupCommand) -> bytes:
    return _encoder.encode(command)


def decode_command(data: bytes) -> CleanupCommand:
    """Decode one command; raises `msgspec.DecodeError` / `msgspec.ValidationError`."""
    return _decoder.decode(data)
