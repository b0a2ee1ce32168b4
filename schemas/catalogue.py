"""The error catalogue of the design: every (type, code) and whether it is retried by default."""

from __future__ import annotations

from typing import Final

from schemas.spec import ErrorType

# code -> (type, retryable by default)
CATALOGUE: Final[dict[str, tuple[ErrorType, bool]]] = {
    "INVALID_SPEC": ("validation", False),
    "IMAGE_NOT_FOUND": ("validation", False),
    "POLICY_VIOLATION": ("security", False),
    "EXECUTION_TIMEOUT": ("timeout", True),
    "OOM_KILLED": ("resource", False),
    "PIDS_LIMIT": ("resource", False),
    "OUTPUT_LIMIT": ("resource", False),
    "QUEUE_FULL": ("resource", True),
    "HOST_PRESSURE": ("resource", True),
    "NONZERO_EXIT": ("user_code", False),
    "SIGNALED": ("user_code", False),
    "DOCKER_UNAVAILABLE": ("infrastructure", True),
    "DOCKER_API_ERROR": ("infrastructure", True),
    "CIRCUIT_OPEN": ("infrastructure", True),
    "KILLED_EXTERNALLY": ("infrastructure", True),
    "CONTAINER_VANISHED": ("infrastructure", True),
    "SUPERVISOR_LOST": ("infrastructure", True),
    "REDELIVERY_LIMIT": ("infrastructure", False),
    "CLEANUP_FAILED": ("infrastructure", True),
    # Extension: the run was cancelled by its own supervisor (Ctrl-C on `supervisor run`,
    # a forced shutdown); nobody else is to blame and it is not retried.
    "CANCELLED": ("infrastructure", False),
    # A different spec under a task id already known (submission is idempotent by id).
    "DUPLICATE_TASK_ID": ("validation", False),
    # The data dir (outbox, NATS store, projection) has no space left; nothing was started.
    "DISK_FULL": ("resource", True),
    "QUERY_MEMORY": ("resource", False),
    # Intake could not make a submission durable: NATS (JetStream) did not answer.
    "NATS_UNAVAILABLE": ("infrastructure", True),
    "CPU_TIME_EXCEEDED": ("timeout", False),
    # An unexpected error inside the supervisor during an attempt (a bug of ours, or the
    # host refusing what admission let through); cleanup ran, the details name the error.
    "INTERNAL_ERROR": ("infrastructure", False),
}


def error_type_of(code: str) -> ErrorType:
    return CATALOGUE[code][0]


def retryable_by_default(code: str) -> bool:
    return CATALOGUE[code][1]
