"""What the subcommands share beyond their options (`supervisor.cli.args`): the
configuration they make of them, and the error for a command that does not exist."""

from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path

import msgspec

from schemas.config import Config, load_config
from supervisor.cli.args import SubcommandParser, common_options
from supervisor.daemon.datadir import node_id_for, stored_node_id

__all__ = ["SubcommandParser", "common_options", "config_of", "unknown_command", "with_node_id"]


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
