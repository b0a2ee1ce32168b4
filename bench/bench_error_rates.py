"""The `error_rates` view over 10,000,000 error events, against a bare GROUP BY over the
raw `events` table, in one run.

    .venv/bin/python bench/bench_error_rates.py [--errors N] [--runs R]

No NATS: the projection schema is created as the projector creates it, then N
`error.raised` events are generated (a week of history, the catalogue's codes with
realistic weights) and loaded through Arrow straight into `events` (with a JSON payload)
and `errors`, as the projector would have left them. Then, R times each, in turn:

* `SELECT * FROM error_rates` (per minute, type and code, ordered);
* the bare baseline `SELECT date_trunc('minute', occurred_at), type, count(*) FROM events
  GROUP BY ALL`;
* for reference, the same question asked of `events` alone, reading type and code out of
  the JSON payload (what the `errors` fact table saves).

Results are fetched as Arrow (no Python objects per row). Prints the median of each and
the ratio error_rates / bare GROUP BY.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from projections.store.store import ProjectionStore
from schemas import CATALOGUE

CHUNK = 1_000_000
WEEK_US = 7 * 24 * 3600 * 1_000_000
START_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
WEIGHTS = {
    "NONZERO_EXIT": 40,
    "EXECUTION_TIMEOUT": 20,
    "OOM_KILLED": 8,
    "SIGNALED": 5,
    "INVALID_SPEC": 5,
    "POLICY_VIOLATION": 3,
    "QUEUE_FULL": 6,
    "HOST_PRESSURE": 2,
    "PIDS_LIMIT": 2,
    "OUTPUT_LIMIT": 2,
    "IMAGE_NOT_FOUND": 1,
    "DOCKER_UNAVAILABLE": 1,
    "DOCKER_API_ERROR": 1,
    "CIRCUIT_OPEN": 1,
    "KILLED_EXTERNALLY": 1,
    "CONTAINER_VANISHED": 1,
    "SUPERVISOR_LOST": 1,
    "REDELIVERY_LIMIT": 0.5,
    "CLEANUP_FAILED": 0.5,
}

ERROR_RATES = "SELECT * FROM error_rates"
BARE = "SELECT date_trunc('minute', occurred_at) AS minute, type, count(*) FROM events GROUP BY ALL"
FROM_JSON = (
    "SELECT date_trunc('minute', occurred_at) AS minute, payload->>'error_type' AS error_type, "
    "payload->>'code' AS code, count(*) FROM events WHERE type = 'error.raised' GROUP BY ALL"
)

_LOAD_EVENTS = """
INSERT INTO events
SELECT seq, 'sup.error.' || error_type || '.n1.' || task_id, occurred_at, 'error.raised',
       event_id, occurred_at, 'n1', 'boot-1', task_id, attempt, '', 1,
       json_object('type', 'error.raised', 'error_type', error_type, 'code', code,
                   'message', message, 'retryable', retryable, 'details', json_object(),
                   'container_id', NULL, 'event_id', event_id,
                   'occurred_at', strftime(occurred_at, '%Y-%m-%dT%H:%M:%S.%fZ'),
                   'node_id', 'n1', 'instance_id', 'boot-1', 'task_id', task_id,
                   'attempt', attempt, 'correlation_id', '', 'schema_version', 1)
FROM chunk
"""
_LOAD_ERRORS = """
INSERT INTO errors
SELECT seq, event_id, occurred_at, 'n1', task_id, attempt, '', 'boot-1', error_type, code,
       message, retryable, NULL
FROM chunk
"""


def chunk(seed: int, first_seq: int, n: int, lo_us: int, hi_us: int) -> pa.Table:
    """n error events, seq from `first_seq`, spread evenly over [lo_us, hi_us), codes drawn
    with `WEIGHTS` (pyarrow compute: no Python object per row)."""
    codes = list(WEIGHTS)
    slots: list[int] = []
    total = sum(WEIGHTS.values())
    for i, c in enumerate(codes):
        slots += [i] * round(WEIGHTS[c] / total * 1000)
    pick = pc.cast(pc.floor(pc.multiply(pc.random(n, initializer=seed), len(slots))), pa.int64())
    pick = pa.array(slots, pa.int64()).take(pick)
    seq = pa.array(range(first_seq, first_seq + n), pa.int64())
    offset = pc.divide(pc.multiply(pc.subtract(seq, first_seq), hi_us - lo_us), n)
    at = pc.cast(pc.add(offset, lo_us), pa.timestamp("us"))
    return pa.table(
        {
            "seq": seq,
            "event_id": pc.binary_join_element_wise("e-", pc.cast(seq, pa.string()), ""),
            "occurred_at": at,
            "task_id": pc.binary_join_element_wise(
                "t-", pc.cast(pc.divide(seq, 3), pa.string()), ""
            ),
            "attempt": pc.cast(pc.add(pc.bit_wise_and(seq, 1), 1), pa.int32()),
            "error_type": pa.array([CATALOGUE[c][0] for c in codes]).take(pick),
            "code": pa.array(codes).take(pick),
            "message": pa.array(
                [f"{c.lower().replace('_', ' ')} in the attempt" for c in codes]
            ).take(pick),
            "retryable": pa.array([CATALOGUE[c][1] for c in codes]).take(pick),
        }
    )


def _arrow(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """The result of `sql` as one Arrow table, without the copy a DB-API result makes
    (the relation's `to_arrow_table` in DuckDB 2, `arrow` before)."""
    rel = con.sql(sql)
    fetch = getattr(rel, "to_arrow_table", None) or rel.arrow
    return fetch()


def median_s(con: duckdb.DuckDBPyConnection, sql: str, runs: int) -> tuple[float, int]:
    times = []
    rows = 0
    for _ in range(runs):
        t = time.perf_counter()
        rows = _arrow(con, sql).num_rows
        times.append(time.perf_counter() - t)
    return statistics.median(times), rows


def main(n: int, runs: int) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-error-rates-"))
    try:
        path = tmp / "errors.duckdb"
        ProjectionStore(path).close()
        con = duckdb.connect(str(path))
        t0 = time.perf_counter()
        span = WEEK_US // max(1, (n + CHUNK - 1) // CHUNK)
        for i, start in enumerate(range(0, n, CHUNK)):
            size = min(CHUNK, n - start)
            lo = START_US + i * span
            table = chunk(i, start + 1, size, lo, lo + span)
            con.register("chunk", table)
            con.execute(_LOAD_EVENTS)
            con.execute(_LOAD_ERRORS)
            con.unregister("chunk")
        con.execute("CHECKPOINT")
        print(
            f"loaded {n:,} error events into events and errors in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )

        median_s(con, ERROR_RATES, 1)  # warm
        median_s(con, BARE, 1)
        rates, rates_rows = median_s(con, ERROR_RATES, runs)
        bare, bare_rows = median_s(con, BARE, runs)
        from_json, _ = median_s(con, FROM_JSON, max(1, runs // 3))
        print(
            f"SELECT * FROM error_rates:       median {rates * 1000:8.1f} ms ({rates_rows:,} rows)"
        )
        print(f"bare GROUP BY over events:       median {bare * 1000:8.1f} ms ({bare_rows:,} rows)")
        print(f"same question from JSON payload: median {from_json * 1000:8.1f} ms (reference)")
        print(f"ratio error_rates / bare GROUP BY: {rates / bare:.2f}")
        con.close()
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--errors", type=int, default=10_000_000, help="error events to load")
    parser.add_argument("--runs", type=int, default=7, help="runs of each query")
    args = parser.parse_args()
    sys.exit(main(args.errors, args.runs))
