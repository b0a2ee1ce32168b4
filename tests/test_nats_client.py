"""How a client proves itself to NATS from the `[nats]` table, against real nats-servers:
mutual TLS (certificates made for the test with `openssl`: `run` publishes through it,
`replay` reads through it, a client without the right files is refused, by name), an NKey
seed file, and a token."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nkeys
import pytest

from schemas import TaskSucceeded
from schemas.config import load_config
from schemas.connection import NatsConfig
from schemas.errors import ConfigError, NatsUnavailable
from supervisor.eventlog.nats_auth import Credentials, server_config
from supervisor.eventlog.nats_client import (
    close_quietly,
    connect_nats,
    default_stream_configs,
    provision_streams,
)
from supervisor.eventlog.nats_server import REPO_CONF, NatsServer
from testing.daemon import task
from testing.stream import stream_events

pytestmark = [pytest.mark.nats]


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _certificates(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "1", "-subj", "/CN=supervisor-test-ca")  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}")  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")  # fmt: skip


@pytest.fixture
def tls_server(tmp_dir: Path) -> Iterator[tuple[NatsServer, Path, Credentials]]:
    certs = tmp_dir / "certs"
    certs.mkdir()
    _certificates(certs)
    creds = Credentials(node="node-secret", reader="reader-secret", admin="admin-secret")
    base = REPO_CONF.read_text() + (
        f'\ntls {{\n  cert_file: "{certs}/server.pem"\n  key_file: "{certs}/server.key"\n'
        f'  ca_file: "{certs}/ca.pem"\n  verify: true\n}}\n'
    )
    conf = tmp_dir / "tls.conf"
    conf.write_text(server_config(base, creds))
    server = NatsServer(tmp_dir / "store", conf=conf)
    server.start()
    try:
        # The streams are the operator's to make (the node may not), here with its admin.
        files = _mutual(certs)
        admin = NatsConfig(
            servers=[f"tls://127.0.0.1:{server.port}"],
            user="admin",
            password=creds.admin,
            tls_ca=files["tls_ca"],
            tls_cert=files["tls_cert"],
            tls_key=files["tls_key"],
        )
        asyncio.run(provision_streams(admin.url() or "", default_stream_configs()))
        yield server, certs, creds
    finally:
        server.stop()


def _table(server: NatsServer, certs: Path, creds: Credentials, **files: str) -> NatsConfig:
    return NatsConfig(
        servers=[f"tls://127.0.0.1:{server.port}"],
        user="node",
        password=creds.node,
        tls_ca=files.get("tls_ca"),
        tls_cert=files.get("tls_cert"),
        tls_key=files.get("tls_key"),
    )


def _mutual(certs: Path) -> dict[str, str]:
    return {
        "tls_ca": str(certs / "ca.pem"),
        "tls_cert": str(certs / "client.pem"),
        "tls_key": str(certs / "client.key"),
    }


def _cli(
    tmp: Path, table: NatsConfig, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    config = tmp / "client.json"
    nats: dict[str, Any] = {k: v for k, v in msgspec.structs.asdict(table).items() if v is not None}
    config.write_text(json.dumps({"nats": nats}))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor",
            *args,
            "--config",
            str(config),
            "--data-dir",
            str(tmp / "data"),
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.mark.docker
def test_run_and_replay_go_through_mutual_tls(
    tmp_dir: Path, tls_server: tuple[NatsServer, Path, Credentials]
) -> None:
    server, certs, creds = tls_server
    table = _table(server, certs, creds, **_mutual(certs))
    done = _cli(
        tmp_dir,
        table,
        "run",
        "-",
        "--json",
        stdin=json.dumps(task("echo over tls", task_id="tls-1")),
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stdout"] == "over tls\n"
    url = table.url()
    assert url is not None and url.endswith(
        f"?tls_ca={certs}/ca.pem&tls_cert={certs}/client.pem&tls_key={certs}/client.key"
    )
    ends = [e for e in asyncio.run(stream_events(url)) if isinstance(e, TaskSucceeded)]
    assert [e.task_id for e in ends] == ["tls-1"]

    db = tmp_dir / "replayed.duckdb"
    replay = _cli(tmp_dir, table, "replay", "--db", str(db))
    assert replay.returncode == 0, replay.stderr
    sql = _cli(
        tmp_dir,
        table,
        "sql",
        "SELECT task_id, state FROM tasks",
        "--db",
        str(db),
        "--format",
        "json",
    )
    assert sql.returncode == 0, sql.stderr
    assert json.loads(sql.stdout) == [{"task_id": "tls-1", "state": "succeeded"}]


def test_a_client_without_its_certificate_or_the_ca_is_refused(
    tls_server: tuple[NatsServer, Path, Credentials],
) -> None:
    server, certs, creds = tls_server
    files = _mutual(certs)

    async def attempt(**given: str) -> None:
        url = _table(server, certs, creds, **given).url()
        assert url is not None
        nc = await connect_nats(url, reconnect=False, timeout=3.0)
        await close_quietly(nc)

    asyncio.run(attempt(**files))  # the right files: connected
    with pytest.raises(NatsUnavailable):
        asyncio.run(attempt(tls_ca=files["tls_ca"]))  # no client certificate
    with pytest.raises(NatsUnavailable):
        asyncio.run(attempt(tls_cert=files["tls_cert"], tls_key=files["tls_key"]))  # unknown CA
    with pytest.raises(ConfigError, match=r"nowhere\.pem"):
        asyncio.run(attempt(**{**files, "tls_ca": str(certs / "nowhere.pem")}))


def test_tls_files_in_the_table_are_checked_by_name(tmp_dir: Path) -> None:
    path = tmp_dir / "half.toml"
    path.write_text('[nats]\nservers = ["tls://127.0.0.1:4222"]\ntls_cert = "/etc/c.pem"\n')
    with pytest.raises(ConfigError, match=r"tls_cert and nats\.tls_key go together"):
        load_config(path)


def _server_with(tmp: Path, authorization: str) -> NatsServer:
    conf = tmp / "auth.conf"
    conf.write_text(REPO_CONF.read_text() + "\n" + authorization + "\n")
    server = NatsServer(tmp / "auth-store", conf=conf)
    server.start()
    return server


def _seed_file(path: Path) -> str:
    """A new user NKey: its seed written to `path` (0600); returns its public key."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path.write_bytes(seed)
    path.chmod(0o600)
    return str(nkeys.from_seed(bytearray(seed)).public_key.decode())


