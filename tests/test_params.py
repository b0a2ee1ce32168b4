"""The one grammar of what users type (`schemas.params`): pure, exact values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from schemas.params import duration_s, point_in_time, whole_number

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", NOW - timedelta(seconds=30)),
        ("10m", NOW - timedelta(minutes=10)),
        ("2h", NOW - timedelta(hours=2)),
        ("1d", NOW - timedelta(days=1)),
        ("1.5h", NOW - timedelta(minutes=90)),
        (" 5m ", NOW - timedelta(minutes=5)),
        ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T03:04:05", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        (
            "2026-01-02T05:04:05+02:00",
            datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2))),
        ),
        ("2026-01-02", datetime(2026, 1, 2, tzinfo=UTC)),
    ],
)
def test_a_point_in_time_is_a_duration_back_or_an_iso_time(text: str, expected: datetime) -> None:
    assert point_in_time("since", text, NOW) == expected


@pytest.mark.parametrize("text", ["", "10", "10x", "m", "yesterday", "-5m", "5 m s", "2026-13-01"])
def test_anything_else_is_refused_naming_the_parameter(text: str) -> None:
    with pytest.raises(ValueError, match=r"^--until .*a duration such as 45s, 10m, 2h, 7d, or"):
        point_in_time("--until", text, NOW)


@pytest.mark.parametrize(
    ("text", "seconds"), [("45", 45.0), ("45s", 45.0), ("12h", 43200.0), ("90d", 7776000.0)]
)
def test_a_duration_in_configuration_may_be_bare_seconds(text: str, seconds: float) -> None:
    assert duration_s("events.max_age", text) == seconds


@pytest.mark.parametrize("text", ["0", "-5", "abc", "\u00b9", "\u0663", "1e3", " 7", "10000000000"])
def test_a_whole_number_is_ascii_digits_within_its_bounds(text: str) -> None:
    with pytest.raises(ValueError, match=r"^limit .*: a whole number from 1 to 1000000000$"):
        whole_number("limit", text, 1, 10**9)


def test_a_whole_number_in_bounds_is_read() -> None:
    assert whole_number("limit", "250", 1, 1000) == 250
