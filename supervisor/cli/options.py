"""The options the subcommands share (`--nats`, `--data-dir`, `--node-id`, `--config`),
written once for the CLI's own subcommands and the read side's."""

from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path
from typing import Any

import msgspec

from schemas.config import Config, load_config
from supervisor.daemon.datadir import node_id_for, stored_node_id


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


def config_of(args: argparse.Namespace) -> Config:
    """`--config FILE` (or the defaults) with `--data-dir` (else `$SUPERVISOR_DATA_DIR`)
    and `--node-id` applied. Raises ConfigError."""
    cfg = load_config(getattr(args, "config", None))
    overrides: dict[str, str] = {}
    data_dir = getattr(args, "data_dir", None) or os.environ.get("SUPERVISOR_DATA_DIR")
    if data_dir:
        overrides["data_dir"] = data_dir
    if getattr(args, "node_id", None):
        overrides["node_id"] = args.node_id
    cfg = msgspec.structs.replace(cfg, **overrides) if overrides else cfg
    if not cfg.node_id:
        # The data dir's own id, when a daemon or a run made one; the processes that own
        # the data dir make and keep one (`with_node_id`).
        stored = stored_node_id(Path(cfg.data_dir).resolve())
        if stored:
            cfg = msgspec.structs.replace(cfg, node_id=stored)
    return cfg


def with_node_id(cfg: Config, *, keep: bool) -> Config:
    """`cfg` with its node id settled (`supervisor.daemon.datadir.node_id_for`)."""
    node_id = node_id_for(Path(cfg.data_dir).resolve(), cfg.node_id, keep=keep)
    return cfg if node_id == cfg.node_id else msgspec.structs.replace(cfg, node_id=node_id)


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


def unknown_command(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The error for a first word that is no command, with the nearest one; None if it is
    one (or an option)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    word = next((a for a in argv if not a.startswith("-")), None)
    if word is None or word in sub.choices:
        return None
    near = difflib.get_close_matches(word, list(sub.choices), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown command {word!r}{hint} (supervisor --help lists them)"
