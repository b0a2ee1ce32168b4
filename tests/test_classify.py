"""Classification is a pure function of evidence: every catalogue code it can produce."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import CATALOGUE, Evidence
from supervisor.policy.classify import classify


@pytest.mark.parametrize(
    ("evidence", "code", "etype", "retryable"),
    [
        (Evidence(exit_code=3), "NONZERO_EXIT", "user_code", False),
        (Evidence(exit_code=139), "SIGNALED", "user_code", False),
        (Evidence(exit_code=137, oom_killed=True), "OOM_KILLED", "resource", False),
        # A child killed for memory while the script went on and exited 0.
        (Evidence(exit_code=0, memory_oom_events=1), "OOM_KILLED", "resource", False),
        (Evidence(adapter_error="internal"), "INTERNAL_ERROR", "infrastructure", False),
        (Evidence(exit_code=2, pids_limit_events=4), "PIDS_LIMIT", "resource", False),
        (
            Evidence(exit_code=137, kills_issued=("output_limit",)),
            "OUTPUT_LIMIT",
            "resource",
            False,
        ),
        (Evidence(exit_code=137, kills_issued=("timeout",)), "EXECUTION_TIMEOUT", "timeout", True),
        (
            Evidence(exit_code=137, external_kills=("SIGKILL",)),
            "KILLED_EXTERNALLY",
            "infrastructure",
            True,
        ),
        (
            Evidence(exit_code=137, removed_out_of_band=True),
            "CONTAINER_VANISHED",
            "infrastructure",
            True,
        ),
        (
            Evidence(adapter_error="docker_unavailable"),
            "DOCKER_UNAVAILABLE",
            "infrastructure",
            True,
        ),
        (Evidence(adapter_error="docker_api_error"), "DOCKER_API_ERROR", "infrastructure", True),
        (Evidence(adapter_error="image_not_found"), "IMAGE_NOT_FOUND", "validation", False),
        (Evidence(adapter_error="policy_violation"), "POLICY_VIOLATION", "security", False),
        (Evidence(adapter_error="invalid_spec"), "INVALID_SPEC", "validation", False),
        (Evidence(adapter_error="circuit_open"), "CIRCUIT_OPEN", "infrastructure", True),
        (
            Evidence(exit_code=137, cancelled=True, kills_issued=("cancelled",)),
            "CANCELLED",
            "infrastructure",
            False,
        ),
    ],
)
def test_evidence_maps_to_the_catalogue(
    evidence: Evidence, code: str, etype: str, retryable: bool
) -> None:
    c = classify(evidence)

    assert c is not None
    assert (c.code, c.type, c.retryable) == (code, etype, retryable)
    assert CATALOGUE[code] == (etype, retryable)


def test_a_clean_zero_exit_is_success() -> None:
    assert classify(Evidence(exit_code=0)) is None


def test_a_signal_death_names_the_signal() -> None:
    c = classify(Evidence(exit_code=128 + 11))

    assert c is not None
    assert c.details == {"signal": "SIGSEGV", "exit_code": 139}


def test_resource_evidence_outranks_the_deadline() -> None:
    c = classify(Evidence(exit_code=137, kills_issued=("timeout",), pids_limit_events=9))

    assert c is not None and c.code == "PIDS_LIMIT"


def test_out_of_band_removal_outranks_the_external_kill_it_implies() -> None:
    c = classify(Evidence(exit_code=137, external_kills=("SIGKILL",), removed_out_of_band=True))

    assert c is not None and c.code == "CONTAINER_VANISHED"


def test_the_removal_a_reconciler_kill_ordered_is_not_out_of_band() -> None:
    """The cleanup command kills, then removes: the attempt may see either first."""
    c = classify(Evidence(kills_issued=("reconcile",), removed_out_of_band=True))

    assert c is not None
    assert (c.code, c.details) == ("KILLED_EXTERNALLY", {"by": "reconcile"})


def test_zero_exit_after_a_supervisor_kill_is_not_success() -> None:
    c = classify(Evidence(exit_code=0, kills_issued=("output_limit",)))

    assert c is not None and c.code == "OUTPUT_LIMIT"


@given(
    exit_code=st.one_of(st.none(), st.integers(min_value=0, max_value=255)),
    oom=st.booleans(),
    pids=st.integers(min_value=0, max_value=3),
    kills=st.lists(
        st.sampled_from(["timeout", "output_limit", "cancelled", "cleanup"]), max_size=2
    ),
    external=st.lists(st.sampled_from(["SIGKILL", "SIGTERM"]), max_size=1),
    vanished=st.booleans(),
)
def test_classification_is_total_and_stays_in_the_catalogue(
    exit_code: int | None,
    oom: bool,
    pids: int,
    kills: list[str],
    external: list[str],
    vanished: bool,
) -> None:
    ev = Evidence(
        exit_code=exit_code,
        oom_killed=oom,
        pids_limit_events=pids,
        kills_issued=tuple(kills),
        external_kills=tuple(external),
        removed_out_of_band=vanished,
    )
    c = classify(ev)

    if c is None:
        assert exit_code == 0 and not kills and not external and not vanished
    else:
        assert CATALOGUE[c.code] == (c.type, c.retryable)
        assert classify(ev) == c
