"""`supervisor node retire ID`: record that a node is gone for good.

Refused (exit 2) while the node's latest heartbeat is within the timeout it declared: a
live node is stopped first (`--force` retires it anyway). Otherwise it publishes
`node.retired` and closes the node's open attempts as lost
(`supervisor.reconcile.retire`), waits until every event is acknowledged, and prints what
it did: the attempts closed (their tasks go on on the other nodes) and where the
abandoned resources are listed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

import msgspec

from schemas.errors import NatsUnavailable
from supervisor.cli.options import common_options, config_of

EXIT_OK, EXIT_REFUSED = 0, 2


def add_node_parser(sub: Any) -> None:
    node = sub.add_parser("node", help="record what happened to a node of the fleet")
    actions = node.add_subparsers(dest="action", required=True, metavar="ACTION")
    retire = actions.add_parser(
        "retire",
        help="record that node ID is gone for good; close its open attempts",
        description="Record that node ID is gone for good (a node.retired event): its open "
        "attempts are closed as infrastructure/SUPERVISOR_LOST and its tasks go on on the "
        "other nodes; what it left on its engine is listed in leaked_resources with owner "
        "'retired'. Refused (exit 2) while the node still sends heartbeats, unless --force.",
    )
    retire.add_argument("id", metavar="ID", help="the node id")
    retire.add_argument("--reason", default="", help="why, recorded in the event")
    retire.add_argument("--force", action="store_true", help="retire it even if it looks alive")
    retire.add_argument("--json", action="store_true", help="print JSON")
    common_options(retire, node=False)
    retire.set_defaults(func=_cmd_retire)


def _cmd_retire(args: argparse.Namespace) -> int:
    return asyncio.run(_retire(args))


async def _retire(args: argparse.Namespace) -> int:
    from supervisor.daemon.nats_target import connected_event_log
    from supervisor.eventlog.emitter import Emitter
    from supervisor.reconcile.retire import heartbeat_age, open_attempts, retire

    cfg = config_of(args)
    async with connected_event_log(cfg, args.nats_url, "retire a node") as events:
        js = events.js
        age = await heartbeat_age(js, args.id, datetime.now(UTC))
        if age is not None and age[0] <= age[1] and not args.force:
            sys.stderr.write(
                f"supervisor: node {args.id} sent a heartbeat {age[0]:.0f}s ago (its timeout "
                f"is {age[1]:.0f}s): it is alive; stop it first, or pass --force\n"
            )
            return EXIT_REFUSED
        attempts = await open_attempts(js, args.id)
        retire(Emitter(events, args.id, events.instance_id), attempts, args.reason)
        if not await events.flush(30):
            raise NatsUnavailable(events.nats_url, "the retirement's events were not acknowledged")
    closed = [f"{a.task_id}/{a.attempt}" for a in attempts]
    if args.json:
        doc = {"node_id": args.id, "closed_attempts": closed}
        sys.stdout.write(msgspec.json.encode(doc).decode() + "\n")
    else:
        sys.stdout.write(
            f"node {args.id} retired; {len(closed)} open attempt(s) closed as lost"
            + (f": {', '.join(closed)}" if closed else "")
            + f"\nits resources: supervisor sql \"SELECT * FROM leaked_resources WHERE node_id = '{args.id}'\"\n"
        )
    return EXIT_OK
