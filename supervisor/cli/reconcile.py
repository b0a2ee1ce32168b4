"""`supervisor reconcile [--dry-run] [--json]`: one reconciliation pass now.

The pass is the daemon's (`supervisor.reconcile.reconciler`): it observes this node (Docker and the
workspace dirs), publishes the `node.inventory`, decides from the projection and, unless
`--dry-run`, publishes the decisions and their cleanup commands. The projection is a copy
this command holds: `--db FILE` (e.g. made by `supervisor replay`, caught up here), else a
temporary one replayed from the stream. The commands are then carried out on this node's
command queue (by this command, or by the node's daemon if it is faster) and the outcomes
waited for up to `--wait` seconds. A dry run publishes its decisions (marked `dry_run`) and
changes nothing.

Exit 0 when the pass ran (whatever it found), 3 when NATS, Docker or the projection cannot
be used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from projections.serve.projector import Projector
from projections.serve.reconcile_state import DuckDBState, cursor_runner
from projections.serve.replay import replay
from schemas.errors import NatsUnavailable, SupervisorError
from schemas.lifecycle import Keyring
from supervisor.cli.options import config_of

EXIT_OK, EXIT_UNAVAILABLE = 0, 3

_OUTCOMES = """
SELECT command_id, arg_max(outcome, seq), arg_max(detail, seq) FROM reconcile_outcomes
WHERE final AND command_id IN (SELECT unnest($ids)) GROUP BY command_id
"""


def cmd_reconcile(args: argparse.Namespace) -> int:
    try:
        doc = asyncio.run(_reconcile(args))
    except SupervisorError as e:
        sys.stderr.write(f"supervisor: {e}\n")
        return EXIT_UNAVAILABLE
    sys.stdout.write(msgspec.json.encode(doc).decode() + "\n" if args.json else render_text(doc))
    return EXIT_OK


@contextlib.asynccontextmanager
async def _projection(
    db: str | None, url: str, keyring: Keyring
) -> AsyncIterator[tuple[Projector, DuckDBState]]:
    with tempfile.TemporaryDirectory(prefix="supervisor-reconcile-") as tmp:
        path = Path(db) if db else Path(tmp) / "projection.duckdb"
        if db is None:
            await replay(path, url, keyring=keyring)
        projector = Projector(path, url, batch_age_s=0.05, keyring=keyring)
        on_cursor, close = cursor_runner(projector.store.con)
        try:
            yield projector, DuckDBState(on_cursor, refresh=projector.catch_up)
        finally:
            close()
            projector.close()


async def _reconcile(args: argparse.Namespace) -> dict[str, Any]:
    from supervisor.daemon.node import open_node
    from supervisor.eventlog.nats_client import ensure_stream_exists
    from supervisor.eventlog.streams import commands_stream_config
    from supervisor.reconcile.command_executor import CommandExecutor, JetStreamCommands
    from supervisor.reconcile.reconciler import Reconciler

    cfg = config_of(args)
    async with open_node(cfg, nats_url=args.nats_url, role="reconcile") as node:
        if not await node.events.wait_connected(10):
            raise NatsUnavailable(node.nats_url, "a reconcile pass needs NATS")
        js = node.events.js
        await ensure_stream_exists(
            js, commands_stream_config(node.config.nats.replicas), url=node.nats_url
        )
        keyring = cfg.signing.keyring()
        async with _projection(args.db, node.nats_url, keyring) as (projector, state):
            reconciler = Reconciler(
                emitter=node.emitter,
                observer=node.runtime,
                state=state,
                bus=None if args.dry_run else JetStreamCommands(js),
                data_dir=node.data_dir,
                config=cfg.reconcile,
            )
            report = await reconciler.run_pass(dry_run=args.dry_run)
            outcomes: dict[str, tuple[str, str]] = {}
            if report.commands and args.wait > 0:
                executor = CommandExecutor(
                    js=js,
                    runtime=node.runtime,
                    cleaner=node.executor.cleaner,
                    emitter=node.emitter,
                    data_dir=node.data_dir,
                    config=cfg.reconcile,
                    metrics=node.metrics,
                    keyring=node.keyring,
                )
                await executor.start(background=False)
                try:
                    outcomes = await _carry_out(executor, projector, report.commands, args.wait)
                finally:
                    await executor.stop()
        await node.events.flush(10)
    return report_doc(cfg.node_id, report, outcomes)


async def _carry_out(
    executor: Any, projector: Projector, ids: list[str], wait_s: float
) -> dict[str, tuple[str, str]]:
    """Execute the node's queued commands until every one of `ids` has a final outcome in
    the projection (whoever carried it out), or `wait_s` passed."""
    deadline = time.monotonic() + wait_s
    outcomes: dict[str, tuple[str, str]] = {}
    while True:
        await executor.drain(timeout=0.2)
        await executor.emitter.sink.flush(2.0)
        await projector.catch_up()
        rows = projector.store.con.execute(_OUTCOMES, {"ids": ids}).fetchall()
        outcomes = {r[0]: (r[1], r[2]) for r in rows}
        if len(outcomes) == len(set(ids)) or time.monotonic() >= deadline:
            return outcomes


def report_doc(node_id: str, report: Any, outcomes: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """The pass as JSON-able values."""
    decided = {d.command_id for d in report.decided}
    published = set(report.commands)
    divergences = []
    for p in report.planned:
        d = p.divergence
        outcome = outcomes.get(p.command_id)
        status = (
            "dry_run"
            if report.dry_run
            else outcome[0]
            if outcome
            else "pending"
            if p.pending
            else "issued"
            if p.command_id in published
            else "deferred"
        )
        divergences.append(
            {
                "rule": d.rule,
                "resource_kind": d.resource_kind,
                "resource": d.resource,
                "action": d.action,
                "reason": d.reason,
                "evidence_seqs": list(d.evidence),
                "task_id": d.task_id,
                "attempt": d.attempt,
                "since": d.since.isoformat(),
                "command_id": p.command_id,
                "decided_now": p.command_id in decided,
                "status": status,
                "detail": outcome[1] if outcome else "",
            }
        )
    return {
        "node_id": node_id,
        "pass_id": report.pass_id,
        "dry_run": report.dry_run,
        "inventory_seq": report.inventory_seq,
        "containers": report.containers,
        "workspaces": report.workspaces,
        "divergences": divergences,
        "decided": len(report.decided),
        "issued": report.issued,
        "duplicates": report.duplicates,
        "deferred": report.deferred,
        "oldest_leak_s": round(report.oldest_leak_s, 3),
        "duration_s": round(report.duration_s, 3),
    }


def render_text(doc: dict[str, Any]) -> str:
    """One line per divergence, then a summary."""
    lines = [
        f"reconcile {doc['node_id']}: inventory seq {doc['inventory_seq']} "
        f"({doc['containers']} container(s), {doc['workspaces']} workspace dir(s))"
    ]
    for d in doc["divergences"]:
        resource = d["resource"][:12] if d["resource_kind"] == "container" else d["resource"]
        seqs = ",".join(str(s) for s in d["evidence_seqs"])
        lines.append(
            f"  {d['rule']}  {d['resource_kind']} {resource}  {d['action']}  "
            f"seq {seqs}  {d['reason']}  [{d['status']}]"
        )
    lines.append(
        f"reconcile: {len(doc['divergences'])} divergence(s), {doc['decided']} decided"
        + ("" if doc["dry_run"] else f", {doc['issued']} command(s) issued")
        + (f", {doc['deferred']} deferred" if doc["deferred"] else "")
        + (" (dry run: nothing ordered)" if doc["dry_run"] else "")
    )
    return "\n".join(lines) + "\n"
