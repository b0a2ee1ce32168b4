"""The supervisor: what acts. Its public API is the HTTP client (`Client`, `AsyncClient`)
and the errors it raises; the parts are listed in docs/architecture.md."""

from __future__ import annotations

from schemas.errors import ApiError
from supervisor.client import AsyncClient, Client, ClientConnectionError

__all__ = ["ApiError", "AsyncClient", "Client", "ClientConnectionError"]
