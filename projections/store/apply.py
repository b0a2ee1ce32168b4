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
from projections.store.machine import (
    TERMINAL_TASK_TYPES,
    sql_attempt_finish_applies,
    sql_in,
    sql_progress_state,
    sql_task_state_case,
    sql_terminal_applies,
)
from schemas import NO_TASK

ATTEMPT_CATEGORIES: Final[tuple[str, ...]] = (
    "attempt",
    "workspace",
    "container",
    "cleanup",
    "error",
)
"""Categories whose events (with attempt >= 1) belong to an attempt; task.* events of an
attempt (retry_scheduled, the terminal event) are task-level."""

CONTAINER_STEPS: Final[tuple[str, ...]] = ("kill", "remove_container")

TASK_SCOPE: Final = "task_scope"
"""An input of `steps_for` besides the staging kinds: some event of the batch names a task."""

ATTEMPT_SCOPE: Final = "attempt_scope"
"""Another: some event of the batch belongs to an attempt (`ATTEMPT_CATEGORIES`, attempt >= 1)."""

_TERMINAL = sql_in(TERMINAL_TASK_TYPES)
_STATE = sql_task_state_case("type")
_FINISH_APPLIES = sql_attempt_finish_applies(
    "n.instance_id", "coalesce(o.instance_id, a.first.instance_id)", "x.error_type"
)
_TERMINAL_APPLIES = sql_terminal_applies(
    "n.attempt", "n.instance_id", "n.seq", "fa.instance_id", "fa.finished_seq"
)

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
       instance_id, task_id, attempt, correlation_id, schema_version, payload
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

