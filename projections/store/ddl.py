"""Every table and view of the projection, in one place (documented in docs/projections.md).

All timestamps are UTC, stored as `TIMESTAMP` (without time zone). `seq` columns are
`SUP_EVENTS` stream sequences: the proof a row can be traced back to. Tables hold only
what the log says, never the time they were written, so a replay of the whole history
gives exactly the rows of the live projection; views may use `now()` (ages).

Tables come in three kinds: the raw log (`events`, `dead_letters`), facts (one row per
event of a kind: `errors`, `cleanups`, `alerts`, `reconcile_decisions`,
`reconcile_outcomes`, `inventories`) and current state (one row per entity: `tasks`,
`attempts`, `containers`, `workspaces`, `instances`; and `observed_containers` /
`observed_workspaces`, the rows of each node's latest `node.inventory`), plus the
`projector_state` watermark. Bump `DDL_VERSION` on any change to a table; a projection file
of another version is refused (replay it).
"""

from __future__ import annotations

from typing import Final

from projections.store.machine import TERMINAL_TASK_TYPES, sql_in
from schemas.lifecycle import REFUSED_PROOFS

DDL_VERSION: Final = 4

TABLES: Final[tuple[str, ...]] = (
    "events",
    "dead_letters",
    "tasks",
    "attempts",
    "containers",
    "workspaces",
    "errors",
    "cleanups",
    "alerts",
    "reconcile_decisions",
    "reconcile_outcomes",
    "instances",
    "inventories",
    "observed_containers",
    "observed_workspaces",
    "node_keys",
    "projector_state",
)
"""Every table, in the order a comparison or a dump should visit them."""

VIEWS: Final[tuple[str, ...]] = (
    "parked_containers",
    "leak_intervals",
    "leaked_resources",
    "task_latencies",
    "error_rates",
    "cleanup_success_rate",
    "task_latency",
    "open_tasks",
    "reconcile_commands",
    "terminal_conflicts",
)

KEYS: Final[dict[str, tuple[str, ...]]] = {
    "events": ("seq",),
    "dead_letters": ("seq",),
    "tasks": ("task_id",),
    "attempts": ("task_id", "attempt"),
    "containers": ("container_id",),
    "workspaces": ("path",),
    "errors": ("seq",),
    "cleanups": ("seq",),
    "alerts": ("seq",),
    "reconcile_decisions": ("seq",),
    "reconcile_outcomes": ("seq",),
    "instances": ("instance_id",),
    "inventories": ("seq",),
    "observed_containers": ("node_id", "container_id"),
    "observed_workspaces": ("node_id", "path"),
    "node_keys": ("node_id", "public_key"),
    "projector_state": ("stream",),
}
"""The key of each table (unique by construction; no index is declared: inserts stay cheap)."""

_ENVELOPE = """
    seq            BIGINT NOT NULL,
    event_id       VARCHAR NOT NULL,
    occurred_at    TIMESTAMP NOT NULL,
    node_id        VARCHAR NOT NULL,
    task_id        VARCHAR NOT NULL,
    attempt        INTEGER NOT NULL,
    correlation_id VARCHAR NOT NULL"""

