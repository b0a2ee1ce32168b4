"""A three-server JetStream cluster on this machine's loopback: `scripts/cluster up DIR`
and `scripts/cluster down DIR`, for trying a fleet and for the tests.

`up` writes one configuration a server from `deploy/nats/cluster.conf` (free loopback
ports, routes to the two others, its store under `DIR/server-N/`) with the `authorization`
block of the embedded server (`supervisor.eventlog.nats_auth`: the `node` and `reader`
users, their passwords made once in `DIR/nats-auth.json`), starts the three servers in
their own sessions (they outlive the command; their logs are `DIR/server-N.log`), waits
until JetStream answers through the cluster, and writes:

- `DIR/servers.pid`: one pid a line, in server order;
- `DIR/node.toml` and `DIR/reader.toml` (mode 0600): supervisor configuration files whose
  `[nats]` table names the three servers, that role's credentials and `replicas = 3`.

`down` stops the servers of `DIR/servers.pid` (terminate, then kill after 10 s) and
removes the file; the stores stay. Loopback only: a real deployment has a server on each
of three machines (docs/fleet.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from schemas.connection import NatsConfig
from schemas.errors import EmbeddedNatsError, EventLogError, HistoryUnprotected, NatsUnavailable
from supervisor.eventlog.nats_auth import ensure_credentials, server_config
from supervisor.eventlog.nats_client import close_quietly, connect_nats, provision_streams
from supervisor.eventlog.nats_server import REPO, nats_server_binary
from supervisor.eventlog.streams import (
    commands_stream_config,
    events_stream_config,
    tasks_stream_config,
)

SERVERS = 3
TEMPLATE = REPO / "deploy" / "nats" / "cluster.conf"
HOST = "127.0.0.1"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _alive(pid: int) -> bool:
    """Whether `pid` is a running nats-server (not a pid the system gave to another)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return b"nats-server" in cmdline and stat.rsplit(")", 1)[-1].split()[0] != "Z"


def pids(root: Path) -> list[int]:
    """The pids of `root/servers.pid`, in server order ([] when there is none)."""
    try:
        return [int(x) for x in (root / "servers.pid").read_text().split()]
    except FileNotFoundError:
        return []


def _toml(config: NatsConfig) -> str:
    servers = ", ".join(f'"{s}"' for s in config.servers)
    return (
        "# Written by `scripts/cluster up`: use with `supervisor ... --config` on this machine.\n"
        f'[nats]\nservers = [{servers}]\nuser = "{config.user}"\n'
        f'password = "{config.password}"\nreplicas = {config.replicas}\n'
    )


def up(root: Path, *, timeout: float = 60.0) -> list[str]:
    """Start the cluster in `root`; returns the servers' client URLs (no credentials).
    Raises EmbeddedNatsError when it is up already or does not become ready in time (the
    servers it started are stopped again)."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if any(_alive(p) for p in pids(root)):
        raise EmbeddedNatsError(f"a cluster is up in {root} already (scripts/cluster down)")
    creds = ensure_credentials(root)
    ports = _free_ports(2 * SERVERS)
    client, route = ports[:SERVERS], ports[SERVERS:]
    template = TEMPLATE.read_text()
    started: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(SERVERS):
            routes = "\n".join(
                f"    nats-route://{HOST}:{route[j]}" for j in range(SERVERS) if j != i
            )
            fields = {
                "name": f"supervisor-{i + 1}",
                "host": HOST,
                "client_port": str(client[i]),
                "cluster_port": str(route[i]),
                "store_dir": str(root / f"server-{i + 1}"),
                "routes": routes,
            }
            text = template
            for key, value in fields.items():
                text = text.replace("{{" + key + "}}", value)
            conf = root / f"server-{i + 1}.conf"
            _write_private(conf, server_config(text, creds))
            with (root / f"server-{i + 1}.log").open("ab") as log:
                started.append(
                    subprocess.Popen(
                        [nats_server_binary(), "-c", str(conf)],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                    )
                )
        (root / "servers.pid").write_text("".join(f"{p.pid}\n" for p in started))
        urls = [f"nats://{HOST}:{p}" for p in client]
        node = NatsConfig(servers=urls, user="node", password=creds.node, replicas=3)
        asyncio.run(_wait_ready(node, started, timeout))
        # The streams are the operator's to make (the node may not): made here, R3, by the
        # cluster's admin user, with SUP_EVENTS denying deletes and purges.
        admin = NatsConfig(servers=urls, user="admin", password=creds.admin, replicas=3)
        asyncio.run(_provision(admin.url() or "", started, timeout))
    except BaseException:
        for p in started:
            p.kill()
            p.wait()
        (root / "servers.pid").unlink(missing_ok=True)
        raise
    _write_private(root / "node.toml", _toml(node))
    reader = NatsConfig(servers=urls, user="reader", password=creds.reader, replicas=3)
    _write_private(root / "reader.toml", _toml(reader))
    return urls


async def _provision(url: str, procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Make the three R3 streams, trying again while the young cluster has no meta leader
    or no peers for a replicated stream yet (a stream asked for twice is made once)."""
    configs = [
        events_stream_config(3),
        tasks_stream_config(replicas=3),
        commands_stream_config(3),
    ]
    deadline = time.monotonic() + timeout
    while True:
        if any(p.poll() is not None for p in procs):
            raise EmbeddedNatsError("a nats-server of the cluster exited; see its log")
        try:
            await provision_streams(url, configs, update=False)
            return
        except HistoryUnprotected:
            raise
        except (NatsUnavailable, EventLogError) as e:
            if time.monotonic() > deadline:
                raise EmbeddedNatsError(
                    f"the cluster did not take its streams in {timeout}s: {e}"
                ) from e
            await asyncio.sleep(0.5)


async def _wait_ready(
    config: NatsConfig, procs: list[subprocess.Popen[bytes]], timeout: float
) -> None:
    """Until JetStream answers through every server (the cluster has a meta leader)."""
    deadline = time.monotonic() + timeout
    url = config.url()
    assert url is not None
    for server in url.split(","):
        while True:
            if any(p.poll() is not None for p in procs):
                raise EmbeddedNatsError("a nats-server of the cluster exited; see its log")
            nc = None
            try:
                nc = await connect_nats(server, reconnect=False, timeout=2.0)
                # Asked before the meta leader is elected, the request gets no answer at
                # all: a short timeout asks again instead of waiting out nats-py's 5 s.
                await nc.jetstream(timeout=0.5).account_info()
                break
            except Exception as e:  # not ready yet: no connection, or no meta leader
                if time.monotonic() > deadline:
                    raise EmbeddedNatsError(
                        f"the cluster was not ready in {timeout}s: {e!r}"
                    ) from e
                await asyncio.sleep(0.25)
            finally:
                await close_quietly(nc)


def down(root: Path, *, timeout: float = 10.0) -> int:
    """Stop the servers of `root/servers.pid`; returns how many were running."""
    running = [p for p in pids(root) if _alive(p)]
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in running:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    while any(_alive(p) for p in running):
        time.sleep(0.05)
    (root / "servers.pid").unlink(missing_ok=True)
    return len(running)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/cluster",
        description="Start or stop a three-server JetStream cluster on loopback, in DIR.",
    )
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("dir", type=Path, help="where configs, stores, logs and pids live")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            urls = up(args.dir)
            print(f"cluster up: {', '.join(urls)}")
            print(
                f"node config: {args.dir / 'node.toml'}; reader config: {args.dir / 'reader.toml'}"
            )
        else:
            print(f"cluster down: {down(args.dir)} server(s) stopped")
    except EmbeddedNatsError as e:
        print(f"scripts/cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