MERGE_TASKS = f"""
MERGE INTO tasks USING (
    WITH a AS (
        SELECT task_id,
               min(seq) AS first_seq, max(seq) AS last_seq, count(*) AS events,
               arg_max(occurred_at, seq) AS last_event_at,
               arg_min(node_id, seq) AS node_id,
               arg_min(correlation_id, seq) AS correlation_id,
               count(*) FILTER (WHERE type = 'attempt.started') AS attempts,
               count(*) FILTER (WHERE type IN {_TERMINAL}) AS terminal_events,
               arg_max({_STATE}, seq) FILTER (WHERE {_STATE} IS NOT NULL
                                               AND type NOT IN {_TERMINAL}) AS last_state
        FROM _new WHERE task_id <> '{NO_TASK}'
        GROUP BY task_id
    ), s AS (
        SELECT n.task_id,
               arg_min({{'seq': n.seq, 'at': n.occurred_at, 'priority': x.priority,
                        'image': x.image, 'max_attempts': x.max_attempts}}, n.seq) AS sub
        FROM _submitted x JOIN _new n ON n.seq = x.seq
        GROUP BY n.task_id
    ), f AS (
        SELECT n.task_id,
               arg_min({{'seq': n.seq, 'at': n.occurred_at, 'outcome': {sql_task_state_case("n.type")},
                        'exit_code': x.exit_code, 'error_type': x.error_type,
                        'error_code': x.error_code, 'duration_s': x.duration_s}}, n.seq) AS fin
        FROM _terminal x JOIN _new n ON n.seq = x.seq
        LEFT JOIN attempts fa ON fa.task_id = n.task_id AND fa.attempt = n.attempt
        WHERE {_TERMINAL_APPLIES}
        GROUP BY n.task_id
    ), m AS (
        SELECT a.*, s.sub, f.fin,
               o.task_id IS NOT NULL AS known, o.submitted_seq IS NOT NULL AS old_sub,
               o.finished_seq IS NOT NULL AS old_fin,
               o.state AS o_state, o.outcome AS o_outcome, o.priority AS o_priority,
               o.image AS o_image, o.node_id AS o_node_id, o.correlation_id AS o_corr,
               o.max_attempts AS o_max_attempts, o.attempts AS o_attempts,
               o.submitted_at AS o_submitted_at, o.submitted_seq AS o_submitted_seq,
               o.finished_at AS o_finished_at, o.finished_seq AS o_finished_seq,
               o.exit_code AS o_exit_code, o.error_type AS o_error_type,
               o.error_code AS o_error_code, o.duration_s AS o_duration_s,
               o.terminal_events AS o_terminal_events, o.first_seq AS o_first_seq,
               o.events AS o_events
        FROM a LEFT JOIN s ON s.task_id = a.task_id LEFT JOIN f ON f.task_id = a.task_id
        LEFT JOIN tasks o ON o.task_id = a.task_id
    )
    SELECT task_id,
           coalesce(o_outcome, fin.outcome, last_state, o_state) AS state,
           coalesce(o_outcome, fin.outcome) AS outcome,
           CASE WHEN old_sub THEN o_priority ELSE sub.priority END AS priority,
           CASE WHEN old_sub THEN o_image ELSE sub.image END AS image,
           CASE WHEN known THEN o_node_id ELSE node_id END AS node_id,
           CASE WHEN known THEN o_corr ELSE correlation_id END AS correlation_id,
           CASE WHEN old_sub THEN o_max_attempts ELSE sub.max_attempts END AS max_attempts,
           coalesce(o_attempts, 0) + attempts AS attempts,
           CASE WHEN old_sub THEN o_submitted_at ELSE sub.at END AS submitted_at,
           CASE WHEN old_sub THEN o_submitted_seq ELSE sub.seq END AS submitted_seq,
           CASE WHEN old_fin THEN o_finished_at ELSE fin.at END AS finished_at,
           CASE WHEN old_fin THEN o_finished_seq ELSE fin.seq END AS finished_seq,
           CASE WHEN old_fin THEN o_exit_code ELSE fin.exit_code END AS exit_code,
           CASE WHEN old_fin THEN o_error_type ELSE fin.error_type END AS error_type,
           CASE WHEN old_fin THEN o_error_code ELSE fin.error_code END AS error_code,
           CASE WHEN old_fin THEN o_duration_s ELSE fin.duration_s END AS duration_s,
           coalesce(o_terminal_events, 0) + terminal_events AS terminal_events,
           coalesce(o_first_seq, first_seq) AS first_seq,
           last_seq,
           last_event_at,
           coalesce(o_events, 0) + events AS events
    FROM m
) AS src ON src.task_id = tasks.task_id
WHEN MATCHED THEN UPDATE
WHEN NOT MATCHED THEN INSERT
"""

