"""The supervisor: what acts. Its public API is the HTTP client (`Client`, `AsyncClient`)
and the errors it raises; the parts are listed in docs/architecture.md.

The client is imported when first named (`from supervisor import Client`): every command
and process imports this package, and most of them need no HTTP client."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from schemas.errors import ApiError

if TYPE_CHECKING:
    from supervisor.client import AsyncClient, Client, ClientConnectionError

__all__ = ["ApiError", "AsyncClient", "Client", "ClientConnectionError"]


def __getattr__(name: str) -> object:
    if name in ("AsyncClient", "Client", "ClientConnectionError"):
        return getattr(importlib.import_module("supervisor.client"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