TABLE_DDL: Final[dict[str, str]] = {
    "events": """
CREATE TABLE IF NOT EXISTS events (
    seq            BIGINT NOT NULL,
    subject        VARCHAR NOT NULL,
    stored_at      TIMESTAMP NOT NULL,
    type           VARCHAR NOT NULL,
    event_id       VARCHAR NOT NULL,
    occurred_at    TIMESTAMP NOT NULL,
    node_id        VARCHAR NOT NULL,
    instance_id    VARCHAR NOT NULL,
    task_id        VARCHAR NOT NULL,
    attempt        INTEGER NOT NULL,
    correlation_id VARCHAR NOT NULL,
    schema_version INTEGER NOT NULL,
    payload        JSON NOT NULL USING COMPRESSION zstd,
    proof          VARCHAR
)""",
    "dead_letters": """
CREATE TABLE IF NOT EXISTS dead_letters (
    seq       BIGINT NOT NULL,
    subject   VARCHAR NOT NULL,
    stored_at TIMESTAMP NOT NULL,
    data      BLOB NOT NULL,
    reason    VARCHAR NOT NULL,
    detail    VARCHAR NOT NULL
)""",
    "tasks": """
CREATE TABLE IF NOT EXISTS tasks (
    task_id         VARCHAR NOT NULL,
    state           VARCHAR,
    outcome         VARCHAR,
    priority        VARCHAR,
    image           VARCHAR,
    node_id         VARCHAR NOT NULL,
    correlation_id  VARCHAR NOT NULL,
    max_attempts    INTEGER,
    attempts        INTEGER NOT NULL,
    submitted_at    TIMESTAMP,
    submitted_seq   BIGINT,
    finished_at     TIMESTAMP,
    finished_seq    BIGINT,
    exit_code       INTEGER,
    error_type      VARCHAR,
    error_code      VARCHAR,
    duration_s      DOUBLE,
    terminal_events INTEGER NOT NULL,
    first_seq       BIGINT NOT NULL,
    last_seq        BIGINT NOT NULL,
    last_event_at   TIMESTAMP NOT NULL,
    events          INTEGER NOT NULL
)""",
    "attempts": """
CREATE TABLE IF NOT EXISTS attempts (
    task_id        VARCHAR NOT NULL,
    attempt        INTEGER NOT NULL,
    state          VARCHAR NOT NULL,
    outcome        VARCHAR,
    node_id        VARCHAR NOT NULL,
    instance_id    VARCHAR NOT NULL,
    max_attempts   INTEGER,
    started_at     TIMESTAMP,
    started_seq    BIGINT,
    finished_at    TIMESTAMP,
    finished_seq   BIGINT,
    exit_code      INTEGER,
    error_type     VARCHAR,
    error_code     VARCHAR,
    duration_s     DOUBLE,
    container_id   VARCHAR,
    workspace      VARCHAR,
    kill_reason    VARCHAR,
    first_seq      BIGINT NOT NULL,
    last_seq       BIGINT NOT NULL,
    events         INTEGER NOT NULL
)""",
    "containers": """
CREATE TABLE IF NOT EXISTS containers (
    container_id       VARCHAR NOT NULL,
    state              VARCHAR,
    task_id            VARCHAR NOT NULL,
    attempt            INTEGER NOT NULL,
    node_id            VARCHAR NOT NULL,
    instance_id        VARCHAR NOT NULL,
    image              VARCHAR,
    deadline           TIMESTAMP,
    created_at         TIMESTAMP,
    created_seq        BIGINT,
    started_at         TIMESTAMP,
    exited_at          TIMESTAMP,
    exit_code          INTEGER,
    oom_killed         BOOLEAN,
    kill_reason        VARCHAR,
    removed_at         TIMESTAMP,
    removed_seq        BIGINT,
    already_gone       BOOLEAN,
    cleanup_failures   INTEGER NOT NULL,
    last_cleanup_error VARCHAR,
    first_seq          BIGINT NOT NULL,
    last_seq           BIGINT NOT NULL
)""",
    "workspaces": """
CREATE TABLE IF NOT EXISTS workspaces (
    path               VARCHAR NOT NULL,
    state              VARCHAR,
    task_id            VARCHAR NOT NULL,
    attempt            INTEGER NOT NULL,
    node_id            VARCHAR NOT NULL,
    instance_id        VARCHAR NOT NULL,
    files              INTEGER,
    bytes              BIGINT,
    created_at         TIMESTAMP,
    created_seq        BIGINT,
    removed_at         TIMESTAMP,
    removed_seq        BIGINT,
    already_gone       BOOLEAN,
    cleanup_failures   INTEGER NOT NULL,
    last_cleanup_error VARCHAR,
    first_seq          BIGINT NOT NULL,
    last_seq           BIGINT NOT NULL
)""",
    "errors": f"""
CREATE TABLE IF NOT EXISTS errors ({_ENVELOPE},
    instance_id    VARCHAR NOT NULL,
    error_type     VARCHAR NOT NULL,
    code           VARCHAR NOT NULL,
    message        VARCHAR NOT NULL,
    retryable      BOOLEAN NOT NULL,
    container_id   VARCHAR
)""",
    "cleanups": f"""
CREATE TABLE IF NOT EXISTS cleanups ({_ENVELOPE},
    step           VARCHAR NOT NULL,
    resource       VARCHAR NOT NULL,
    outcome        VARCHAR NOT NULL,
    duration_s     DOUBLE NOT NULL,
    already_gone   BOOLEAN NOT NULL,
    reason         VARCHAR,
    error_class    VARCHAR
)""",
    "alerts": f"""
CREATE TABLE IF NOT EXISTS alerts ({_ENVELOPE},
    kind           VARCHAR NOT NULL,
    metric         VARCHAR NOT NULL,
    value          DOUBLE,
    threshold      DOUBLE
)""",
    "reconcile_decisions": f"""
CREATE TABLE IF NOT EXISTS reconcile_decisions ({_ENVELOPE},
    rule           VARCHAR NOT NULL,
    resource_kind  VARCHAR NOT NULL,
    resource       VARCHAR NOT NULL,
    evidence_seqs  BIGINT[] NOT NULL,
    command_id     VARCHAR,
    dry_run        BOOLEAN NOT NULL,
    action         VARCHAR NOT NULL,
    reason         VARCHAR NOT NULL,
    resource_task_id VARCHAR NOT NULL,
    resource_attempt INTEGER NOT NULL,
    since          TIMESTAMP
)""",
    "reconcile_outcomes": f"""
CREATE TABLE IF NOT EXISTS reconcile_outcomes ({_ENVELOPE},
    command_id     VARCHAR NOT NULL,
    outcome        VARCHAR NOT NULL,
    final          BOOLEAN NOT NULL,
    delivery       INTEGER NOT NULL,
    rule           VARCHAR NOT NULL,
    action         VARCHAR NOT NULL,
    resource_kind  VARCHAR NOT NULL,
    resource       VARCHAR NOT NULL,
    detail         VARCHAR NOT NULL
)""",
    "instances": """
CREATE TABLE IF NOT EXISTS instances (
    instance_id         VARCHAR NOT NULL,
    node_id             VARCHAR NOT NULL,
    role                VARCHAR,
    pid                 INTEGER,
    started_at          TIMESTAMP,
    started_seq         BIGINT,
    stopped_at          TIMESTAMP,
    stopped_seq         BIGINT,
    heartbeats          BIGINT NOT NULL,
    last_heartbeat_at   TIMESTAMP,
    last_heartbeat_seq  BIGINT,
    heartbeat_timeout_s DOUBLE,
    first_seq           BIGINT NOT NULL,
    last_seq            BIGINT NOT NULL,
    last_event_at       TIMESTAMP NOT NULL,
    events              BIGINT NOT NULL
)""",
    "inventories": f"""
CREATE TABLE IF NOT EXISTS inventories ({_ENVELOPE},
    instance_id    VARCHAR NOT NULL,
    observed_at    TIMESTAMP NOT NULL,
    workspace_root VARCHAR NOT NULL,
    containers     INTEGER NOT NULL,
    workspaces     INTEGER NOT NULL
)""",
    "observed_containers": """
CREATE TABLE IF NOT EXISTS observed_containers (
    node_id       VARCHAR NOT NULL,
    seq           BIGINT NOT NULL,
    container_id  VARCHAR NOT NULL,
    state         VARCHAR NOT NULL,
    created_at    TIMESTAMP NOT NULL,
    task_id       VARCHAR,
    attempt       INTEGER,
    instance_id   VARCHAR,
    deadline      TIMESTAMP,
    managed       BOOLEAN NOT NULL,
    label_node    VARCHAR
)""",
    "observed_workspaces": """
CREATE TABLE IF NOT EXISTS observed_workspaces (
    node_id    VARCHAR NOT NULL,
    seq        BIGINT NOT NULL,
    path       VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL,
    task_id    VARCHAR,
    attempt    INTEGER
)""",
    # The keys that sign for each node (`schemas.lifecycle.Keyring`): pinned in `[signing]
    # keys` when the projection was made, or learned from the node's first signed event.
    "node_keys": """
CREATE TABLE IF NOT EXISTS node_keys (
    node_id    VARCHAR NOT NULL,
    public_key VARCHAR NOT NULL,
    pinned     BOOLEAN NOT NULL,
    first_seq  BIGINT
)""",
    "projector_state": """
CREATE TABLE IF NOT EXISTS projector_state (
    stream      VARCHAR NOT NULL,
    seq         BIGINT NOT NULL,
    ddl_version INTEGER NOT NULL
)""",
}