MERGE_ATTEMPTS = f"""
MERGE INTO attempts USING (
    WITH n AS (
        SELECT * FROM _new
        WHERE attempt > 0 AND split_part(type, '.', 1) IN {sql_in(ATTEMPT_CATEGORIES)}
    ), a AS (
        SELECT task_id, attempt,
               min(seq) AS first_seq, max(seq) AS last_seq, count(*) AS events,
               arg_min({{'node_id': node_id, 'instance_id': instance_id}}, seq) AS first
        FROM n GROUP BY task_id, attempt
    ), x AS (
        SELECT n.task_id, n.attempt,
               arg_min({{'seq': n.seq, 'at': n.occurred_at, 'max_attempts': x.max_attempts}},
                       n.seq) FILTER (WHERE n.type = 'attempt.started') AS st
        FROM _attempt x JOIN n ON n.seq = x.seq
        GROUP BY n.task_id, n.attempt
    ), f AS (
        SELECT n.task_id, n.attempt,
               arg_min({{'seq': n.seq, 'at': n.occurred_at, 'outcome': x.outcome,
                        'exit_code': x.exit_code, 'error_type': x.error_type,
                        'error_code': x.error_code, 'duration_s': x.duration_s}}, n.seq) AS fin
        FROM _attempt x JOIN n ON n.seq = x.seq
        JOIN a ON a.task_id = n.task_id AND a.attempt = n.attempt
        LEFT JOIN attempts o ON o.task_id = n.task_id AND o.attempt = n.attempt
        WHERE n.type = 'attempt.finished'
          AND {_FINISH_APPLIES}
        GROUP BY n.task_id, n.attempt
    ), c AS (
        SELECT n.task_id, n.attempt,
               arg_min(x.container_id, n.seq) FILTER (WHERE n.type = 'container.created')
                   AS container_id,
               arg_min(x.kill_reason, n.seq) FILTER (WHERE n.type = 'container.kill_issued')
                   AS kill_reason
        FROM _container x JOIN n ON n.seq = x.seq
        WHERE n.type IN ('container.created', 'container.kill_issued')
        GROUP BY n.task_id, n.attempt
    ), w AS (
        SELECT n.task_id, n.attempt, arg_min(x.path, n.seq) AS workspace
        FROM _workspace x JOIN n ON n.seq = x.seq
        GROUP BY n.task_id, n.attempt
    ), m AS (
        SELECT a.*, x.st, f.fin, c.container_id, c.kill_reason, w.workspace,
               o.task_id IS NOT NULL AS known, o.started_seq IS NOT NULL AS old_st,
               o.finished_seq IS NOT NULL AS old_fin,
               o.outcome AS o_outcome, o.node_id AS o_node_id, o.instance_id AS o_instance_id,
               o.max_attempts AS o_max_attempts, o.started_at AS o_started_at,
               o.started_seq AS o_started_seq, o.finished_at AS o_finished_at,
               o.finished_seq AS o_finished_seq, o.exit_code AS o_exit_code,
               o.error_type AS o_error_type, o.error_code AS o_error_code,
               o.duration_s AS o_duration_s, o.container_id AS o_container_id,
               o.workspace AS o_workspace, o.kill_reason AS o_kill_reason,
               o.first_seq AS o_first_seq, o.events AS o_events
        FROM a
        LEFT JOIN x ON x.task_id = a.task_id AND x.attempt = a.attempt
        LEFT JOIN f ON f.task_id = a.task_id AND f.attempt = a.attempt
        LEFT JOIN c ON c.task_id = a.task_id AND c.attempt = a.attempt
        LEFT JOIN w ON w.task_id = a.task_id AND w.attempt = a.attempt
        LEFT JOIN attempts o ON o.task_id = a.task_id AND o.attempt = a.attempt
    ), s AS (
        SELECT *,
               CASE WHEN old_st THEN o_started_seq ELSE st.seq END AS started_seq,
               CASE WHEN old_fin THEN o_finished_seq ELSE fin.seq END AS finished_seq
        FROM m
    )
    SELECT task_id, attempt,
           CASE WHEN finished_seq IS NOT NULL THEN 'finished'
                WHEN started_seq IS NOT NULL THEN 'running' ELSE 'unknown' END AS state,
           CASE WHEN old_fin THEN o_outcome ELSE fin.outcome END AS outcome,
           CASE WHEN known THEN o_node_id ELSE first.node_id END AS node_id,
           CASE WHEN known THEN o_instance_id ELSE first.instance_id END AS instance_id,
           CASE WHEN old_st THEN o_max_attempts ELSE st.max_attempts END AS max_attempts,
           CASE WHEN old_st THEN o_started_at ELSE st.at END AS started_at,
           started_seq,
           CASE WHEN old_fin THEN o_finished_at ELSE fin.at END AS finished_at,
           finished_seq,
           CASE WHEN old_fin THEN o_exit_code ELSE fin.exit_code END AS exit_code,
           CASE WHEN old_fin THEN o_error_type ELSE fin.error_type END AS error_type,
           CASE WHEN old_fin THEN o_error_code ELSE fin.error_code END AS error_code,
           CASE WHEN old_fin THEN o_duration_s ELSE fin.duration_s END AS duration_s,
           coalesce(o_container_id, container_id) AS container_id,
           coalesce(o_workspace, workspace) AS workspace,
           coalesce(o_kill_reason, kill_reason) AS kill_reason,
           coalesce(o_first_seq, first_seq) AS first_seq,
           last_seq,
           coalesce(o_events, 0) + events AS events
    FROM s
) AS src ON src.task_id = attempts.task_id AND src.attempt = attempts.attempt
WHEN MATCHED THEN UPDATE
WHEN NOT MATCHED THEN INSERT
"""

