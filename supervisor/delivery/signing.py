"""How a callback is signed and paced. Pure.

A receiver checks a delivery by recomputing
`hex(HMAC-SHA256(secret, f"{timestamp}.".encode() + body))` and comparing it, in constant
time, with the `X-Supervisor-Signature` header's `sha256=` value; it should also refuse a
timestamp (`X-Supervisor-Timestamp`, Unix seconds) far from its own clock, which makes a
recorded delivery useless to replay later. `verify` is that check.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from collections.abc import Callable

from schemas.config import CallbacksConfig, inline_or_file
from schemas.errors import ConfigError

SIGNATURE = "X-Supervisor-Signature"
TIMESTAMP = "X-Supervisor-Timestamp"


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The `X-Supervisor-Signature` value of `body` sent at `timestamp`."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(
    secret: bytes, headers: dict[str, str], body: bytes, now: float, tolerance_s: float = 300
) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent."""
    try:
        ts = int(headers[TIMESTAMP])
    except (KeyError, ValueError):
        return False
    if abs(now - ts) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, ts, body), headers.get(SIGNATURE, ""))


def delay_after(
    cfg: CallbacksConfig, delivery: int, rand: Callable[[], float] = random.random
) -> float:
    """Seconds before delivery `delivery + 1`: `base_delay_s` doubled per failed delivery,
    at most `max_delay_s`, with up to a quarter of it taken off at random so that the
    receivers of many failed deliveries are not all called again at once."""
    full = min(cfg.base_delay_s * 2 ** (delivery - 1), cfg.max_delay_s)
    return full * (1 - 0.25 * rand())


def callback_secret(cfg: CallbacksConfig) -> bytes:
    """The signing key: `secret`, else the first line of `secret_file`. Raises ConfigError
    when callbacks are allowed without a key, or with both, or the file cannot be read."""
    key = inline_or_file(cfg.secret, cfg.secret_file, "callbacks.secret")
    if key is None:
        raise ConfigError("callbacks.allowed is set: set callbacks.secret or secret_file too")
    return key.encode()
