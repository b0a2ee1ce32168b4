"""Retry decisions: exponential backoff with full jitter. Pure; the random source is injected."""

from __future__ import annotations

import random
from collections.abc import Callable

from schemas import RetryPolicy


def backoff_delay(
    policy: RetryPolicy, attempt: int, rand: Callable[[], float] = random.random
) -> float:
    """Delay before attempt `attempt + 1`, after attempt `attempt` (1-based) failed.

    The cap is `min(max_delay_s, base_delay_s * multiplier**(attempt-1))`; with jitter the
    delay is uniform in [0, cap] ("full jitter"), so synchronised failures spread out.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    exponent = min(attempt - 1, 64)
    cap = min(policy.max_delay_s, policy.base_delay_s * policy.multiplier**exponent)
    return cap * rand() if policy.jitter else cap


def should_retry(policy: RetryPolicy, attempt: int, retryable: bool) -> bool:
    """Retry only a retryable error, and only while attempts remain."""
    return retryable and attempt < policy.max_attempts
