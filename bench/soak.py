"""The long chaos run, not part of the suite: `testing.chaos` for N minutes.

    .venv/bin/python bench/soak.py --minutes 10 [--seed S] [--tasks-per-minute 40]

A daemon runs a stream of mixed tasks while it is killed with SIGKILL, its NATS server is
killed and started again, and task containers are removed out of band, at moments drawn
from the seed. Prints the counts (tasks, daemon kills, NATS restarts, containers removed,
events, outcomes) and every violation; exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testing.chaos import run_chaos


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tasks-per-minute", type=int, default=40)
    args = parser.parse_args()
    if args.minutes <= 0 or args.tasks_per_minute <= 0:
        parser.error("--minutes and --tasks-per-minute must be positive")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        report = run_chaos(
            workdir,
            seed=seed,
            tasks=int(args.minutes * args.tasks_per_minute),
            fault_s=args.minutes * 60,
            settle_s=180.0,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report.line())
    for v in report.violations:
        print("  " + v)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
