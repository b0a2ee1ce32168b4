"""The read side's subcommands on the `supervisor` CLI's parser: `replay`, `audit`, `sql`,
`report`, `export` (run by `supervisor.cli.read`) and `reconcile` (`supervisor.cli.reconcile`).

Registering them imports neither DuckDB nor Arrow: each command's module is imported when
the command runs, so `supervisor serve`, `submit` and `run` do not carry the read side's
libraries in their memory (the daemon's projection runs in a process of its own).

`add_parsers(subparsers)` registers them all, each with the CLI's shared options
(`supervisor.cli.options`). Each sets `func`: the parsed args -> the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from projections.query.defaults import EXPORT_FORMATS, FORMATS, MAX_ROWS, TIMEOUT_S
from schemas.params import point_in_time
from supervisor.cli.options import common_options


def add_parsers(subparsers: Any) -> None:
    """Register the read side's commands and `reconcile`."""
    add_read_side_parsers(subparsers)
    add_reconcile_parser(subparsers)


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """`module.name`, imported on the first call."""

    def run(args: argparse.Namespace) -> int:
        command: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module(module), name
        )
        return command(args)

    run.__name__ = name
    return run


def parse_time(text: str) -> datetime:
    """`--until`: an ISO-8601 time, or a duration back from now (`10m`), as `--since`
    takes them everywhere (`schemas.params.point_in_time`)."""
    try:
        return point_in_time("--until", text, datetime.now(UTC))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _nonnegative(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite, non-negative number")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite, positive number of seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def add_read_side_parsers(subparsers: Any) -> None:
    """Register `replay`, `audit`, `sql`, `report` and `export` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "replay",
        help="rebuild the projection as of a point in history",
        description="Rebuild the DuckDB projection from SUP_EVENTS into FILE (atomically "
        "replaced), up to a stream sequence or the stream time TIME. A progress bar is "
        "drawn on a terminal.",
    )
    p.add_argument("--db", required=True, metavar="FILE", help="the projection file to write")
    until = p.add_mutually_exclusive_group()
    until.add_argument(
        "--until",
        type=parse_time,
        metavar="TIME",
        help="last stream time to include (ISO 8601, UTC if naive)",
    )
    until.add_argument("--until-seq", type=int, metavar="N", help="last stream sequence to include")
    common_options(p, node=False)
    p.set_defaults(func=_lazy("supervisor.cli.read", "cmd_replay"))

    p = subparsers.add_parser(
        "audit",
        help="check history: lifecycle invariants, signatures, outcomes decided again",
        description="Check the whole history against the lifecycle state machine and the "
        "cleanup invariants, and decide again from recorded evidence: each attempt's "
        "outcome re-classified, each reconcile decision re-checked, no event from an "
        "instance after its end, no end its node did not sign (docs/projections.md, Audit). "
        "Exit 0 when clean, 1 with violations. Without --db the stream is replayed into a "
        "temporary file first, judging signatures with the configuration's [signing] keys.",
    )
    p.add_argument("--db", metavar="FILE", help="a projection file (e.g. made by replay)")
    p.add_argument("--json", action="store_true", help="print the violations as JSON")
    p.add_argument(
        "--grace",
        type=_nonnegative,
        metavar="SECONDS",
        help="treat tasks active within SECONDS of the end of history as in flight",
    )
    common_options(p, node=False)
    p.set_defaults(func=_lazy("supervisor.cli.read", "cmd_audit"))

    p = subparsers.add_parser(
        "sql",
        help="read-only SQL over the projection",
        description="Run one read-only SELECT over the running daemon's live projection "
        "(POST /v1/query; its address from <data-dir>/http.url, else the configured "
        "http.listen; token from $SUPERVISOR_HTTP_TOKEN, else http.token), or over a "
        "projection file with --db. With no daemon answering (and no --url), the data dir's "
        "own projection (a stopped daemon's), else one rebuilt from SUP_EVENTS; stderr says "
        "which. A statement that is not a single SELECT is refused (exit 2); a failed or "
        "timed-out query exits 1; nothing to read, 3.",
    )
    p.add_argument(
        "query", metavar="SQL", help='one SELECT statement, e.g. "SELECT * FROM error_rates"'
    )
    p.add_argument("--db", metavar="FILE", help="a projection file (e.g. made by replay)")
    p.add_argument(
        "--url", metavar="URL", help="the daemon's HTTP address (default: <data-dir>/http.url)"
    )
    p.add_argument(
        "--format", choices=FORMATS, default="table", help="output format (default table)"
    )
    p.add_argument(
        "--max-rows",
        type=_positive_int,
        default=MAX_ROWS,
        metavar="N",
        help=f"row limit (default {MAX_ROWS})",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=TIMEOUT_S,
        metavar="S",
        help=f"time limit in seconds (default {TIMEOUT_S:g})",
    )
    common_options(p, node=False)
    p.set_defaults(func=_lazy("supervisor.cli.read", "cmd_sql"))

    p = subparsers.add_parser(
        "report",
        help="write an HTML report of the projection",
        description="Write one self-contained HTML page (no script, no network needed to view "
        "it) with charts of the error rate by type and code, task latency p50/p95/p99, the "
        "cleanup success rate, leaked resources and queue depth (alerts and breaker "
        "transitions marked) over time, and the top error codes with an example task each. "
        "Reads a projection file with --db, else the running daemon's live projection "
        "(POST /v1/query, as `sql`), else the data dir's own or one rebuilt from SUP_EVENTS "
        "(as `sql`, saying which). Exit 0 written, 2 bad usage, 3 nothing to read.",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="the HTML file to write")
    p.add_argument("--db", metavar="FILE", help="a projection file (e.g. made by replay)")
    p.add_argument(
        "--url", metavar="URL", help="the daemon's HTTP address (default: <data-dir>/http.url)"
    )
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="only what happened since: an ISO time, or a duration back from now (90m, 2h, 7d)",
    )
    common_options(p, node=False)
    p.set_defaults(func=_lazy("supervisor.cli.read", "cmd_report"))
    _add_export(subparsers)


def _add_export(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a table or a query's result as Parquet or CSV",
        description="Write a table or view of the projection (docs/projections.md), or the "
        "rows of one read-only SELECT, as a Parquet or CSV file that any DuckDB, pandas or "
        "polars opens. Reads --db FILE, else the data dir's projection (a stopped daemon's), "
        "else one rebuilt from SUP_EVENTS, and says which. Exit 0 written, 2 bad usage or a "
        "refused statement, 1 a failed query, 3 nothing to read.",
    )
    p.add_argument("table", nargs="?", metavar="TABLE", help="a table or view, e.g. errors")
    p.add_argument("--query", metavar="SQL", help="one SELECT instead of a table")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    p.add_argument(
        "--format", choices=EXPORT_FORMATS, help="parquet or csv (default: --out's suffix)"
    )
    p.add_argument("--db", metavar="FILE", help="a projection file (e.g. made by replay)")
    common_options(p, node=False)
    p.set_defaults(func=_lazy("supervisor.cli.read", "cmd_export"))


def add_reconcile_parser(subparsers: Any) -> None:
    """Register `reconcile` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "reconcile",
        help="one reconciliation pass now",
        description="Observe this node, compare with the projection and order the cleanup "
        "of every divergence (orphan, overdue or vanished containers, leaked workspaces, "
        "lost attempts, unresolved cleanup failures). Exit 0 when the pass ran.",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="publish the decisions it would take; order and change nothing",
    )
    p.add_argument("--json", action="store_true", help="print the pass as JSON")
    p.add_argument(
        "--db",
        metavar="FILE",
        help="a projection file to use and catch up (default: a temporary replay)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="S",
        help="carry out the commands and wait up to S seconds for their outcomes "
        "(0: leave them to the daemon; default 30)",
    )
    common_options(p)
    p.set_defaults(func=_lazy("supervisor.cli.reconcile", "cmd_reconcile"))
