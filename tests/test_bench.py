"""Every benchmark starts the way `docs/benchmarks.md` runs it (`python bench/X.py`): its
imports resolve and its `--help` tells what it measures. (The measurements themselves are
not tests: timings do not belong in pass/fail.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", BENCHES, ids=[p.stem for p in BENCHES])
def test_the_benchmark_starts_and_says_what_it_measures(path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(path), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT / "bench",
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
