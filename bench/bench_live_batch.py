"""Side by side: one live batch applied by the Python fold against the set-based MERGEs.

    .venv/bin/python bench/bench_live_batch.py [--events N ...] [--batch B] [--batches K]

For each projection size N (default 5,000, 50,000 and 200,000 events), builds a DuckDB
file (in a temp dir, removed afterwards) from a realistic mixed history
(`testing.synthetic.mixed_history`), then applies K more batches of B events (60 by
default, about what the daemon's live projector applies at concurrency 8) in blocks of
fifteen, alternating the store's two ways within one run:

* merge: `ProjectionStore(fold_max=0)`, the set-based statements of `projections.store.apply`
  (what a replay runs), whose five current-state `MERGE`s are planned for every batch;
* fold: the default store, which computes the current-state rows in Python
  (`projections.store.batch_fold`) and replaces them with one keyed delete and one Arrow insert per
  table.

Both write the same rows (`tests/test_fold.py`). Prints the median CPU and wall time of a
batch for each, and the ratio fold/merge (lower is better). The writer runs with one
DuckDB thread, as the daemon's does.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # testing/ is not installed

from projections.store.store import FOLD_MAX_EVENTS, ProjectionStore
from projections.stream.decode import Staged, decode_batch, stage
from schemas import encode_event
from testing.synthetic import mixed_history

BLOCK = 15


def run(size: int, batch: int, batches: int, root: Path) -> dict[str, tuple[float, float]]:
    payloads = [encode_event(e) for e in mixed_history(size + batches * batch)]

    def staged(lo: int, hi: int) -> Staged:
        seqs = list(range(lo + 1, hi + 1))
        now = time.time_ns()
        return stage(decode_batch(seqs, ["bench"] * len(seqs), [now] * len(seqs), payloads[lo:hi]))

    times: dict[str, list[tuple[float, float]]] = {"merge": [], "fold": []}
    with ProjectionStore(root / f"p{size}.duckdb", threads=1, fold_max=0) as store:
        store.apply(staged(0, size))
        store.checkpoint()
        pos = size
        for i in range(batches):
            way = "fold" if (i // BLOCK) % 2 else "merge"
            store.fold_max = FOLD_MAX_EVENTS if way == "fold" else 0
            st = staged(pos, pos + batch)
            pos += batch
            cpu, wall = time.process_time(), time.perf_counter()
            store.apply(st)
            times[way].append((time.process_time() - cpu, time.perf_counter() - wall))
    return {
        way: (statistics.median(c for c, _ in t), statistics.median(w for _, w in t))
        for way, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--events",
        type=int,
        nargs="+",
        default=[5_000, 50_000, 200_000],
        help="projection sizes to measure at (default: 5000 50000 200000)",
    )
    parser.add_argument("--batch", type=int, default=60, help="events per batch (default 60)")
    parser.add_argument(
        "--batches", type=int, default=60, help="batches per size, half each way (default 60)"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-live-batch-"))
    try:
        for size in args.events:
            r = run(size, args.batch, args.batches, root)
            (mc, mw), (fc, fw) = r["merge"], r["fold"]
            print(
                f"{size:>9,} events, batches of {args.batch}: merge {mc * 1e3:.1f} ms CPU "
                f"({mw * 1e3:.1f} wall), fold {fc * 1e3:.1f} ms CPU ({fw * 1e3:.1f} wall): "
                f"fold/merge {fc / mc:.2f} CPU, {fw / mw:.2f} wall"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
