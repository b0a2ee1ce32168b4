"""The grammar of what users type as parameters (query strings, flags, configuration),
written once for the HTTP API, the CLI and the configuration. Each parser raises
ValueError with a message that names the parameter. Pure."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_WHOLE = re.compile(r"[0-9]{1,18}")
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION_HINT = "a duration such as 45s, 10m, 2h, 7d"
TIME_HINT = "an ISO-8601 time such as 2026-05-01T12:00:00Z"


def whole_number(name: str, text: str, lo: int, hi: int) -> int:
    """`text` as a whole number from `lo` to `hi` (ASCII digits only: `¹` or `٣` are not
    numbers here, though Python's `isdigit` says so)."""
    if _WHOLE.fullmatch(text) is None or not lo <= int(text) <= hi:
        raise ValueError(f"{name} {text[:40]!r}: a whole number from {lo} to {hi}")
    return int(text)


def duration_s(name: str, text: str, *, bare_seconds: bool = True) -> float:
    """`45s`, `10m`, `2h`, `7d` (also `1.5h`) in seconds; a bare number is seconds unless
    `bare_seconds` is False (where a bare number would be ambiguous)."""
    m = _DURATION.fullmatch(text)
    if m is None or (not m.group(2) and not bare_seconds):
        raise ValueError(f"{name} {text[:40]!r}: {DURATION_HINT}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def iso_time(name: str, text: str) -> datetime:
    """An ISO-8601 time, aware (a naive one, or `Z`, is UTC)."""
    candidate = text.strip()
    if candidate[-1:] in ("Z", "z"):
        candidate = candidate[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(candidate)
    except ValueError:
        raise ValueError(f"{name} {text[:40]!r}: {TIME_HINT}") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def point_in_time(name: str, text: str, now: datetime) -> datetime:
    """A time as `since`, `--since` and `--until` take it: a duration back from `now`
    (`10m`: ten minutes ago) or an ISO-8601 time; aware, in UTC."""
    try:
        return now.astimezone(UTC) - timedelta(seconds=duration_s(name, text, bare_seconds=False))
    except ValueError:
        pass
    try:
        return iso_time(name, text).astimezone(UTC)
    except ValueError:
        raise ValueError(f"{name} {text[:40]!r}: {DURATION_HINT}, or {TIME_HINT}") from None
