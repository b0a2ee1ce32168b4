"""The read side's subcommands for the `supervisor` CLI: `replay`, `audit`, `sql`,
`report`, `export`.

`supervisor.cli.read_parsers` registers them; each `cmd_*` takes the parsed args and returns the
exit code (0 ok; `audit` 1 on violations; `sql` 2 on a
refused statement or a refused token, 1 when a query fails or times out; 3 when NATS, the
projection file or the daemon cannot be used).

`sql` and `report` without `--db` ask the running daemon (`POST /v1/query`,
`projections.query.remote`); with none answering, they read the data dir's own projection
(a stopped daemon's) or one rebuilt from `SUP_EVENTS`, as `export` does, and say which.

NATS is found as every command finds it (`--nats`, `SUPERVISOR_NATS_URL`, a running
daemon's URL in the data dir, the configuration); only when none is known is an embedded
`nats-server` started on the data dir's store, for the duration of the command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from projections.audit import HistoryStart, audit_history, render_json, render_text
from projections.errors import (
    DaemonRefused,
    DaemonUnreachable,
    ProjectionError,
    QueryError,
    QueryFailed,
    QueryRefused,
)
from projections.query.query import (
    QueryResult,
    check_query,
    open_readonly,
    run_query,
)
from projections.query.remote import daemon_token, daemon_url, query_daemon
from projections.query.render import render
from projections.serve.live import DB_NAME
from projections.serve.replay import replay, stream_retention
from schemas.errors import SupervisorError, redact_url
from schemas.lifecycle import Keyring
from supervisor.cli.options import config_of
from supervisor.daemon.nats_target import nats_for
from supervisor.eventlog.nats_server import resolve_nats_url

EXIT_OK, EXIT_VIOLATIONS, EXIT_REFUSED, EXIT_UNAVAILABLE = 0, 1, 2, 3
EXIT_QUERY_FAILED = EXIT_VIOLATIONS

# A daemon's error answer to `sql`, by its catalogue code -> the exit code (else 3).
_EXIT_FOR_CODE = {
    "QUERY_REFUSED": EXIT_REFUSED,
    "INVALID_QUERY": EXIT_REFUSED,
    "UNAUTHORIZED": EXIT_REFUSED,
    "QUERY_FAILED": EXIT_QUERY_FAILED,
    "QUERY_TIMEOUT": EXIT_QUERY_FAILED,
}


def _settings(args: argparse.Namespace) -> tuple[str | None, Path]:
    """(NATS URL as configured, data dir) from the args, the environment, the config file."""
    cfg = config_of(args)
    data_dir = getattr(args, "data_dir", None) or os.environ.get("SUPERVISOR_DATA_DIR")
    return getattr(args, "nats_url", None) or cfg.nats_target, Path(
        data_dir or cfg.data_dir
    ).resolve()


def _keyring(args: argparse.Namespace) -> Keyring:
    """The configuration's pinned keys (`[signing] keys`): a replay learns the others."""
    return config_of(args).signing.keyring()


@contextlib.asynccontextmanager
async def nats_url_for(args: argparse.Namespace) -> AsyncIterator[str]:
    """The NATS to use; the data dir's embedded server (with its users) if none is known."""
    url, data_dir = _settings(args)
    async with nats_for(url, data_dir) as found:
        yield found


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"supervisor: {message}\n")
    return code


def readable_locally(args: argparse.Namespace) -> bool:
    """Whether there is something to read without a daemon: the data dir's projection file,
    a NATS that is named or answers, or an embedded NATS store to start."""
    url, data_dir = _settings(args)
    return (
        (data_dir / DB_NAME).is_file()
        or resolve_nats_url(url, data_dir) is not None
        or (data_dir / "nats").is_dir()
    )


@contextlib.contextmanager
def local_projection(args: argparse.Namespace, purpose: str) -> Iterator[Path]:
    """A projection to read without a daemon, saying which on stderr: the data dir's own
    file (a stopped daemon's), else one rebuilt from `SUP_EVENTS` into a temporary file
    (the data dir's embedded NATS is started for it when no NATS is known)."""
    _, data_dir = _settings(args)
    own = data_dir / DB_NAME
    if own.is_file():
        with contextlib.suppress(QueryFailed):
            open_readonly(own).close()
            sys.stderr.write(f"{purpose}: reading the data dir's projection {own}{_as_of(own)}\n")
            yield own
            return
    with tempfile.TemporaryDirectory(prefix=f"supervisor-{purpose}-") as tmp:
        path = Path(tmp) / DB_NAME

        async def rebuild() -> str:
            async with nats_url_for(args) as url:
                await replay(path, url, progress=True, keyring=_keyring(args))
            return url

        url = asyncio.run(rebuild())
        sys.stderr.write(
            f"{purpose}: no projection file to read: rebuilt one from SUP_EVENTS at "
            f"{redact_url(url)}{_as_of(path)}\n"
        )
        yield path


