from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import RetryPolicy
from supervisor.policy.retry import backoff_delay, should_retry


def test_delays_grow_exponentially_up_to_the_cap_without_jitter() -> None:
    p = RetryPolicy(base_delay_s=1.0, multiplier=2.0, max_delay_s=5.0, jitter=False)

    assert [backoff_delay(p, n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_full_jitter_scales_the_cap_by_the_random_draw() -> None:
    p = RetryPolicy(base_delay_s=1.0, multiplier=3.0, max_delay_s=30.0, jitter=True)

    assert backoff_delay(p, 3, rand=lambda: 0.5) == 4.5
    assert backoff_delay(p, 3, rand=lambda: 0.0) == 0.0


@given(
    attempt=st.integers(min_value=1, max_value=500),
    base=st.floats(min_value=0, max_value=100),
    mult=st.floats(min_value=1, max_value=10),
    cap=st.floats(min_value=0, max_value=1000),
    draw=st.floats(min_value=0, max_value=1),
)
def test_a_delay_never_exceeds_the_cap(
    attempt: int, base: float, mult: float, cap: float, draw: float
) -> None:
    p = RetryPolicy(base_delay_s=base, multiplier=mult, max_delay_s=cap, jitter=True)

    assert 0.0 <= backoff_delay(p, attempt, rand=lambda: draw) <= cap


def test_attempt_numbers_are_one_based() -> None:
    with pytest.raises(ValueError):
        backoff_delay(RetryPolicy(), 0)


def test_only_retryable_errors_retry_and_only_while_attempts_remain() -> None:
    p = RetryPolicy(max_attempts=3)

    assert should_retry(p, 1, True) is True
    assert should_retry(p, 2, True) is True
    assert should_retry(p, 3, True) is False
    assert should_retry(p, 1, False) is False
