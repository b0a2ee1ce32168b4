"""What a readiness check answers (`/readyz`): shared by the daemon and the parts it runs
(the live projection, the reconciler)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from msgspec import Struct


class Check(Struct, frozen=True, kw_only=True):
    """One readiness check: `reason` says why in words, `details` in values."""

    ok: bool
    reason: str
    details: dict[str, Any] = {}


CheckFn = Callable[[], Awaitable[Check]]
