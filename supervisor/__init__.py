"""The supervisor: what acts. Its public API is the HTTP client (`Client`, `AsyncClient`)
and the errors it raises; the parts are listed in docs/architecture.md.

The client and the errors are imported when first named (`from supervisor import Client`):
every command and process imports this package, most need no HTTP client, and `submit`'s
quick path (`supervisor.cli.http_submit`) nothing but the standard library."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from schemas.errors import ApiError
    from supervisor.client import AsyncClient, Client, ClientConnectionError

__all__ = ["ApiError", "AsyncClient", "Client", "ClientConnectionError"]


def __getattr__(name: str) -> object:
    if name == "ApiError":
        return importlib.import_module("schemas.errors").ApiError
    if name in ("AsyncClient", "Client", "ClientConnectionError"):
        return getattr(importlib.import_module("supervisor.client"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
