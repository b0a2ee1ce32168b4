"""What one attempt has made and observed (`AttemptState`), a running one's handle
(`LiveAttempt`), and what it ends with (`AttemptOutcome`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import Evidence
from schemas.errors import SupervisorError
from supervisor.docker.runtime import Output
from supervisor.eventlog.emitter import Emitter
from supervisor.policy.classify import Classification


@dataclass
class AttemptState:
    """What one attempt has created and observed so far (filled as it goes)."""

    workspace: Path | None = None
    container_id: str | None = None
    running: bool = False
    exit_code: int | None = None
    oom_killed: bool = False
    kills: list[str] = field(default_factory=list)
    output: Output = field(default_factory=Output)
    removed_out_of_band: bool = False
    adapter_error: SupervisorError | None = None
    cancelled: bool = False
    pids_events: int = 0
    oom_events: int = 0
    external_kills: tuple[str, ...] = ()
    cpu_time_ns: int | None = None
    peak_memory_bytes: int | None = None
    kill_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stdin_writer: asyncio.Future[None] | None = None
    # The attach socket and the reader draining it (which closes it at its end).
    stream: Any = None
    reader: asyncio.Future[Output] | None = None
    # A warm pool's container: the hand-off's one-time token (its exec-failure marker).
    token: str | None = None
    # Under gVisor: the Sentry's boot logs (refused forks), and the line breaks in the
    # container's command (its `EXEC:` record's extra lines, never read as evidence).
    fork_log_dir: str | None = None
    argv_newlines: int = 0


@dataclass
class LiveAttempt:
    """A running attempt's container: its emitter, its state and its deadline (epoch s)."""

    em: Emitter
    st: AttemptState
    deadline: float


@dataclass
class AttemptOutcome:
    classification: Classification | None
    evidence: Evidence
    exit_code: int | None
    output: Output
    container_id: str | None
    duration_s: float
    cpu_time_s: float | None = None
    peak_memory_bytes: int | None = None
