"""The `supervisor` command line. Exit codes follow the design:
run/submit --wait: 0 succeeded, 1 failed, 2 rejected or bad usage, 3 infrastructure."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import signal
import sys
from pathlib import Path
from typing import Any, get_args

import msgspec

from schemas import Result, TaskSpec
from schemas.catalogue import CATALOGUE
from schemas.config import Config
from schemas.errors import ConfigError, InvalidSpec, SupervisorError
from schemas.spec import ErrorType
from supervisor.cli.args import add_submit_parser, spec_parser
from supervisor.cli.http_submit import (
    EXIT_INFRA,
    EXIT_OK,
    EXIT_REJECTED,
    exit_code_of,
    print_result,
)
from supervisor.cli.node_retire import add_node_parser
from supervisor.cli.options import (
    SubcommandParser,
    common_options,
    config_of,
    unknown_command,
    with_node_id,
)
from supervisor.cli.read_parsers import add_parsers as add_read_parsers
from supervisor.eventlog.emitter import new_id, utcnow
from supervisor.eventlog.outcomes import record_refusal, refusal_result
from supervisor.policy.admission import decode_spec
from supervisor.policy.classify import catalogue_entry


def exit_code_for(result: Result) -> int:
    return exit_code_of(msgspec.to_builtins(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supervisor",
        description="Event-sourced supervisor for container executions: runs untrusted "
        "scripts in hardened Docker containers and publishes every step to "
        "NATS JetStream.",
        epilog="Defaults: data dir ./.supervisor (--data-dir, $SUPERVISOR_DATA_DIR), HTTP on "
        "127.0.0.1:8787 (serve --http, http.listen), NATS embedded under the data dir unless "
        "--nats or $SUPERVISOR_NATS_URL names one. Configuration keys: docs/configuration.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=SubcommandParser
    )
    for add in (_add_run, _add_serve, _add_submit, _add_tail, _add_credentials):
        add(sub)

    add_read_parsers(sub)
    add_node_parser(sub)
    return parser


def _add_run(sub: Any) -> None:
    run = spec_parser(
        sub,
        "run",
        "run one task in the foreground, with retries",
        "Run one task (a JSON spec file, or - for stdin) with retries, publishing every "
        "event. Exit 0 succeeded, 1 failed, 2 rejected or bad usage, 3 infrastructure.",
    )
    common_options(run)
    run.set_defaults(func=_cmd_run)


def _add_serve(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the daemon (intake, executor, HTTP)",
        description="Run the node's daemon until SIGTERM/SIGINT: pulls tasks from SUP_TASKS "
        "while it has capacity, runs them, serves HTTP. A first signal drains (within the "
        "grace), a second stops at once; containers are always cleaned up.",
    )
    serve.add_argument(
        "--http", metavar="HOST:PORT", help="HTTP listen address (default 127.0.0.1:8787)"
    )
    serve.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        metavar="LEVEL",
        help="DEBUG, INFO (default), WARNING or ERROR",
    )
    serve.add_argument(
        "--no-projection",
        action="store_true",
        help="do not run the DuckDB projection (by default a child process of the daemon); "
        "/v1/query then answers 503",
    )
    serve.add_argument(
        "--roles",
        type=_roles,
        default=ROLES,
        metavar="ROLE[,ROLE]",
        help="what this host does, of executor (runs tasks), projection (the projection and "
        "its SQL endpoint), reconciler (heartbeats, reconcile passes, cleanup commands); "
        "default all. 'projection' alone needs no Docker and only the reader credential",
    )
    common_options(serve)
    serve.set_defaults(func=_cmd_serve)


ROLES: frozenset[str] = frozenset({"executor", "projection", "reconciler"})


def _roles(text: str) -> frozenset[str]:
    """A comma-separated set of `ROLES`, or a usage error (exit 2)."""
    roles = frozenset(r.strip() for r in text.split(",") if r.strip())
    if not roles or not roles <= ROLES:
        raise argparse.ArgumentTypeError(
            f"roles {text!r}: give one or more of {', '.join(sorted(ROLES))}, comma-separated"
        )
    return roles


def _add_submit(sub: Any) -> None:
    add_submit_parser(sub).set_defaults(func=_cmd_submit)


def _add_tail(sub: Any) -> None:
    tail = sub.add_parser(
        "tail",
        help="print live events, one JSON object a line",
        description="Follow SUP_EVENTS and print matching events as JSON lines until interrupted.",
    )
    tail.add_argument("--errors", action="store_true", help="only error events (sup.error.>)")
    tail.add_argument(
        "--type",
        dest="error_type",
        choices=ERROR_TYPES,
        metavar="T",
        help=f"only errors of this type ({', '.join(ERROR_TYPES)})",
    )
    tail.add_argument(
        "--code", type=_error_code, metavar="C", help="only errors with this code (e.g. OOM_KILLED)"
    )
    tail.add_argument("--task", metavar="ID", help="only this task's events")
    tail.add_argument(
        "--since",
        metavar="D",
        help="start from this point: an ISO-8601 time or a duration ago "
        "(30s, 10m, 2h, 1d); default: only new events",
    )
    tail.add_argument("--limit", type=int, metavar="N", help="exit after N events")
    tail.add_argument(
        "--idle-exit",
        type=float,
        metavar="S",
        help="exit once no event arrived for S seconds (for scripts)",
    )
    common_options(tail, node=False)
    tail.set_defaults(func=_cmd_tail)


def _add_credentials(sub: Any) -> None:
    creds = sub.add_parser(
        "credentials",
        help="hand out the credentials of a NATS role of the embedded server",
        description="Print the credentials of ROLE for the NATS server a daemon runs under "
        "the data dir (embedded servers are never anonymous): a SUPERVISOR_NATS_URL for "
        "supervisor's own commands and the flags for a nats CLI. The reader may follow sup.> "
        "and read SUP_EVENTS, and publish nothing. Exit 2 when no daemon runs there.",
    )
    creds.add_argument("role", choices=["reader"], help="the role (only reader is handed out)")
    creds.add_argument("--json", action="store_true", help="print JSON")
    common_options(creds, node=False, nats=False)
    creds.set_defaults(func=_cmd_credentials)


ERROR_TYPES = sorted(get_args(ErrorType))


def _error_code(text: str) -> str:
    """A catalogue code (any case), or a usage error (exit 2) naming the known ones."""
    code = text.upper()
    if code not in CATALOGUE:
        raise argparse.ArgumentTypeError(
            f"unknown error code {text!r} (known: {', '.join(sorted(CATALOGUE))})"
        )
    return code


def _version() -> str:
    try:
        return importlib.metadata.version("container-supervisor")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _read_spec_bytes(arg: str) -> bytes:
    if arg == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(arg).read_bytes()
    except OSError as e:
        raise InvalidSpec("spec", f"cannot read {arg}: {e.strerror}") from e


def _print_result(result: Result, as_json: bool) -> None:
    print_result(msgspec.to_builtins(result), as_json)


async def _run_async(args: argparse.Namespace, cfg: Config) -> int:
    from supervisor.daemon.node import open_node

    try:
        spec: TaskSpec | None = decode_spec(_read_spec_bytes(args.spec))
    except InvalidSpec as e:
        spec, refusal = None, e
    async with open_node(cfg, nats_url=args.nats_url, role="run") as node:
        if spec is None:
            # A new id: the one the spec may name could be another task's.
            em = node.emitter.for_task(f"t-{new_id()[:16]}", new_id())
            invalid = catalogue_entry("INVALID_SPEC", str(refusal), field=refusal.field)
            rejected = record_refusal(em, invalid, str(refusal))
            _print_result(rejected, args.json)
            await node.events.flush(5.0)
            return EXIT_REJECTED
        task = asyncio.ensure_future(node.executor.run(spec))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            result = await task
        except asyncio.CancelledError:
            sys.stderr.write(
                "cancelled: the container was cleaned up and the task recorded as failed\n"
            )
            return EXIT_INFRA
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        _print_result(result, args.json)
        if not await node.events.flush(5.0):
            sys.stderr.write(
                f"warning: NATS unreachable; {node.events.backlog} event(s) wait in the outbox "
                f"under {node.data_dir} and will be published by the next supervisor run\n"
            )
        return exit_code_for(result)


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    return asyncio.run(_run_async(args, cfg))


class _StampedWriter:
    """A text stream that remembers when it was last written to (for --idle-exit)."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.last = asyncio.get_running_loop().time()

    def write(self, text: str) -> int:
        self.last = asyncio.get_running_loop().time()
        return int(self.out.write(text))

    def flush(self) -> None:
        self.out.flush()