def _as_of(path: Path) -> str:
    con = open_readonly(path)
    try:
        row = con.execute("SELECT max(seq) FROM events").fetchone()
    finally:
        con.close()
    return "" if row is None or row[0] is None else f" (as of seq {row[0]})"


def cmd_replay(args: argparse.Namespace) -> int:
    parent = Path(args.db).resolve().parent
    if not parent.is_dir():
        return _fail(f"replay: the directory of --db {args.db} does not exist", EXIT_REFUSED)

    async def go() -> int:
        async with nats_url_for(args) as url:
            result = await replay(
                args.db,
                url,
                until_time=args.until,
                until_seq=args.until_seq,
                progress=True,
                keyring=_keyring(args),
            )
        sys.stderr.write(
            f"replay: {args.db} at seq {result.seq}: {result.applied} events applied, "
            f"{result.dead} dead letters, {result.duplicates} duplicates, "
            f"{result.elapsed_s:.1f}s\n"
        )
        first = _first_seq(args.db)
        if first is not None and first > 1:
            sys.stderr.write(
                f"replay: the history starts at seq {first}, not 1: events before it were "
                "removed by the stream's retention ([events] max_age / max_bytes)\n"
            )
        return EXIT_OK

    try:
        return asyncio.run(go())
    except SupervisorError as e:
        return _fail(str(e), EXIT_UNAVAILABLE)


def _first_seq(db: str) -> int | None:
    con = open_readonly(db)
    try:
        row = con.execute("SELECT min(seq) FROM events").fetchone()
    finally:
        con.close()
    return None if row is None or row[0] is None else int(row[0])


def cmd_audit(args: argparse.Namespace) -> int:
    try:
        if args.db:
            con = open_readonly(args.db)
            violations, start = audit_history(con, grace_s=args.grace)
            con.close()
        else:
            violations, start = asyncio.run(_audit_stream(args))
    except (SupervisorError, duckdb.Error) as e:
        return _fail(str(e), EXIT_UNAVAILABLE)
    note = start.note()
    if note is not None:
        sys.stderr.write(f"audit: {note}\n")
    sys.stdout.write(render_json(violations, start) if args.json else render_text(violations))
    return EXIT_VIOLATIONS if violations else EXIT_OK


async def _audit_stream(args: argparse.Namespace) -> tuple[list[Any], HistoryStart]:
    with tempfile.TemporaryDirectory(prefix="supervisor-audit-") as tmp:
        path = Path(tmp) / "audit.duckdb"
        async with nats_url_for(args) as url:
            sys.stderr.write(f"audit: replaying SUP_EVENTS from {redact_url(url)}\n")
            await replay(path, url, progress=True, keyring=_keyring(args))
            retention = await stream_retention(url)
        con = open_readonly(path)
        try:
            return audit_history(con, grace_s=args.grace, retention=retention)
        finally:
            con.close()


def cmd_sql(args: argparse.Namespace) -> int:
    try:
        if args.db:
            result = _sql_local(args, args.db)
        else:
            try:
                result = _sql_remote(args)
            except DaemonUnreachable as e:
                if args.url or not readable_locally(args):
                    raise
                sys.stderr.write(f"sql: {e}\n")
                with local_projection(args, "sql") as path:
                    result = _sql_local(args, path)
    except QueryRefused as e:
        return _fail(str(e), EXIT_REFUSED)
    except DaemonRefused as e:
        return _fail(e.message, _EXIT_FOR_CODE.get(e.code, EXIT_UNAVAILABLE))
    except DaemonUnreachable as e:
        return _fail(
            f"{e} (is `supervisor serve` running? --url, or --db FILE for a file)", EXIT_UNAVAILABLE
        )
    except (QueryError, ProjectionError) as e:
        return _fail(str(e), EXIT_QUERY_FAILED)
    except SupervisorError as e:  # a bad --config
        return _fail(str(e), EXIT_REFUSED)
    sys.stdout.write(render(result, args.format))
    return EXIT_OK


