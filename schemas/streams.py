"""Names and configurations of the JetStream streams (the contract: extend, don't rename)."""

from __future__ import annotations

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

EVENTS_STREAM = "SUP_EVENTS"
EVENTS_SUBJECTS = ["sup.>"]
TASKS_STREAM = "SUP_TASKS"
TASKS_SUBJECTS = ["suptask.*"]
COMMANDS_STREAM = "SUP_COMMANDS"
COMMANDS_SUBJECTS = ["supcmd.>"]

# Long enough that an outbox replayed after a NATS outage is still deduplicated by
# Nats-Msg-Id for everything that was in flight when the connection dropped.
DUPLICATE_WINDOW_S = 600.0


def events_stream_config(
    replicas: int = 1, max_age_s: float | None = None, max_bytes: int | None = None
) -> StreamConfig:
    """`SUP_EVENTS`. `max_age_s` / `max_bytes` (`[events]`): None leaves an existing stream's
    limit as it is (a new one keeps everything); 0 / -1 is explicitly no limit."""
    window = DUPLICATE_WINDOW_S
    if max_age_s:  # JetStream refuses a duplicate window longer than the age limit
        window = min(window, max_age_s)
    return StreamConfig(
        name=EVENTS_STREAM,
        num_replicas=replicas,
        subjects=EVENTS_SUBJECTS,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        duplicate_window=window,
        max_age=max_age_s,
        max_bytes=max_bytes,
        # History is append-only: no API may delete or purge it, and no update can take
        # these back (JetStream refuses it); lowering a limit is kept out of the node's
        # reach by its permissions (supervisor.eventlog.nats_auth).
        deny_delete=True,
        deny_purge=True,
    )


def tasks_stream_config(per_priority_bound: int = 1000, replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=TASKS_STREAM,
        num_replicas=replicas,
        subjects=TASKS_SUBJECTS,
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_msgs_per_subject=per_priority_bound,
        discard=DiscardPolicy.NEW,
        discard_new_per_subject=True,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


def commands_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=COMMANDS_STREAM,
        num_replicas=replicas,
        subjects=COMMANDS_SUBJECTS,
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
    )