MERGE_CONTAINERS = f"""
MERGE INTO containers USING (
    WITH e AS (
        SELECT n.seq, n.type, n.occurred_at, n.task_id, n.attempt, n.node_id, n.instance_id,
               x.container_id AS cid, x.image, x.deadline, x.exit_code, x.oom_killed,
               x.kill_reason, NULL::VARCHAR AS step, NULL::BOOLEAN AS already_gone,
               NULL::VARCHAR AS reason
        FROM _container x JOIN _new n ON n.seq = x.seq
        UNION ALL
        SELECT n.seq, n.type, n.occurred_at, n.task_id, n.attempt, n.node_id, n.instance_id,
               x.resource, NULL, NULL, NULL, NULL, NULL, x.step, x.already_gone, x.reason
        FROM _cleanup x JOIN _new n ON n.seq = x.seq
        WHERE x.step IN {sql_in(CONTAINER_STEPS)}
    ), d AS (
        SELECT cid AS container_id,
               min(seq) AS first_seq, max(seq) AS last_seq,
               arg_min({{'task_id': task_id, 'attempt': attempt, 'node_id': node_id,
                        'instance_id': instance_id}}, seq) AS first,
               arg_min({{'seq': seq, 'at': occurred_at, 'image': image,
                        'deadline': CASE WHEN deadline > 0
                                         THEN make_timestamp((deadline * 1e6)::BIGINT) END}},
                       seq) FILTER (WHERE type = 'container.created') AS cr,
               arg_min(occurred_at, seq) FILTER (WHERE type = 'container.started') AS started_at,
               arg_min({{'at': occurred_at, 'exit_code': exit_code, 'oom_killed': oom_killed}},
                       seq) FILTER (WHERE type = 'container.exited') AS ex,
               arg_min(kill_reason, seq) FILTER (WHERE type = 'container.kill_issued')
                   AS kill_reason,
               arg_min({{'seq': seq, 'at': occurred_at, 'already_gone': already_gone}}, seq)
                   FILTER (WHERE type = 'cleanup.succeeded' AND step = 'remove_container') AS rm,
               count(*) FILTER (WHERE type = 'cleanup.failed') AS cleanup_failures,
               arg_max(reason, seq) FILTER (WHERE type = 'cleanup.failed') AS last_cleanup_error
        FROM e
        GROUP BY cid
    ), m AS (
        SELECT d.*, o.container_id IS NOT NULL AS known,
               o.created_seq IS NOT NULL AS old_cr, o.exited_at IS NOT NULL AS old_ex,
               o.removed_seq IS NOT NULL AS old_rm,
               o.task_id AS o_task_id, o.attempt AS o_attempt, o.node_id AS o_node_id,
               o.instance_id AS o_instance_id, o.image AS o_image, o.deadline AS o_deadline,
               o.created_at AS o_created_at, o.created_seq AS o_created_seq,
               o.started_at AS o_started_at, o.exited_at AS o_exited_at,
               o.exit_code AS o_exit_code, o.oom_killed AS o_oom_killed,
               o.kill_reason AS o_kill_reason, o.removed_at AS o_removed_at,
               o.removed_seq AS o_removed_seq, o.already_gone AS o_already_gone,
               o.cleanup_failures AS o_cleanup_failures,
               o.last_cleanup_error AS o_last_cleanup_error, o.first_seq AS o_first_seq
        FROM d LEFT JOIN containers o ON o.container_id = d.container_id
    ), c AS (
        SELECT *,
               CASE WHEN old_cr THEN o_created_seq ELSE cr.seq END AS created_seq,
               coalesce(o_started_at, started_at) AS started,
               CASE WHEN old_ex THEN o_exited_at ELSE ex.at END AS exited_at,
               CASE WHEN old_rm THEN o_removed_seq ELSE rm.seq END AS removed_seq
        FROM m
    )
    SELECT container_id,
           {sql_progress_state("container")} AS state,
           CASE WHEN known THEN o_task_id ELSE first.task_id END AS task_id,
           CASE WHEN known THEN o_attempt ELSE first.attempt END AS attempt,
           CASE WHEN known THEN o_node_id ELSE first.node_id END AS node_id,
           CASE WHEN known THEN o_instance_id ELSE first.instance_id END AS instance_id,
           CASE WHEN old_cr THEN o_image ELSE cr.image END AS image,
           CASE WHEN old_cr THEN o_deadline ELSE cr.deadline END AS deadline,
           CASE WHEN old_cr THEN o_created_at ELSE cr.at END AS created_at,
           created_seq,
           started AS started_at,
           exited_at,
           CASE WHEN old_ex THEN o_exit_code ELSE ex.exit_code END AS exit_code,
           CASE WHEN old_ex THEN o_oom_killed ELSE ex.oom_killed END AS oom_killed,
           coalesce(o_kill_reason, kill_reason) AS kill_reason,
           CASE WHEN old_rm THEN o_removed_at ELSE rm.at END AS removed_at,
           removed_seq,
           CASE WHEN old_rm THEN o_already_gone ELSE rm.already_gone END AS already_gone,
           coalesce(o_cleanup_failures, 0) + cleanup_failures AS cleanup_failures,
           coalesce(last_cleanup_error, o_last_cleanup_error) AS last_cleanup_error,
           coalesce(o_first_seq, first_seq) AS first_seq,
           last_seq
    FROM c
) AS src ON src.container_id = containers.container_id
WHEN MATCHED THEN UPDATE
WHEN NOT MATCHED THEN INSERT
"""

