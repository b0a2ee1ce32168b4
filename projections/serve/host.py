"""What a part the daemon runs (`ProjectionPart`, `OwnProjection`) may use of the daemon:
the shape of the daemon's context (`supervisor.daemon.extension.DaemonContext` has it), so
that the read side does not import the daemon."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from schemas.http import Check


class HostMetrics(Protocol):
    @property
    def registry(self) -> Any: ...


class HostNode(Protocol):
    @property
    def data_dir(self) -> Path: ...

    @property
    def nats_url(self) -> str: ...

    @property
    def metrics(self) -> HostMetrics: ...


class PartHost(Protocol):
    @property
    def node(self) -> HostNode: ...

    @property
    def js(self) -> Any: ...

    def add_check(self, name: str, check: Callable[[], Awaitable[Check]]) -> None: ...