async def _connects(table: NatsConfig) -> None:
    url = table.url()
    assert url is not None
    nc = await connect_nats(url, reconnect=False, timeout=3.0)
    await close_quietly(nc)


@pytest.mark.docker
def test_an_nkey_seed_file_is_this_clients_identity(tmp_dir: Path) -> None:
    public = _seed_file(tmp_dir / "node.nk")
    _seed_file(tmp_dir / "stranger.nk")
    server = _server_with(tmp_dir, f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}')
    try:
        servers = [f"nats://127.0.0.1:{server.port}"]
        table = NatsConfig(servers=servers, nkey_seed=str(tmp_dir / "node.nk"))
        done = _cli(tmp_dir, table, "run", "-", "--json", stdin=json.dumps(task("echo nkey")))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["stdout"] == "nkey\n"
        with pytest.raises(NatsUnavailable):
            asyncio.run(
                _connects(NatsConfig(servers=servers, nkey_seed=str(tmp_dir / "stranger.nk")))
            )
        with pytest.raises(NatsUnavailable):
            asyncio.run(_connects(NatsConfig(servers=servers)))
        with pytest.raises(ConfigError, match=r"missing\.nk"):
            asyncio.run(
                _connects(NatsConfig(servers=servers, nkey_seed=str(tmp_dir / "missing.nk")))
            )
    finally:
        server.stop()


def test_a_token_is_sent_to_the_server(tmp_dir: Path) -> None:
    server = _server_with(tmp_dir, 'authorization { token: "t0ken" }')
    try:
        servers = [f"nats://127.0.0.1:{server.port}"]
        asyncio.run(_connects(NatsConfig(servers=servers, token="t0ken")))
        with pytest.raises(NatsUnavailable):
            asyncio.run(_connects(NatsConfig(servers=servers, token="wrong")))
    finally:
        server.stop()
