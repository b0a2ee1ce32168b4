"""The set-based SQL that applies the node and reconciler events of a batch. Pure: text only.

Run after the statements of `projections.store.apply` (same transaction, same staging tables:
`_new`, and `_instance`, `_inventory`, `_decision`, `_outcome` from
`projections.stream.decode.STAGING`):

- (`instances`, one row per supervisor process, is a current-state table declared in
  `projections.store.current` and merged with the others.)
- `inventories` (one row per `node.inventory`), `reconcile_decisions` and
  `reconcile_outcomes` (one row per event) are facts.
- `observed_containers` / `observed_workspaces` hold, per node, exactly the rows of the
  node's latest inventory: a batch with an inventory of a node replaces that node's rows.
  A batch holds the stream in order, so its latest inventory of a node is the latest of
  all; the rows do not depend on where batches were cut.
"""

from __future__ import annotations

from typing import Final

_ENV = "n.seq, n.event_id, n.occurred_at, n.node_id, n.task_id, n.attempt, n.correlation_id"

INSERT_INVENTORIES = f"""
INSERT INTO inventories
SELECT {_ENV}, n.instance_id, x.observed_at, x.workspace_root, len(x.containers),
       len(x.workspaces)
FROM _inventory x JOIN _new n ON n.seq = x.seq
"""

LATEST_INVENTORY = """
CREATE OR REPLACE TEMP VIEW _latest_inventory AS
SELECT n.node_id, max(n.seq) AS seq FROM _inventory x JOIN _new n ON n.seq = x.seq
GROUP BY n.node_id
"""

REPLACE_OBSERVED_CONTAINERS = (
    "DELETE FROM observed_containers WHERE node_id IN (SELECT node_id FROM _latest_inventory)",
    """
INSERT INTO observed_containers
SELECT l.node_id, l.seq, u.c.container_id, u.c.state, u.c.created_at, u.c.task_id,
       u.c.attempt, u.c.instance_id, u.c.deadline, u.c.managed, u.c.label_node
FROM (SELECT seq, unnest(containers) AS c FROM _inventory) u
JOIN _latest_inventory l ON l.seq = u.seq
""",
)

REPLACE_OBSERVED_WORKSPACES = (
    "DELETE FROM observed_workspaces WHERE node_id IN (SELECT node_id FROM _latest_inventory)",
    """
INSERT INTO observed_workspaces
SELECT l.node_id, l.seq, u.w.path, u.w.created_at, u.w.task_id, u.w.attempt
FROM (SELECT seq, unnest(workspaces) AS w FROM _inventory) u
JOIN _latest_inventory l ON l.seq = u.seq
""",
)

INSERT_DECISIONS = f"""
INSERT INTO reconcile_decisions
SELECT {_ENV}, x.rule, x.resource_kind, x.resource, x.evidence_seqs, x.command_id, x.dry_run,
       x.action, x.reason, x.resource_task_id, x.resource_attempt, x.since
FROM _decision x JOIN _new n ON n.seq = x.seq
"""

INSERT_OUTCOMES = f"""
INSERT INTO reconcile_outcomes
SELECT {_ENV}, x.command_id, x.outcome, x.final, x.delivery, x.rule, x.action,
       x.resource_kind, x.resource, x.detail
FROM _outcome x JOIN _new n ON n.seq = x.seq
"""

RECONCILE_STATEMENTS: Final[tuple[str, ...]] = (
    INSERT_INVENTORIES,
    LATEST_INVENTORY,
    *REPLACE_OBSERVED_CONTAINERS,
    *REPLACE_OBSERVED_WORKSPACES,
    INSERT_DECISIONS,
    INSERT_OUTCOMES,
)
"""Run in this order, after `projections.store.apply.APPLY_STATEMENTS`."""