MERGE_WORKSPACES = f"""
MERGE INTO workspaces USING (
    WITH e AS (
        SELECT n.seq, n.type, n.occurred_at, n.task_id, n.attempt, n.node_id, n.instance_id,
               x.path, x.files, x.bytes, NULL::BOOLEAN AS already_gone, NULL::VARCHAR AS reason
        FROM _workspace x JOIN _new n ON n.seq = x.seq
        UNION ALL
        SELECT n.seq, n.type, n.occurred_at, n.task_id, n.attempt, n.node_id, n.instance_id,
               x.resource, NULL, NULL, x.already_gone, x.reason
        FROM _cleanup x JOIN _new n ON n.seq = x.seq
        WHERE x.step = 'remove_workspace'
    ), d AS (
        SELECT path,
               min(seq) AS first_seq, max(seq) AS last_seq,
               arg_min({{'task_id': task_id, 'attempt': attempt, 'node_id': node_id,
                        'instance_id': instance_id}}, seq) AS first,
               arg_min({{'seq': seq, 'at': occurred_at, 'files': files, 'bytes': bytes}}, seq)
                   FILTER (WHERE type = 'workspace.created') AS cr,
               arg_min({{'seq': seq, 'at': occurred_at, 'already_gone': already_gone}}, seq)
                   FILTER (WHERE type = 'cleanup.succeeded') AS rm,
               count(*) FILTER (WHERE type = 'cleanup.failed') AS cleanup_failures,
               arg_max(reason, seq) FILTER (WHERE type = 'cleanup.failed') AS last_cleanup_error
        FROM e
        GROUP BY path
    ), m AS (
        SELECT d.*, o.path IS NOT NULL AS known,
               o.created_seq IS NOT NULL AS old_cr, o.removed_seq IS NOT NULL AS old_rm,
               o.task_id AS o_task_id, o.attempt AS o_attempt, o.node_id AS o_node_id,
               o.instance_id AS o_instance_id, o.files AS o_files, o.bytes AS o_bytes,
               o.created_at AS o_created_at, o.created_seq AS o_created_seq,
               o.removed_at AS o_removed_at, o.removed_seq AS o_removed_seq,
               o.already_gone AS o_already_gone, o.cleanup_failures AS o_cleanup_failures,
               o.last_cleanup_error AS o_last_cleanup_error, o.first_seq AS o_first_seq
        FROM d LEFT JOIN workspaces o ON o.path = d.path
    ), c AS (
        SELECT *,
               CASE WHEN old_cr THEN o_created_seq ELSE cr.seq END AS created_seq,
               CASE WHEN old_rm THEN o_removed_seq ELSE rm.seq END AS removed_seq
        FROM m
    )
    SELECT path,
           {sql_progress_state("workspace")} AS state,
           CASE WHEN known THEN o_task_id ELSE first.task_id END AS task_id,
           CASE WHEN known THEN o_attempt ELSE first.attempt END AS attempt,
           CASE WHEN known THEN o_node_id ELSE first.node_id END AS node_id,
           CASE WHEN known THEN o_instance_id ELSE first.instance_id END AS instance_id,
           CASE WHEN old_cr THEN o_files ELSE cr.files END AS files,
           CASE WHEN old_cr THEN o_bytes ELSE cr.bytes END AS bytes,
           CASE WHEN old_cr THEN o_created_at ELSE cr.at END AS created_at,
           created_seq,
           CASE WHEN old_rm THEN o_removed_at ELSE rm.at END AS removed_at,
           removed_seq,
           CASE WHEN old_rm THEN o_already_gone ELSE rm.already_gone END AS already_gone,
           coalesce(o_cleanup_failures, 0) + cleanup_failures AS cleanup_failures,
           coalesce(last_cleanup_error, o_last_cleanup_error) AS last_cleanup_error,
           coalesce(o_first_seq, first_seq) AS first_seq,
           last_seq
    FROM c
) AS src ON src.path = workspaces.path
WHEN MATCHED THEN UPDATE
WHEN NOT MATCHED THEN INSERT
"""

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
    rec.MERGE_INSTANCES: ("batch",),  # every event counts towards its instance
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
    _step(MERGE_ATTEMPTS, ATTEMPT_SCOPE),
    _step(MERGE_TASKS, TASK_SCOPE),
    _step(MERGE_CONTAINERS, "container", "cleanup"),
    _step(MERGE_WORKSPACES, "workspace", "cleanup"),
    # A statement added there without its inputs here fails at import (KeyError).
    *(_step(sql, *_RECONCILE_READS[sql]) for sql in rec.RECONCILE_STATEMENTS),
)
"""Run in this order over `_new` and the staging tables, inside the batch's transaction
(the node and reconciler tables last: `projections.store.apply_reconcile`)."""


FOLDED_MERGES: Final[frozenset[str]] = frozenset(
    (MERGE_TASKS, MERGE_ATTEMPTS, MERGE_CONTAINERS, MERGE_WORKSPACES, rec.MERGE_INSTANCES)
)
"""The `MERGE`s that `projections.store.fold` computes in Python for a small batch."""


def steps_for(inputs: Collection[str], *, folded: bool = False) -> tuple[str, ...]:
    """The statements of `APPLY_STATEMENTS` that read one of `inputs` (those holding rows
    in the batch), in order; `folded`: without `FOLDED_MERGES`."""
    present = frozenset(inputs)
    skip = FOLDED_MERGES if folded else frozenset()
    return tuple(
        s.sql for s in APPLY_STATEMENTS if not s.reads.isdisjoint(present) and s.sql not in skip
    )


SET_WATERMARK = "UPDATE projector_state SET seq = $seq WHERE stream = $stream"
