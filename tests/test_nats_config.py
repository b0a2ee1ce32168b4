"""The `[nats]` table: what it accepts, the one URL list every client connects with, and
the clear refusal of what it cannot mean. Also: the embedded server starts from the
repository's `nats.conf`."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.config import Config, load_config
from schemas.connection import NatsConfig, server_list
from schemas.errors import ConfigError
from supervisor.eventlog.nats_server import REPO_CONF, config_path

SERVERS = ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223", "tls://10.0.0.3:4222"]


def test_the_servers_and_credentials_make_one_url_list() -> None:
    with_user = NatsConfig(servers=SERVERS, user="node", password="s3cret", replicas=3)
    assert with_user.url() == (
        "nats://node:s3cret@127.0.0.1:4222,nats://node:s3cret@127.0.0.1:4223,"
        "tls://node:s3cret@10.0.0.3:4222"
    )
    assert NatsConfig(servers=SERVERS[:1], token="tok").url() == "nats://tok@127.0.0.1:4222"
    assert NatsConfig(servers=SERVERS[:1]).url() == "nats://127.0.0.1:4222"
    assert NatsConfig().url() is None
    assert server_list(" nats://a:1, nats://b:2 ,") == ["nats://a:1", "nats://b:2"]


def test_nats_url_comes_before_the_servers_of_the_table() -> None:
    table = NatsConfig(servers=SERVERS[:1], user="u", password="p")
    assert Config(nats=table).nats_target == "nats://u:p@127.0.0.1:4222"
    assert Config(nats_url="nats://x:1", nats=table).nats_target == "nats://x:1"
    assert Config().nats_target is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('servers = ["127.0.0.1:4222"]', "is not nats://host:port"),
        ('servers = ["nats://u:p@127.0.0.1:4222"]', "without credentials"),
        ('servers = ["http://127.0.0.1:4222"]', "is not nats://host:port"),
        ('user = "a@b"\npassword = "x"', "nats.user must be"),
        ('password = "x"', "nats.password needs nats.user"),
        ('user = "a"\ntoken = "t"', "exclude each other"),
        ("replicas = 0", ">= 1"),
        ("replicas = 7", "<= 5"),
        ('creds = "x.creds"', "unknown field `creds`"),
    ],
)
def test_a_table_it_cannot_mean_is_refused_by_name(tmp_dir: Path, table: str, message: str) -> None:
    path = tmp_dir / "bad.toml"
    path.write_text(f"[nats]\n{table}\n")
    with pytest.raises(ConfigError, match=r"bad\.toml") as e:
        load_config(path)
    assert message in str(e.value)


def test_the_embedded_server_starts_from_the_repositorys_nats_conf(tmp_dir: Path) -> None:
    assert Path(__file__).resolve().parent.parent / "nats.conf" == REPO_CONF
    assert config_path(tmp_dir) == REPO_CONF
    assert "sync_interval: always" in REPO_CONF.read_text()
