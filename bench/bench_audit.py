"""What deciding again costs the audit: `audit_records` over a large realistic history
with the rules that re-derive outcomes, instance ends and reconcile decisions from their
evidence (`projections/evidence.py`), against the same audit without them, alternated in
one run. The history is the generator's mix (`testing.synthetic.mixed_history`: successes,
user errors, timeouts retried, OOM kills, rejections), held to a real daemon's events by
`tests/test_audit_mutations.py`.

    .venv/bin/python bench/bench_audit.py [--events 1000000] [--rounds 3]

Prints the audit's time both ways (best of the rounds) and the ratio (target <= 2.0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from projections.audit import audit_records, records_of
from testing.synthetic import mixed_history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="history size (default 1M)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    args = ap.parse_args()
    t = time.perf_counter()
    records = records_of(mixed_history(args.events))
    print(f"{len(records):,} events generated in {time.perf_counter() - t:.1f} s")
    times: dict[bool, list[float]] = {False: [], True: []}
    found: dict[bool, list[object]] = {}
    for _ in range(args.rounds):
        for rederive in (False, True):
            t = time.perf_counter()
            found[rederive] = list(audit_records(records, rederive=rederive))
            times[rederive].append(time.perf_counter() - t)
    # The history is cut at exactly --events: its last task is left in flight (the same
    # few violations both ways); the re-derivation finds nothing more in it.
    assert found[True] == found[False], found[True][:3]
    before, after = min(times[False]), min(times[True])
    print(
        f"  audit without the re-derivation: {before:.2f} s ({len(records) / before:,.0f} events/s)"
    )
    print(
        f"  audit with it:                   {after:.2f} s ({len(records) / after:,.0f} events/s)"
    )
    print(
        f"  ratio {after / before:.2f} (target <= 2.0); the same {len(found[True])} "
        "violation(s) both ways (the task cut at the end)"
    )


if __name__ == "__main__":
    main()
