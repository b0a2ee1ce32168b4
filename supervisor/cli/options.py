"""The options the subcommands share (`--nats`, `--data-dir`, `--node-id`, `--config`),
written once for the CLI's own subcommands and the read side's."""

from __future__ import annotations

import argparse


def common_options(p: argparse.ArgumentParser, *, node: bool = True, nats: bool = True) -> None:
    """The options shared by the subcommands; each takes only those it uses."""
    if nats:
        p.add_argument(
            "--nats",
            dest="nats_url",
            metavar="URL",
            help="NATS server URL (else $SUPERVISOR_NATS_URL, else a running daemon's, "
            "else an embedded nats-server under the data dir)",
        )
    p.add_argument(
        "--data-dir", metavar="DIR", help="data dir (else $SUPERVISOR_DATA_DIR, else ./.supervisor)"
    )
    if node:
        p.add_argument("--node-id", metavar="ID", help="this node's id (default n1)")
    p.add_argument(
        "--config", metavar="FILE", help="configuration file, TOML or JSON (docs/configuration.md)"
    )
