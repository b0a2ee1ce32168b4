"""The streams of `schemas.streams` as nats-py's `StreamConfig`."""

from __future__ import annotations

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from schemas.streams import StreamSpec, commands_stream, events_stream, tasks_stream

_RETENTION = {"limits": RetentionPolicy.LIMITS, "workqueue": RetentionPolicy.WORK_QUEUE}


def stream_config(spec: StreamSpec) -> StreamConfig:
    """The `StreamConfig` that makes `spec` (file storage; a per-subject bound discards
    new messages). What `spec` leaves unset is left to nats-py's defaults."""
    extra: dict[str, object] = {}
    if spec.max_msgs_per_subject is not None:
        extra.update(max_msgs_per_subject=spec.max_msgs_per_subject, discard=DiscardPolicy.NEW)
    if spec.discard_new_per_subject:
        extra["discard_new_per_subject"] = True
    if spec.deny_delete:
        extra["deny_delete"] = True
    if spec.deny_purge:
        extra["deny_purge"] = True
    return StreamConfig(
        name=spec.name,
        num_replicas=spec.replicas,
        subjects=list(spec.subjects),
        retention=_RETENTION[spec.retention],
        storage=StorageType.FILE,
        duplicate_window=spec.duplicate_window_s,
        max_age=spec.max_age_s,
        max_bytes=spec.max_bytes,
        **extra,  # type: ignore[arg-type]
    )


def events_stream_config(
    replicas: int = 1, max_age_s: float | None = None, max_bytes: int | None = None
) -> StreamConfig:
    """`SUP_EVENTS` (`schemas.streams.events_stream`)."""
    return stream_config(events_stream(replicas, max_age_s, max_bytes))


def tasks_stream_config(per_priority_bound: int = 1000, replicas: int = 1) -> StreamConfig:
    """`SUP_TASKS` (`schemas.streams.tasks_stream`)."""
    return stream_config(tasks_stream(per_priority_bound, replicas))


def commands_stream_config(replicas: int = 1) -> StreamConfig:
    """`SUP_COMMANDS` (`schemas.streams.commands_stream`)."""
    return stream_config(commands_stream(replicas))
