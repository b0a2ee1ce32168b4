"""Admission of pulled work: the node's bounds, host pressure and the Docker breaker."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.policy.capacity import Verdict, can_pull_any, fits, fits_budget

BOUNDS: dict[str, Any] = {"concurrency": 3, "memory_budget_mb": 512}


@pytest.mark.parametrize(
    ("memory", "running", "expected"),
    [
        (128, [], True),
        (512, [], True),
        (4096, [], True),  # larger than the budget: runs alone rather than never
        (4096, [64], False),
        (256, [128, 128], True),  # exactly the budget
        (257, [128, 128], False),
        (6, [6, 6, 6], False),  # no slot left
        (6, [6, 6], True),
    ],
)
def test_fits_budget(memory: int, running: list[int], expected: bool) -> None:
    assert fits_budget(memory, running, **BOUNDS) is expected


def test_a_task_that_fits_is_admitted() -> None:
    assert fits(128, [128, 128], **BOUNDS) == Verdict(ok=True)


def test_the_breaker_refuses_first() -> None:
    for status in ("open", "half_open"):
        v = fits(6, [], **BOUNDS, pressure=("cpu_pct",), breaker=status)  # type: ignore[arg-type]

        assert v == Verdict(ok=False, reason="breaker", message=f"the Docker breaker is {status}")
        assert not v


def test_pressure_refuses_and_names_the_metrics() -> None:
    v = fits(6, [], **BOUNDS, pressure={"memory_pct", "cpu_pct"})

    assert v == Verdict(
        ok=False, reason="pressure", message="host under pressure: cpu_pct, memory_pct"
    )


def test_concurrency_refuses() -> None:
    assert fits(6, [6, 6, 6], **BOUNDS) == Verdict(
        ok=False, reason="concurrency", message="3 of 3 slots in use"
    )


def test_memory_refuses_with_what_is_in_use() -> None:
    assert fits(300, [128, 128], **BOUNDS) == Verdict(
        ok=False, reason="memory", message="300 MB does not fit: 256 of 512 MB in use"
    )


def test_a_budget_smaller_than_two_tasks_runs_them_one_at_a_time() -> None:
    bounds: dict[str, Any] = {"concurrency": 8, "memory_budget_mb": 200}

    assert fits(128, [], **bounds).ok
    assert not fits(128, [128], **bounds).ok


def test_can_pull_any() -> None:
    assert can_pull_any([], **BOUNDS) == Verdict(ok=True)
    assert can_pull_any([128], **BOUNDS) == Verdict(ok=True)
    assert can_pull_any([256, 256], **BOUNDS) == Verdict(
        ok=False, reason="memory", message="memory budget used: 512 of 512 MB"
    )
    assert can_pull_any([4096], **BOUNDS).reason == "memory"
    assert can_pull_any([1, 1, 1], **BOUNDS).reason == "concurrency"
    assert can_pull_any([], **BOUNDS, breaker="open").reason == "breaker"
    assert can_pull_any([], **BOUNDS, pressure=["disk_pct"]).reason == "pressure"


_running = st.lists(st.integers(6, 2048), max_size=10)
_bounds = st.fixed_dictionaries(
    {"concurrency": st.integers(1, 10), "memory_budget_mb": st.integers(6, 8192)}
)


@given(st.integers(6, 8192), _running, _bounds)
def test_an_admitted_task_respects_every_bound(
    memory: int, running: list[int], bounds: dict[str, Any]
) -> None:
    v = fits(memory, running, **bounds)

    if v.ok:
        assert len(running) < bounds["concurrency"]
        assert not running or sum(running) + memory <= bounds["memory_budget_mb"]
        assert can_pull_any(running, **bounds).ok
    assert v.ok == fits_budget(memory, running, **bounds)


@given(st.integers(6, 4096), st.integers(6, 4096), _running, _bounds)
def test_a_smaller_task_fits_wherever_a_bigger_one_does(
    a: int, b: int, running: list[int], bounds: dict[str, Any]
) -> None:
    small, big = sorted((a, b))

    if fits(big, running, **bounds).ok:
        assert fits(small, running, **bounds).ok


@given(_running, _bounds)
def test_nothing_is_admitted_when_no_pull_is(running: list[int], bounds: dict[str, Any]) -> None:
    if not can_pull_any(running, **bounds).ok:
        assert not fits(6, running, **bounds).ok