_TERMINAL_TASK = "state IN ('succeeded', 'failed', 'rejected')"

VIEW_DDL: Final[dict[str, str]] = {
    # A warm pool's containers (`pool.*` events), one row each: `parked` until an attempt
    # adopts it (`adopted`, then the attempt's own container in `containers`) or the pool
    # retires it (`retired`; `retire_failed` while a failed removal is not made good, by a
    # cleanup recorded in `containers`).
    "parked_containers": """
CREATE OR REPLACE VIEW parked_containers AS
WITH p AS (
    SELECT type, seq, occurred_at, node_id, instance_id, task_id, attempt,
           json_extract_string(payload, '$.container_id') AS container_id,
           json_extract_string(payload, '$.workspace') AS workspace,
           json_extract_string(payload, '$.shape') AS shape,
           json_extract_string(payload, '$.reason') AS reason,
           json_extract_string(payload, '$.error') AS error,
           coalesce(json_extract(payload, '$.removed')::BOOLEAN, true) AS removed
    FROM events WHERE type IN ('pool.parked', 'pool.adopted', 'pool.retired')
), g AS (
    SELECT container_id,
           arg_min(workspace, seq) AS workspace,
           arg_min(shape, seq) AS shape,
           arg_min(node_id, seq) AS node_id,
           arg_min(instance_id, seq) FILTER (WHERE type = 'pool.parked') AS instance_id,
           min(occurred_at) FILTER (WHERE type = 'pool.parked') AS parked_at,
           min(seq) FILTER (WHERE type = 'pool.parked') AS parked_seq,
           min(occurred_at) FILTER (WHERE type = 'pool.adopted') AS adopted_at,
           min(seq) FILTER (WHERE type = 'pool.adopted') AS adopted_seq,
           arg_min(task_id, seq) FILTER (WHERE type = 'pool.adopted') AS task_id,
           arg_min(attempt, seq) FILTER (WHERE type = 'pool.adopted') AS attempt,
           min(occurred_at) FILTER (WHERE type = 'pool.retired') AS retired_at,
           min(seq) FILTER (WHERE type = 'pool.retired') AS retired_seq,
           arg_min(reason, seq) FILTER (WHERE type = 'pool.retired') AS retire_reason,
           arg_min(error, seq) FILTER (WHERE type = 'pool.retired') AS retire_error,
           bool_and(removed) FILTER (WHERE type = 'pool.retired') AS retire_removed
    FROM p GROUP BY container_id
)
SELECT g.container_id, g.workspace, g.shape, g.node_id, g.instance_id, g.parked_at,
       g.parked_seq, g.adopted_at, g.adopted_seq, g.task_id, g.attempt, g.retired_at,
       g.retired_seq, g.retire_reason, g.retire_error,
       CASE WHEN g.adopted_seq IS NOT NULL THEN 'adopted'
            WHEN c.removed_seq IS NOT NULL THEN 'retired'
            WHEN g.retired_seq IS NOT NULL AND g.retire_removed THEN 'retired'
            WHEN g.retired_seq IS NOT NULL THEN 'retire_failed'
            ELSE 'parked' END AS state,
       coalesce(CASE WHEN g.retire_removed THEN g.retired_seq END, c.removed_seq)
           AS removed_seq
FROM g LEFT JOIN containers c ON c.container_id = g.container_id AND g.adopted_seq IS NULL
""",
    # A resource is leaked once the attempt that made it finished, or its task reached a
    # terminal state, and no removal was recorded by then (the attempt's own removal that
    # follows its outcome aside). It leaks from the earlier of the
    # two (`leaked_since`) until its removal (`leaked_until`, NULL while it lasts). This is
    # the one definition of a leak: `leaked_resources` and the report read it.
    "leak_intervals": f"""
CREATE OR REPLACE VIEW leak_intervals AS
WITH r AS (
    SELECT 'container' AS kind, container_id AS resource, state, task_id, attempt, node_id,
           instance_id, created_at, removed_at, removed_seq, cleanup_failures,
           last_cleanup_error
    FROM containers
    UNION ALL
    SELECT 'workspace', path, state, task_id, attempt, node_id,
           instance_id, created_at, removed_at, removed_seq, cleanup_failures,
           last_cleanup_error
    FROM workspaces
), s AS (
    SELECT r.*, t.state AS task_state, least(a.finished_at, t.finished_at) AS leaked_since
    FROM r
    LEFT JOIN attempts a ON a.task_id = r.task_id AND a.attempt = r.attempt
    LEFT JOIN tasks t ON t.task_id = r.task_id
    WHERE a.finished_seq IS NOT NULL OR t.{_TERMINAL_TASK}
)
SELECT s.kind, s.resource, s.state, s.task_id, s.attempt, s.node_id, s.instance_id,
       s.task_state, s.created_at, s.leaked_since,
       CASE WHEN s.removed_seq IS NULL THEN NULL ELSE s.removed_at END AS leaked_until,
       s.cleanup_failures, s.last_cleanup_error
FROM s LEFT JOIN events re ON re.seq = s.removed_seq
WHERE s.removed_seq IS NULL
   -- Removed after its attempt ended: a leak unless it was the attempt's own removal (by
   -- the instance that made it, none failed, no reconcile decision), which follows the
   -- outcome of an attempt whose container exited on its own.
   OR (s.removed_at > s.leaked_since
       AND (s.cleanup_failures > 0
            OR re.instance_id IS DISTINCT FROM s.instance_id
            OR s.resource IN (SELECT resource FROM reconcile_decisions WHERE NOT dry_run)))
""",
    # The leaks that last now, with the age and whose they are. A warm pool's parked
    # container (and its workspace) leaks once the instance that parked it is not alive, or
    # once its retirement failed.
    "leaked_resources": """
CREATE OR REPLACE VIEW leaked_resources AS
WITH parked AS (
    SELECT p.*, w.removed_seq AS workspace_removed_seq
    FROM parked_containers p LEFT JOIN workspaces w ON w.path = p.workspace
    WHERE p.state IN ('parked', 'retire_failed')
), l AS (
    SELECT kind, resource, state, task_id, attempt, node_id, instance_id, task_state,
           created_at, leaked_since, cleanup_failures, last_cleanup_error, false AS parked
    FROM leak_intervals WHERE leaked_until IS NULL
    UNION ALL
    SELECT 'container', container_id, state, '_', 0, node_id, instance_id, NULL, parked_at,
           retired_at, 0, retire_error, true
    FROM parked
    UNION ALL
    SELECT 'workspace', workspace, state, '_', 0, node_id, instance_id, NULL, parked_at,
           retired_at, 0, retire_error, true
    FROM parked WHERE workspace_removed_seq IS NULL
), o AS (
    SELECT l.*,
           -- The process that made the resource: only its node can reach its engine.
           CASE WHEN rn.node_id IS NOT NULL THEN 'retired'
                WHEN i.stopped_seq IS NOT NULL THEN 'stopped'
                WHEN i.last_heartbeat_at IS NULL THEN 'unknown'
                WHEN epoch(now()) - epoch(i.last_heartbeat_at) > i.heartbeat_timeout_s
                     THEN 'dead'
                ELSE 'alive' END AS owner,
           coalesce(l.leaked_since, i.stopped_at,
                    i.last_heartbeat_at + to_seconds(i.heartbeat_timeout_s)) AS since
    FROM l
    LEFT JOIN instances i ON i.instance_id = l.instance_id
    LEFT JOIN (SELECT DISTINCT node_id FROM events WHERE type = 'node.retired') rn
           ON rn.node_id = l.node_id
)
SELECT kind, resource, state, task_id, attempt, node_id, task_state, created_at,
       since AS leaked_since, epoch(now()) - epoch(since) AS age_s, cleanup_failures,
       last_cleanup_error, owner
FROM o
WHERE NOT parked OR state = 'retire_failed' OR owner NOT IN ('alive', 'unknown')
""",
    # A finished task's latency, submitted to finished: the one definition.
    "task_latencies": """
CREATE OR REPLACE VIEW task_latencies AS
SELECT task_id, outcome, submitted_at, finished_at,
       date_diff('microsecond', submitted_at, finished_at) / 1e6 AS latency_s
FROM tasks WHERE outcome IS NOT NULL AND submitted_at IS NOT NULL
""",
    "error_rates": """
CREATE OR REPLACE VIEW error_rates AS
SELECT date_trunc('minute', occurred_at) AS minute, error_type, code, count(*) AS errors
FROM errors
GROUP BY ALL
ORDER BY minute, error_type, code
""",
    "cleanup_success_rate": """
CREATE OR REPLACE VIEW cleanup_success_rate AS
SELECT step,
       count(*) AS attempts,
       count(*) FILTER (WHERE outcome = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE outcome = 'failed') AS failed,
       count(*) FILTER (WHERE already_gone) AS already_gone,
       round(count(*) FILTER (WHERE outcome = 'succeeded') / count(*), 6) AS success_rate,
       quantile_cont(duration_s, 0.5) AS p50_duration_s,
       quantile_cont(duration_s, 0.95) AS p95_duration_s
FROM cleanups
GROUP BY step
ORDER BY step
""",
    "task_latency": """
CREATE OR REPLACE VIEW task_latency AS
SELECT outcome,
       count(*) AS tasks,
       quantile_cont(latency_s, 0.5) AS p50_s,
       quantile_cont(latency_s, 0.95) AS p95_s,
       quantile_cont(latency_s, 0.99) AS p99_s,
       max(latency_s) AS max_s
FROM task_latencies
GROUP BY outcome
ORDER BY outcome
""",
    "open_tasks": f"""
CREATE OR REPLACE VIEW open_tasks AS
SELECT t.task_id, t.state, t.priority, t.node_id, t.attempts, t.max_attempts,
       a.container_id, t.submitted_at, t.last_event_at,
       epoch(now()) - epoch(coalesce(t.submitted_at, t.last_event_at)) AS age_s
FROM tasks t
LEFT JOIN attempts a ON a.task_id = t.task_id AND a.attempt = t.attempts
WHERE NOT coalesce(t.{_TERMINAL_TASK}, false)
ORDER BY t.first_seq
""",
    # One row per command the reconciler ordered (dry runs order nothing): its first
    # decision, and where its outcomes stand. `status`: issued (no outcome yet), retrying
    # (failed, to be delivered again), or the final outcome.
    "reconcile_commands": """
CREATE OR REPLACE VIEW reconcile_commands AS
WITH d AS (
    SELECT command_id, min(seq) AS decision_seq, arg_min(occurred_at, seq) AS decided_at,
           arg_min(node_id, seq) AS node_id, arg_min(rule, seq) AS rule,
           arg_min(action, seq) AS action, arg_min(resource_kind, seq) AS resource_kind,
           arg_min(resource, seq) AS resource, arg_min(resource_task_id, seq) AS task_id,
           arg_min(resource_attempt, seq) AS attempt, count(*) AS decisions
    FROM reconcile_decisions WHERE NOT dry_run AND command_id IS NOT NULL
    GROUP BY command_id
), o AS (
    SELECT command_id, count(*) AS deliveries, arg_max(outcome, seq) AS last_outcome,
           bool_or(final) AS final, max(seq) FILTER (WHERE final) AS outcome_seq,
           max(occurred_at) FILTER (WHERE final) AS finished_at, arg_max(detail, seq) AS detail
    FROM reconcile_outcomes GROUP BY command_id
)
SELECT d.*, CASE WHEN o.final THEN o.last_outcome WHEN o.command_id IS NULL THEN 'issued'
                 ELSE 'retrying' END AS status,
       coalesce(o.deliveries, 0) AS deliveries, o.outcome_seq, o.finished_at, o.detail,
       coalesce(epoch(o.finished_at), epoch(now())) - epoch(d.decided_at) AS age_s
FROM d LEFT JOIN o USING (command_id)
ORDER BY d.decision_seq
""",
    # A task has one outcome: its first terminal event that its attempt's owner may send
    # (`projections.store.machine.terminal_applies`); an attempt, likewise, one end. Every other
    # terminal or `attempt.finished` event (a bug, a forgery, a node that went on after it
    # was presumed dead) is kept here with both sequences and why it was not applied:
    # its proof when its node did not sign it (`unsigned`, `bad_signature`,
    # `unknown_key`: `schemas.lifecycle.REFUSED_PROOFS`), else `after_end` (the task or
    # attempt had ended already) or `not_owner` (an instance other than the attempt's
    # owner, or an attempt never started). The `tasks` and
    # `attempts` rows never take it; `supervisor audit` reports it.
    "terminal_conflicts": f"""
CREATE OR REPLACE VIEW terminal_conflicts AS
SELECT e.task_id, e.attempt, 'task' AS scope, t.finished_seq AS first_seq,
       t.outcome AS first_outcome, e.seq AS conflict_seq,
       split_part(e.type, '.', 2) AS conflict_outcome,
       CASE WHEN e.proof IN {REFUSED_PROOFS!r} THEN e.proof
            WHEN e.seq > t.finished_seq THEN 'after_end' ELSE 'not_owner' END AS reason,
       e.node_id, e.instance_id, e.occurred_at
FROM events e JOIN tasks t ON t.task_id = e.task_id
WHERE t.terminal_events > CAST(t.finished_seq IS NOT NULL AS INTEGER)
  AND e.type IN {sql_in(TERMINAL_TASK_TYPES)} AND e.seq IS DISTINCT FROM t.finished_seq
UNION ALL
SELECT e.task_id, e.attempt, 'attempt', a.finished_seq, a.outcome, e.seq,
       e.payload->>'$.outcome',
       CASE WHEN e.proof IN {REFUSED_PROOFS!r} THEN e.proof
            WHEN e.seq > a.finished_seq THEN 'after_end' ELSE 'not_owner' END,
       e.node_id, e.instance_id, e.occurred_at
FROM events e JOIN attempts a ON a.task_id = e.task_id AND a.attempt = e.attempt
WHERE e.type = 'attempt.finished' AND e.seq IS DISTINCT FROM a.finished_seq
ORDER BY conflict_seq
""",
}


def schema_statements() -> list[str]:
    """Every statement that creates the schema, tables first; idempotent."""
    return [*TABLE_DDL.values(), *VIEW_DDL.values()]
