"""The pure decisions: functions of (state, evidence, now), no I/O."""

from __future__ import annotations

from supervisor.policy.admission import admit, decode_spec
from supervisor.policy.breaker import BreakerState, CircuitOpen
from supervisor.policy.classify import Classification, catalogue_entry, classify
from supervisor.policy.divergence import Divergence, plan
from supervisor.policy.retry import backoff_delay, should_retry

__all__ = [
    "BreakerState",
    "CircuitOpen",
    "Classification",
    "Divergence",
    "admit",
    "backoff_delay",
    "catalogue_entry",
    "classify",
    "decode_spec",
    "plan",
    "should_retry",
]
