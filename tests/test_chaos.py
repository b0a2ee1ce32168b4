"""The bounded chaos run of the suite (`testing.chaos`): a daemon runs a stream of mixed
tasks while it is killed with SIGKILL, its NATS server is killed and started again, its
dockerd is restarted, containers are removed out of band, and tasks waiting for their
retry are cancelled, at moments drawn from a seeded RNG. Every task must
end exactly once, the audit must be clean, and nothing may be left. A failure names the
seed; `SUPERVISOR_CHAOS_SEED=<seed>` runs that one again. `bench/soak.py` is the long
version."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from testing.chaos import run_chaos

pytestmark = [pytest.mark.docker, pytest.mark.nats, pytest.mark.timeout(300)]


def test_every_task_ends_once_and_nothing_is_left_whatever_fails(tmp_dir: Path) -> None:
    seed = int(os.environ.get("SUPERVISOR_CHAOS_SEED") or random.SystemRandom().randrange(10**6))

    report = run_chaos(tmp_dir, seed=seed, tasks=26, fault_s=25.0, settle_s=90.0)

    print(report.line())
    assert report.violations == [], f"{report.line()}\n" + "\n".join(report.violations)
    faults = (
        report.daemon_kills
        + report.nats_restarts
        + report.dockerd_restarts
        + report.containers_removed
        + report.cancels
    )
    assert faults > 0, report.line()