async def _idle_watch(writer: _StampedWriter, idle_s: float, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        await asyncio.sleep(min(idle_s, 0.2))
        if loop.time() - writer.last >= idle_s:
            stop.set()


async def _tail_async(args: argparse.Namespace, cfg: Config) -> int:
    from supervisor.daemon.nats_target import nats_for
    from supervisor.eventlog.follow import parse_since, tail

    since = parse_since(args.since) if args.since else None
    async with nats_for(args.nats_url or cfg.nats_target, Path(cfg.data_dir).resolve()) as url:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        out = _StampedWriter(sys.stdout)
        watch = (
            asyncio.ensure_future(_idle_watch(out, args.idle_exit, stop))
            if args.idle_exit
            else None
        )
        try:
            await tail(
                url,
                errors=args.errors,
                type_=args.error_type,
                code=args.code,
                task=args.task,
                since=since,
                out=out,
                stop=stop,
                limit=args.limit,
            )  # type: ignore[arg-type]
        finally:
            if watch is not None:
                watch.cancel()
    return EXIT_OK


def _signals(first: asyncio.Event, second: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def _on_signal() -> None:
        if first.is_set():
            second.set()
        first.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal)


async def _serve_async(args: argparse.Namespace, cfg: Config) -> int:
    roles: frozenset[str] = args.roles
    with_projection = "projection" in roles and not args.no_projection
    interpreter = None
    if with_projection and roles != {"projection"}:
        # First: the projection's interpreter imports while this process does.
        from supervisor.daemon.projection_exec import start_service

        interpreter = await start_service()
    from supervisor.daemon.daemon import Daemon
    from supervisor.observability.logs import configure

    configure(cfg.node_id, args.log_level or cfg.log_level)
    stop, force = asyncio.Event(), asyncio.Event()
    _signals(stop, force)
    if roles == {"projection"}:
        from supervisor.daemon.api import http_token
        from supervisor.daemon.projection_host import ProjectionHost

        token = http_token(cfg.http, Path(cfg.data_dir).resolve())
        host = ProjectionHost(cfg, nats_url=args.nats_url, token=token)
        return await host.run(stop)
    parts, read_side = _read_side_parts(
        cfg,
        with_projection=with_projection,
        with_reconciler="reconciler" in roles and cfg.reconcile.enabled,
        interpreter=interpreter,
    )
    if "executor" in roles and cfg.callbacks.allowed:
        from supervisor.delivery.callbacks import CallbacksPart

        parts.append(CallbacksPart(cfg))
    daemon = Daemon(
        cfg, nats_url=args.nats_url, parts=parts, read_side=read_side, pull="executor" in roles
    )
    return await daemon.run(stop, force)


def _read_side_parts(
    cfg: Config, *, with_projection: bool, with_reconciler: bool, interpreter: Any = None
) -> tuple[list[Any], Any]:
    """The daemon's composition: the projection (a child process running
    `supervisor.compose.projection_service`, which serves the queries), the reconciler reading it, and with
    `--no-projection` the reconciler's own in-process projection. This is the one place
    that joins them."""
    parts: list[Any] = []
    read_side: Any = None
    if with_projection:
        from supervisor.daemon.projection_process import ProjectionProcess

        read_side = ProjectionProcess(cfg, interpreter=interpreter)
        parts.append(read_side)
    if with_reconciler:
        from supervisor.reconcile.part import ReconcilerPart

        if read_side is not None:  # the reconciler reads the projection process's state
            state = read_side.state
        else:  # --no-projection: a projection of its own, <data_dir>/reconcile.duckdb
            from projections.serve.reconcile_state import OwnProjection

            own = OwnProjection()
            parts.append(own)
            state = own.state
        # After the projection: it starts first (its start-up pass reads it), stops last.
        parts.append(ReconcilerPart(cfg, state=state))
    return parts, read_side


def _cmd_serve(args: argparse.Namespace) -> int:
    cfg = with_node_id(config_of(args), keep=True)
    if args.http:
        cfg = msgspec.structs.replace(cfg, http=msgspec.structs.replace(cfg.http, listen=args.http))
    rc = asyncio.run(_serve_async(args, cfg))
    # Stopped: the outbox flushed, `supervisor.stopped` out, every container, child and
    # connection closed.
    from supervisor.observability.logs import exit_at_once

    exit_at_once(rc)


async def _submit_async(args: argparse.Namespace, cfg: Config) -> int:
    from supervisor.daemon.datadir import node_id_for
    from supervisor.daemon.nats_target import connected_event_log
    from supervisor.eventlog.diskguard import DiskGuard
    from supervisor.eventlog.emitter import Emitter
    from supervisor.intake.submit import Intake, prepare
    from supervisor.intake.wait import own_keyring, wait_for_result

    try:
        spec = decode_spec(_read_spec_bytes(args.spec))
    except InvalidSpec as e:
        if not args.json:
            raise
        invalid = catalogue_entry("INVALID_SPEC", str(e), field=e.field)
        rejected = refusal_result(f"t-{new_id()[:16]}", invalid, str(e), utcnow())
        _print_result(rejected, True)  # nothing was submitted: no event
        return EXIT_REJECTED
    overrides = {"priority": args.priority, "correlation_id": args.correlation_id}
    spec = prepare(msgspec.structs.replace(spec, **{k: v for k, v in overrides.items() if v}))
    async with connected_event_log(cfg, args.nats_url, "submit") as events:
        waiter = None
        node_id = node_id_for(events.data_dir, cfg.node_id, keep=False)
        keyring = own_keyring(cfg.signing, node_id, events.signer)
        if args.wait:
            waiter = await wait_for_result(events.js, spec.task_id or "", keyring)
        disk = DiskGuard(
            events.data_dir,
            held=lambda: events.disk_full,
            min_free_bytes=int(cfg.thresholds.disk_min_free_mb * 1024 * 1024),
        )
        submission = await Intake(
            events.js,
            Emitter(events, node_id, events.instance_id),
            events,
            cfg,
            disk_full=disk.reason,
            keyring=keyring,
        ).submit(spec)
        if not submission.accepted:
            result = submission.result()
            assert result is not None
            if waiter is not None:
                await waiter.cancel()
            _print_result(result, args.json)
            return EXIT_REJECTED
        if waiter is None:
            if args.json:
                sys.stdout.write(
                    msgspec.json.encode(
                        {
                            "task_id": submission.task_id,
                            "status": "known" if submission.existing else "queued",
                            "correlation_id": submission.correlation_id,
                        }
                    ).decode()
                    + "\n"
                )
            else:
                sys.stdout.write(submission.task_id + "\n")
            return EXIT_OK
        result = await waiter.result(args.timeout)
        if result is None:
            sys.stderr.write(
                f"task {submission.task_id}: no result within {args.timeout}s (it is still queued or running)\n"
            )
            return EXIT_INFRA
        _print_result(result, args.json)
        return exit_code_for(result)


def _cmd_submit(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    return asyncio.run(_submit_async(args, cfg))


def _cmd_tail(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    return asyncio.run(_tail_async(args, cfg))


def _cmd_credentials(args: argparse.Namespace) -> int:
    from supervisor.eventlog.nats_auth import read_credentials, with_user
    from supervisor.eventlog.nats_server import url_file

    data_dir = Path(config_of(args).data_dir).resolve()
    creds = read_credentials(data_dir)
    url_path = url_file(data_dir)
    if creds is None or not url_path.exists():
        raise ConfigError(f"no daemon with an embedded NATS runs on {data_dir}")
    server = url_path.read_text().strip()
    url = with_user(server, args.role, creds.reader)
    if args.json:
        doc = {
            "role": args.role,
            "url": url,
            "server": server,
            "user": args.role,
            "password": creds.reader,
        }
        sys.stdout.write(msgspec.json.encode(doc).decode() + "\n")
        return EXIT_OK
    sys.stdout.write(
        f"# {args.role} of the NATS of {data_dir}: follows sup.> and reads SUP_EVENTS\n"
        f"SUPERVISOR_NATS_URL={url}\n"
        f"# nats CLI: nats --server {server} --user {args.role} --password {creds.reader} "
        "sub 'sup.>'\n"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """The whole CLI (`supervisor.__main__` tries `submit`'s quick path first)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not any(a in ("-h", "--help", "--version") for a in argv[:1]):
        wrong = unknown_command(parser, argv)
        if wrong is not None:
            parser.print_usage(sys.stderr)
            sys.stderr.write(f"supervisor: error: {wrong}\n")
            return EXIT_REJECTED
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, InvalidSpec, ValueError) as e:
        sys.stderr.write(f"supervisor: {e}\n")
        return EXIT_REJECTED
    except SupervisorError as e:
        sys.stderr.write(f"supervisor: {e}\n")
        return EXIT_INFRA
    except KeyboardInterrupt:
        return EXIT_INFRA
    except BrokenPipeError:
        with contextlib.suppress(Exception):
            sys.stdout.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