def _sql_local(args: argparse.Namespace, db: str | Path) -> QueryResult:
    check_query(args.query)
    con = open_readonly(db)
    try:
        return run_query(con, args.query, max_rows=args.max_rows, timeout_s=args.timeout)
    finally:
        con.close()


def _sql_remote(args: argparse.Namespace) -> QueryResult:
    cfg = config_of(args)
    _, data_dir = _settings(args)
    url = args.url.rstrip("/") if args.url else daemon_url(data_dir, cfg.http.listen)
    return query_daemon(
        url,
        args.query,
        max_rows=args.max_rows,
        timeout_s=args.timeout,
        token=daemon_token(cfg.http, data_dir),
    )


def cmd_report(args: argparse.Namespace) -> int:
    from projections.query import report, report_html
    from projections.query.tasks import parse_since

    out = Path(args.out)
    if not out.resolve().parent.is_dir():
        return _fail(f"report: the directory of --out {args.out} does not exist", EXIT_REFUSED)
    try:
        since = parse_since(args.since, datetime.now(UTC)) if args.since else None
    except QueryRefused as e:
        return _fail(f"report: --{e}", EXIT_REFUSED)
    started = time.monotonic()

    def from_file(db: str | Path) -> report.Report:
        con = open_readonly(db)
        try:
            return report.collect(_local_runner(con), since)
        finally:
            con.close()

    try:
        if args.db:
            doc = from_file(args.db)
        else:
            try:
                doc = report.collect(_remote_runner(args), since)
            except DaemonUnreachable as e:
                if args.url or not readable_locally(args):
                    raise
                sys.stderr.write(f"report: {e}\n")
                with local_projection(args, "report") as path:
                    doc = from_file(path)
    except DaemonUnreachable as e:
        return _fail(f"{e} (is `supervisor serve` running? --url, or --db FILE)", EXIT_UNAVAILABLE)
    except DaemonRefused as e:
        return _fail(e.message, EXIT_UNAVAILABLE)
    except (QueryError, ProjectionError) as e:
        return _fail(str(e), EXIT_UNAVAILABLE)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(report_html.render(doc))
    os.replace(tmp, out)
    t = doc.totals
    sys.stderr.write(
        f"report: {out} ({out.stat().st_size} bytes): {t['tasks']:.0f} tasks, "
        f"{t['errors']:.0f} errors, {doc.first_seq or 0}-{doc.last_seq or 0} events, "
        f"{time.monotonic() - started:.1f}s\n"
    )
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from projections.query.export import export, format_of, table_query

    if bool(args.table) == bool(args.query):
        return _fail("export: give a TABLE or --query SQL (one of them)", EXIT_REFUSED)
    out = Path(args.out)
    if not out.resolve().parent.is_dir():
        return _fail(f"export: the directory of --out {args.out} does not exist", EXIT_REFUSED)
    if not args.db and not readable_locally(args):
        _, data_dir = _settings(args)
        return _fail(
            f"export: the data dir {data_dir} holds no projection and no NATS is known "
            "(--db FILE for a file, --nats URL for a stream)",
            EXIT_UNAVAILABLE,
        )
    try:
        fmt = format_of(out, args.format)
        with contextlib.ExitStack() as stack:
            db = args.db or stack.enter_context(local_projection(args, "export"))
            con = open_readonly(db)
            stack.callback(con.close)
            sql = args.query or table_query(con, args.table)
            rows = export(con, sql, out, fmt)
    except QueryRefused as e:
        return _fail(f"export: {e}", EXIT_REFUSED)
    except (QueryError, ProjectionError) as e:
        return _fail(f"export: {e}", EXIT_QUERY_FAILED if args.query else EXIT_UNAVAILABLE)
    except SupervisorError as e:
        return _fail(f"export: {e}", EXIT_UNAVAILABLE)
    what = args.table or "the query"
    sys.stderr.write(f"export: {rows} rows of {what} to {out} ({fmt})\n")
    return EXIT_OK


def _local_runner(con: duckdb.DuckDBPyConnection) -> Any:
    def run(sql: str) -> list[tuple[Any, ...]]:
        return run_query(con, sql, max_rows=100_000, timeout_s=600).rows

    return run


def _remote_runner(args: argparse.Namespace) -> Any:
    cfg = config_of(args)
    _, data_dir = _settings(args)
    url = args.url.rstrip("/") if args.url else daemon_url(data_dir, cfg.http.listen)
    token = daemon_token(cfg.http, data_dir)

    def run(sql: str) -> list[tuple[Any, ...]]:
        return query_daemon(url, sql, max_rows=100_000, timeout_s=120, token=token).rows

    return run
