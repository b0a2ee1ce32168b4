"""The set-based SQL that applies one batch of events to the projection. Pure: text only.

The store loads the staging tables of `projections.stream.decode.STAGING` into temp tables of the
same names: `_batch` (every valid event's envelope, without its subject and payload, which
`INSERT_EVENTS` reads from the Arrow batch, `_rows_batch`), `_submitted`, `_terminal`,
`_attempt`, `_container`, `_workspace`, `_error`, `_cleanup`, `_alert`, `_instance`,
`_inventory`, `_decision` and `_outcome` (what the projection reads of each kind's body,
keyed by `seq`). Then, in one transaction with the watermark, it fills `_new`
(`FILL_NEW`) and runs the statements of `APPLY_STATEMENTS` whose inputs hold rows, in order:

1. `_new` is the batch without the events already in `events` (same `event_id`). Joining
   a kind's rows with `_new` drops its duplicates too. This is what makes applying an event
   twice a no-op.
2. `events` and the fact tables get one row per new event of their kind.
3. Each current-state table is merged (`MERGE INTO`) with the batch's contribution per key.
   Every column is a "first" (kept from the stored row if it has one), a "last" (taken from
   the batch), or a count (added), combined in stream order; so the rows do not depend on
   where batch boundaries fell, and a replay equals the live projection.

Why statements are skipped: planning a `MERGE` costs milliseconds whatever its input, and a
live batch holds a few events of a few kinds. Each `Step` names the inputs it reads; over
empty inputs it would change nothing, so `steps_for` leaves it out.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from projections.store import apply_reconcile as rec
from projections.store.current import (
    ATTEMPT_CATEGORIES,
    ATTEMPT_SCOPE,
    TABLES,
    TASK_SCOPE,
)
from projections.store.merge import merge_sql
from projections.stream.decode import STAGING

__all__ = ["ATTEMPT_CATEGORIES", "ATTEMPT_SCOPE", "TASK_SCOPE"]

# A duplicate is the same event published again (an outbox replayed after the stream's
# duplicate window): same event_id, hence the same occurred_at. Joining on both lets DuckDB
# push the batch's occurred_at range into the scan of `events` and skip every row group
# outside it, so the check costs the batch's time span, not the history's size. Repeats
# within a batch were already dropped by the decoder. The statement's count is the number of
# new events.
FILL_NEW = """
INSERT INTO _new
SELECT * REPLACE (make_timestamp(stored_ns // 1000) AS stored_ns) FROM _batch
WHERE seq NOT IN (
    SELECT b.seq FROM _batch b
    JOIN events e ON e.event_id = b.event_id AND e.occurred_at = b.occurred_at
)
"""

CREATE_NEW = """
CREATE TEMP TABLE _new AS
SELECT * REPLACE (make_timestamp(stored_ns // 1000) AS stored_ns) FROM _batch LIMIT 0
"""
"""`_new`, made once per connection after the staging table `_batch`."""

INSERT_BATCH_EVENTS = """
INSERT INTO events
SELECT seq, subject, make_timestamp(stored_ns // 1000), type, event_id, occurred_at, node_id,
       instance_id, task_id, attempt, correlation_id, schema_version, payload, proof
FROM _rows_batch
"""
"""Every event of `_rows_batch`, the batch's Arrow table itself, into `events`: the subjects
and payloads, most of a batch's bytes, are copied once, into `events`, and never into a
temp table. As is, for a batch whose duplicates were already filtered out."""

INSERT_EVENTS = INSERT_BATCH_EVENTS + "WHERE seq IN (SELECT seq FROM _new)\n"
"""The new events of the batch (those in `_new`) into `events`."""

_ENV = "n.seq, n.event_id, n.occurred_at, n.node_id, n.task_id, n.attempt, n.correlation_id"

INSERT_ERRORS = f"""
INSERT INTO errors
SELECT {_ENV}, n.instance_id, x.error_type, x.code, x.message, x.retryable, x.container_id
FROM _error x JOIN _new n ON n.seq = x.seq
"""

INSERT_CLEANUPS = f"""
INSERT INTO cleanups
SELECT {_ENV}, x.step, x.resource, split_part(n.type, '.', 2), x.duration_s, x.already_gone,
       x.reason, x.error_class
FROM _cleanup x JOIN _new n ON n.seq = x.seq
"""

INSERT_ALERTS = f"""
INSERT INTO alerts
SELECT {_ENV}, split_part(n.type, '.', 2), x.metric, x.value, x.threshold
FROM _alert x JOIN _new n ON n.seq = x.seq
"""

_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    kind: tuple(n for n in schema.names if n != "seq")
    for kind, schema in STAGING.items()
    if kind != "batch"
}
"""The fields of each staging kind (besides its `seq`), as the `MERGE`s read them."""

_MERGES: Final[dict[str, str]] = {t.name: merge_sql(t, _FIELDS) for t in TABLES}
"""Each current-state table's `MERGE`, made from its declaration (`projections.store.current`)."""

MERGE_TASKS, MERGE_ATTEMPTS = _MERGES["tasks"], _MERGES["attempts"]
MERGE_CONTAINERS, MERGE_WORKSPACES = _MERGES["containers"], _MERGES["workspaces"]
MERGE_INSTANCES = _MERGES["instances"]


INSERT_DEAD_LETTERS = """
INSERT INTO dead_letters
SELECT seq, subject, make_timestamp(stored_ns // 1000), data, reason, detail
FROM _dead
"""


@dataclass(frozen=True)
class Step:
    """One statement of a batch, and the inputs it reads (staging kinds, `TASK_SCOPE`,
    `ATTEMPT_SCOPE`): when none of them holds rows it would change nothing."""

    sql: str
    reads: frozenset[str]


def _step(sql: str, *reads: str) -> Step:
    return Step(sql, frozenset(reads))


_RECONCILE_READS: Final[dict[str, tuple[str, ...]]] = {
    rec.INSERT_INVENTORIES: ("inventory",),
    rec.LATEST_INVENTORY: ("inventory",),
    **dict.fromkeys(rec.REPLACE_OBSERVED_CONTAINERS, ("inventory",)),
    **dict.fromkeys(rec.REPLACE_OBSERVED_WORKSPACES, ("inventory",)),
    rec.INSERT_DECISIONS: ("decision",),
    rec.INSERT_OUTCOMES: ("outcome",),
}

APPLY_STATEMENTS: Final[tuple[Step, ...]] = (
    _step(INSERT_EVENTS, "batch"),
    _step(INSERT_ERRORS, "error"),
    _step(INSERT_CLEANUPS, "cleanup"),
    _step(INSERT_ALERTS, "alert"),
    # Attempts before tasks: whether a terminal event ends its task depends on its attempt
    # (`projections.store.machine.terminal_applies`).
    *(_step(_MERGES[t.name], *t.reads) for t in TABLES),
    # A statement added there without its inputs here fails at import (KeyError).
    *(_step(sql, *_RECONCILE_READS[sql]) for sql in rec.RECONCILE_STATEMENTS),
)
"""Run in this order over `_new` and the staging tables, inside the batch's transaction
(the node and reconciler tables last: `projections.store.apply_reconcile`)."""


FOLDED_MERGES: Final[frozenset[str]] = frozenset(_MERGES.values())
"""The `MERGE`s that `projections.store.batch_fold` computes in Python for a small batch."""


def steps_for(inputs: Collection[str], *, folded: bool = False) -> tuple[str, ...]:
    """The statements of `APPLY_STATEMENTS` that read one of `inputs` (those holding rows
    in the batch), in order; `folded`: without `FOLDED_MERGES`."""
    present = frozenset(inputs)
    skip = FOLDED_MERGES if folded else frozenset()
    return tuple(
        s.sql for s in APPLY_STATEMENTS if not s.reads.isdisjoint(present) and s.sql not in skip
    )


SET_WATERMARK = "UPDATE projector_state SET seq = $seq WHERE stream = $stream"
