"""Names and shapes of the JetStream streams (the contract: extend, don't rename).

The shapes are plain data (`StreamSpec`); `supervisor.eventlog.streams` turns one into the
client library's `StreamConfig`, so that the contract imports no NATS client."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

EVENTS_STREAM = "SUP_EVENTS"
EVENTS_SUBJECTS = ["sup.>"]
TASKS_STREAM = "SUP_TASKS"
TASKS_SUBJECTS = ["suptask.*"]
COMMANDS_STREAM = "SUP_COMMANDS"
COMMANDS_SUBJECTS = ["supcmd.>"]

# Long enough that an outbox replayed after a NATS outage is still deduplicated by
# Nats-Msg-Id for everything that was in flight when the connection dropped.
DUPLICATE_WINDOW_S = 600.0


class StreamSpec(Struct, frozen=True, kw_only=True):
    """One stream as the project declares it. `max_age_s` / `max_bytes`: None leaves an
    existing stream's limit as it is (a new one keeps everything); 0 / -1 is explicitly
    no limit."""

    name: str
    subjects: tuple[str, ...]
    retention: Literal["limits", "workqueue"]
    replicas: int = 1
    duplicate_window_s: float = DUPLICATE_WINDOW_S
    max_age_s: float | None = None
    max_bytes: int | None = None
    max_msgs_per_subject: int | None = None
    discard_new_per_subject: bool = False
    deny_delete: bool = False
    deny_purge: bool = False


def events_stream(
    replicas: int = 1, max_age_s: float | None = None, max_bytes: int | None = None
) -> StreamSpec:
    """`SUP_EVENTS`, the history: append-only. No API may delete or purge it, and no update
    can take that back (JetStream refuses it); lowering a limit is kept out of the node's
    reach by its permissions (`supervisor.eventlog.nats_auth`)."""
    window = DUPLICATE_WINDOW_S
    if max_age_s:  # JetStream refuses a duplicate window longer than the age limit
        window = min(window, max_age_s)
    return StreamSpec(
        name=EVENTS_STREAM,
        subjects=tuple(EVENTS_SUBJECTS),
        retention="limits",
        replicas=replicas,
        duplicate_window_s=window,
        max_age_s=max_age_s,
        max_bytes=max_bytes,
        deny_delete=True,
        deny_purge=True,
    )


def tasks_stream(per_priority_bound: int = 1000, replicas: int = 1) -> StreamSpec:
    """`SUP_TASKS`, the durable priority queue: a work queue bounded per priority subject
    (a full priority refuses new messages)."""
    return StreamSpec(
        name=TASKS_STREAM,
        subjects=tuple(TASKS_SUBJECTS),
        retention="workqueue",
        replicas=replicas,
        max_msgs_per_subject=per_priority_bound,
        discard_new_per_subject=True,
    )


def commands_stream(replicas: int = 1) -> StreamSpec:
    """`SUP_COMMANDS`, the reconciler's cleanup commands: a work queue."""
    return StreamSpec(
        name=COMMANDS_STREAM,
        subjects=tuple(COMMANDS_SUBJECTS),
        retention="workqueue",
        replicas=replicas,
    )
