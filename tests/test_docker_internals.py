"""`supervisor.docker.internals` both ways, against a real dockerd: with the pinned
docker-py the executor shares one connection pool (tests/test_executor.py holds what that
saves); with any other version, or another transport, the client is left as docker-py
made it, and a task runs the same, stdin included."""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from schemas import Limits, RetryPolicy, TaskSpec
from schemas.config import Config
from supervisor.daemon.node import Node, open_node
from supervisor.docker import internals
from supervisor.docker.runtime import DockerRuntime

pytestmark = pytest.mark.usefixtures("docker_client")


def test_the_pinned_docker_py_is_the_installed_one() -> None:
    assert importlib.metadata.version("docker") == internals.DOCKER_PY_VERSION
    runtime = DockerRuntime()
    try:
        assert runtime.shared_pool is True
        assert type(runtime.api._custom_adapter).__name__ == "_SharedPoolAdapter"
    finally:
        runtime.close()


def test_another_transport_is_left_as_docker_py_made_it() -> None:
    runtime = DockerRuntime("tcp://127.0.0.1:9")  # made offline: nothing connects
    try:
        assert runtime.shared_pool is False
        assert internals.shared_pool_supported(runtime.api) is False
    finally:
        runtime.close()


@pytest.fixture
async def public_node(
    tmp_dir: Path, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Node]:
    monkeypatch.setattr(internals, "DOCKER_PY_VERSION", "0.0.0")
    cfg = Config(data_dir=str(tmp_dir / "data"), node_id="n1")
    async with open_node(cfg, nats_url=nats_url) as node:
        yield node


async def test_another_docker_py_version_runs_tasks_on_the_public_api(public_node: Node) -> None:
    assert public_node.runtime.shared_pool is False
    assert public_node.runtime.api.trust_env is True  # untouched
    spec = TaskSpec(
        image="supervisor-sandbox:busybox",
        command=["sh", "-c", "wc -c; echo err >&2; exit 3"],
        stdin="hello stdin",
        limits=Limits(timeout_s=20),
        retry=RetryPolicy(max_attempts=1),
    )
    result = await public_node.executor.run(spec)
    await public_node.executor.attempts.drain()
    assert await public_node.events.flush(10)

    assert (result.status, result.exit_code) == ("failed", 3)
    assert (result.stdout.strip(), result.stderr) == ("11", "err\n")
    assert result.error is not None and result.error.code == "NONZERO_EXIT"
    assert list((public_node.data_dir / "workspaces").glob("*")) == []
