"""The options the subcommands share (`--nats`, `--data-dir`, `--node-id`, `--config`),
written once for the CLI's own subcommands and the read side's."""

from __future__ import annotations

import argparse
import os

import msgspec

from schemas.config import Config, load_config


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
        p.add_argument("--node-id", metavar="ID", help="this node's id (default n1)")
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
    return msgspec.structs.replace(cfg, **overrides) if overrides else cfg
