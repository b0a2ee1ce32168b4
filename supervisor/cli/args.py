"""The CLI's argument definitions that the quick path shares with the full CLI: the
options every subcommand takes (`common_options`), a subcommand that takes a spec, and
`submit`. Imports nothing but the standard library, so that `supervisor submit` through a
running daemon starts fast (`supervisor.cli.http_submit`)."""

from __future__ import annotations

import argparse
import difflib
from typing import Any


def common_options(p: argparse.ArgumentParser, *, node: bool = True, nats: bool = True) -> None:
    """The options shared by the subcommands; each takes only those it uses."""
    if nats:
        p.add_argument(
            "--nats",
            dest="nats_url",
            metavar="URL",
            help="NATS server URL, or a comma-separated list (else the configuration's, else "
            "$SUPERVISOR_NATS_URL, else a running daemon's, else an embedded nats-server "
            "under the data dir)",
        )
    p.add_argument(
        "--data-dir", metavar="DIR", help="data dir (else $SUPERVISOR_DATA_DIR, else ./.supervisor)"
    )
    if node:
        p.add_argument(
            "--node-id",
            metavar="ID",
            help="this node's id (else the configuration's, else the one kept in the data dir)",
        )
    p.add_argument(
        "--config", metavar="FILE", help="configuration file, TOML or JSON (docs/configuration.md)"
    )


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: an unknown option is its own error, with its own usage and
    the nearest option it knows (not the top-level usage, with the option's value taken
    for a positional argument)."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extra = super().parse_known_args(args, namespace)
        unknown = [a for a in extra if a.startswith("-")]
        if unknown:
            known = [o for a in self._actions for o in a.option_strings]
            near = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            self.error(f"unrecognized option {unknown[0]}{hint}")
        return parsed, extra


def spec_parser(sub: Any, name: str, help_: str, description: str) -> argparse.ArgumentParser:
    """A subcommand that takes a task spec (a file, or - for stdin) and `--json`."""
    p = sub.add_parser(name, help=help_, description=description)
    p.add_argument("spec", metavar="SPEC|-", help="task spec JSON file, or - for stdin")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    return p


def add_submit_parser(sub: Any) -> argparse.ArgumentParser:
    """`submit`: its one definition, for the full CLI and the quick path
    (`supervisor.cli.http_submit`)."""
    submit = spec_parser(
        sub,
        "submit",
        "enqueue a task to a running daemon",
        "Validate and enqueue a task (JSON spec file, or - for stdin). Prints the task id, "
        "or with --wait the result. A full queue is refused at once (resource/QUEUE_FULL, "
        "exit 2). Goes through the data dir's running daemon (its HTTP API, found in "
        "<data-dir>/http.url) when one answers, else straight to NATS; --nats, --config or "
        "--node-id always go to NATS.",
    )
    submit.add_argument("--wait", action="store_true", help="wait for the result and print it")
    submit.add_argument(
        "--priority", choices=["high", "normal", "low"], help="override the spec's priority"
    )
    submit.add_argument(
        "--correlation-id",
        metavar="ID",
        help="correlation id repeated by every event of the task (default: the spec's, else new)",
    )
    submit.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="with --wait: give up waiting after S seconds (exit 3)",
    )
    common_options(submit)
    return submit
