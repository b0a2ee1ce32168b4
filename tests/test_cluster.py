"""A fleet on a real three-server JetStream cluster on loopback, started as users start it
(`scripts/cluster up DIR`): the streams are replicated three times, two nodes share the
work, a server killed mid-run (the leader of `SUP_EVENTS`) loses and duplicates no event,
and the reader credential reads the history but writes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import nats
import nats.errors
import nats.js.errors
import pytest

from schemas import CleanupCommand, ReconcileOutcome
from schemas.connection import NatsConfig, connect_options, server_list
from schemas.streams import COMMANDS_STREAM, EVENTS_STREAM, TASKS_STREAM, EventSigner, new_seed
from supervisor.eventlog.cluster import pids
from supervisor.eventlog.emitter import utcnow
from supervisor.reconcile.command_executor import JetStreamCommands
from testing.daemon import DaemonProc, task, wait_until
from testing.stream import stream_events

pytestmark = [pytest.mark.docker, pytest.mark.nats]

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"task.succeeded", "task.failed", "task.rejected"}


def _tag(e: object) -> str:
    return str(type(e).__struct_config__.tag)  # type: ignore[attr-defined]


def _cluster(action: str, where: Path) -> str:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "cluster"), action, str(where)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def cluster(tmp_dir: Path) -> Iterator[Path]:
    root = tmp_dir / "cluster"
    out = _cluster("up", root)
    assert out.startswith("cluster up: nats://127.0.0.1:")
    try:
        yield root
    finally:
        assert _cluster("down", root).startswith("cluster down:")


def _nats(root: Path, role: str) -> NatsConfig:
    with (root / f"{role}.toml").open("rb") as f:
        return NatsConfig(**tomllib.load(f)["nats"])


def _url(root: Path, role: str) -> str:
    url = _nats(root, role).url()
    assert url is not None
    return url


FAST_LOSS: dict[str, Any] = {
    # A lost node shows within seconds: heartbeats every 0.5 s, silent for 2 s is dead,
    # and a task message not acked for 3 s goes to another node.
    "scheduling": {"concurrency": 3, "ack_wait_s": 3.0, "ack_progress_s": 1.0},
    "reconcile": {"interval_s": 1.0, "heartbeat_s": 0.5, "heartbeat_timeout_s": 2.0},
}


def _node(
    daemons: list[DaemonProc],
    root: Path,
    tmp: Path,
    node_id: str,
    extra: dict[str, Any] | None = None,
) -> DaemonProc:
    cfg: dict[str, Any] = {
        "nats": tomllib.loads((root / "node.toml").read_text())["nats"],
        "node_id": node_id,
        "scheduling": {"concurrency": 3},
        # These tests tell whose task a container runs by its labels, which a warm pool's
        # container does not carry (the pool has tests of its own, on one node).
        "pool": {"size": 0},
        **(extra or {}),
    }
    d = DaemonProc(tmp / node_id, None, config=cfg)
    daemons.append(d)
    return d.start(timeout=60)


def _submit(d: DaemonProc, n: int, script: str, prefix: str) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(n)]
    for tid in ids:
        status, body = d.request(
            "POST", "/v1/tasks", json.dumps(task(script, task_id=tid)).encode()
        )
        assert status in (200, 202), body
    return ids


def _ends(url: str, ids: list[str]) -> dict[str, list[str]]:
    events = asyncio.run(stream_events(url))
    ends: dict[str, list[str]] = {t: [] for t in ids}
    for e in events:
        if e.task_id in ends and _tag(e) in TERMINAL:
            ends[e.task_id].append(_tag(e))
    return ends


def _all_ended(url: str, ids: list[str]) -> bool:
    """Whether every task has ended; False while the stream answers no read (a leader is
    being elected)."""
    try:
        return all(_ends(url, ids).values())
    except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
        return False


async def _stream_info(url: str) -> dict[str, Any]:
    nc = await nats.connect(**connect_options(url), connect_timeout=5)
    try:
        js = nc.jetstream()
        out = {}
        for name in (EVENTS_STREAM, TASKS_STREAM, COMMANDS_STREAM):
            # A stream whose leader was on a killed server answers once the others have
            # elected a new one (several seconds); the elections are the cluster's business.
            deadline = time.monotonic() + 60
            while True:
                try:
                    info = await js.stream_info(name)
                    break
                except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
                    if time.monotonic() > deadline:
                        raise
            assert info.cluster is not None
            out[name] = (
                info.config.num_replicas,
                info.cluster.leader,
                len(info.cluster.replicas or []),
            )
        return out
    finally:
        await nc.close()


def test_the_streams_have_three_replicas_and_two_nodes_share_the_work(
    cluster: Path, tmp_dir: Path, daemons: list[DaemonProc]
) -> None:
    url = _url(cluster, "node")
    assert len(pids(cluster)) == 3
    # The streams are the operator's: `scripts/cluster up` made them, three copies each.
    for role in ("node", "reader"):
        assert os.stat(cluster / f"{role}.toml").st_mode & 0o777 == 0o600
    # Each node signs with its own key, and every node's key is pinned (the fleet's way).
    signers = {}
    for node_id in ("n1", "n2"):
        seed = new_seed()
        (tmp_dir / f"{node_id}.nk").write_bytes(seed)
        signers[node_id] = EventSigner(seed)
    pins = {node_id: [s.public_key] for node_id, s in signers.items()}

    def signing(node_id: str) -> dict[str, Any]:
        return {"signing": {"seed_file": str(tmp_dir / f"{node_id}.nk"), "keys": pins}}

    n1 = _node(daemons, cluster, tmp_dir, "n1", signing("n1"))
    _node(daemons, cluster, tmp_dir, "n2", signing("n2"))

    info = asyncio.run(_stream_info(url))
    assert {name: (r, peers) for name, (r, _, peers) in info.items()} == {
        EVENTS_STREAM: (3, 2),
        TASKS_STREAM: (3, 2),
        COMMANDS_STREAM: (3, 2),
    }
    ids = _submit(n1, 24, "sleep 0.5", "share")
    wait_until(lambda: all(_ends(url, ids).values()), timeout=180, what="every task to end")

    assert _ends(url, ids) == {t: ["task.succeeded"] for t in ids}
    started = Counter(
        e.node_id
        for e in asyncio.run(stream_events(url))
        if _tag(e) == "attempt.started" and e.task_id in ids
    )
    assert set(started) == {"n1", "n2"}, started
    assert sum(started.values()) == len(ids)
    # Both nodes' ends count in n1's projection, each under its node's pinned key.
    sql = (
        "SELECT (SELECT count(*) FROM tasks WHERE outcome = 'succeeded' AND task_id LIKE 'share-%'),"
        " (SELECT count(*) FROM terminal_conflicts),"
        " (SELECT list(node_id || '=' || public_key ORDER BY node_id) FROM node_keys WHERE pinned)"
    )

    def projected() -> list[Any]:
        status, body = n1.request("POST", "/v1/query", json.dumps({"sql": sql}).encode())
        assert status == 200, body
        return list(json.loads(body)["rows"][0])

    wait_until(lambda: projected()[0] == len(ids), 60, "n1's projection to apply every end")
    assert projected() == [len(ids), 0, [f"{n}={s.public_key}" for n, s in signers.items()]]


@pytest.mark.parametrize("which", ["leader", "follower"])
def test_a_killed_server_loses_and_duplicates_no_event(
    cluster: Path, tmp_dir: Path, daemons: list[DaemonProc], which: str
) -> None:
    url = _url(cluster, "node")
    n1 = _node(daemons, cluster, tmp_dir, "n1")
    _node(daemons, cluster, tmp_dir, "n2")
    ids = _submit(n1, 20, "sleep 0.4", "leader")
    wait_until(lambda: any(_ends(url, ids).values()), timeout=60, what="a first task to end")

    leader = asyncio.run(_stream_info(url))[EVENTS_STREAM][1]
    index = int(leader.rsplit("-", 1)[1]) - 1
    if which == "follower":
        index = (index + 1) % 3
    os.kill(pids(cluster)[index], signal.SIGKILL)
    survivors = ",".join(u for i, u in enumerate(server_list(url)) if i != index)

    wait_until(lambda: _all_ended(survivors, ids), timeout=180, what="every task to end")
    assert _ends(survivors, ids) == {t: ["task.succeeded"] for t in ids}
    events = asyncio.run(stream_events(survivors))
    ids_seen = Counter(e.event_id for e in events)
    assert [i for i, n in ids_seen.items() if n > 1] == []
    new_leader = asyncio.run(_stream_info(survivors))[EVENTS_STREAM][1]
    assert (new_leader != leader) == (which == "leader")
    for d in daemons:
        assert d.proc is not None and d.proc.poll() is None, d.log()


async def _reader_attempts(url: str) -> tuple[int, list[str]]:
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    nc = await nats.connect(**connect_options(url), connect_timeout=5, error_cb=on_error)
    try:
        # A refused request gets no answer: 1 s is long enough to learn nothing came back.
        js = nc.jetstream(timeout=1.0)
        info = await js.stream_info(EVENTS_STREAM)
        for subject in ("sup.task.succeeded.n1.forged", "suptask.normal", "supcmd.n1.kill"):
            await nc.publish(subject, b"{}")
        for call in (js.purge_stream, js.delete_stream):
            with pytest.raises(nats.errors.Error):
                await call(EVENTS_STREAM)
        await nc.flush()
        await asyncio.sleep(0.3)
        return info.state.messages, errors
    finally:
        await nc.close()


def test_the_reader_reads_the_history_but_writes_nothing(
    cluster: Path, tmp_dir: Path, daemons: list[DaemonProc]
) -> None:
    n1 = _node(daemons, cluster, tmp_dir, "n1")
    ids = _submit(n1, 2, "true", "reader")
    reader = _url(cluster, "reader")
    wait_until(lambda: all(_ends(reader, ids).values()), timeout=60, what="the tasks to end")

    before, errors = asyncio.run(_reader_attempts(reader))
    assert before > 0
    refused = (
        "sup.task.succeeded.n1.forged",
        "suptask.normal",
        "supcmd.n1.kill",
        "$js.api.stream.purge.sup_events",
        "$js.api.stream.delete.sup_events",
    )
    assert sorted(errors) == sorted(
        f'nats: permissions violation for publish to "{s}"' for s in refused
    )
    after = asyncio.run(_stream_info(_url(cluster, "node")))
    assert after[EVENTS_STREAM][0] == 3
    assert len(asyncio.run(stream_events(reader))) >= before


def _containers(docker_client: Any, node_id: str) -> list[str]:
    """The tasks of `node_id`'s managed containers. Sparse: the list call's own labels, no
    inspection of each container (one may be removed in between)."""
    found = docker_client.containers.list(
        all=True,
        sparse=True,
        filters={"label": ["supervisor.managed=true", f"supervisor.node={node_id}"]},
    )
    return sorted(c.attrs["Labels"]["supervisor.task"] for c in found)


def _remove_all_of(docker_client: Any, node_id: str) -> None:
    """Whatever a node killed for a test left, should the test stop before it came back."""
    for c in docker_client.containers.list(
        all=True,
        sparse=True,
        filters={"label": ["supervisor.managed=true", f"supervisor.node={node_id}"]},
    ):
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.api.remove_container(c.id, force=True)


def test_a_killed_node_s_tasks_end_once_elsewhere_and_its_containers_wait_for_it(
    cluster: Path, tmp_dir: Path, daemons: list[DaemonProc], docker_client: Any
) -> None:
    url = _url(cluster, "node")
    try:
        n1 = _node(daemons, cluster, tmp_dir, "n1", FAST_LOSS)
        n2 = _node(daemons, cluster, tmp_dir, "n2", FAST_LOSS)
        ids = _submit(n1, 6, "sleep 5", "lost")
        wait_until(lambda: len(_containers(docker_client, "n1")) == 3, 60, "n1 to run three tasks")
        on_n1 = _containers(docker_client, "n1")

        def published() -> bool:  # n1's outbox has sent what its containers' leaks rest on
            started = asyncio.run(stream_events(url, "sup.container.started.n1.*"))
            return {e.task_id for e in started} >= set(on_n1)

        wait_until(published, 30, "n1's container events in the stream")
        n1.kill()

        wait_until(lambda: _all_ended(url, ids), timeout=120, what="every task to end")
        assert _ends(url, ids) == {t: ["task.succeeded"] for t in ids}
        events = asyncio.run(stream_events(url))
        lost = sorted(
            e.task_id
            for e in events
            if _tag(e) == "attempt.finished" and e.error_code == "SUPERVISOR_LOST"  # type: ignore[attr-defined]
        )
        assert lost == on_n1
        reran = {
            e.task_id: e.node_id
            for e in events
            if _tag(e) == "attempt.started" and e.task_id in on_n1 and e.attempt == 2
        }
        assert reran == dict.fromkeys(on_n1, "n2")
        # n2 never touched n1's containers: they wait, exited, for their own node.
        assert _containers(docker_client, "n1") == on_n1
        query = json.dumps(
            {
                "sql": "SELECT task_id, owner FROM leaked_resources WHERE node_id = 'n1' AND kind = 'container' ORDER BY 1"
            }
        ).encode()

        def leaked() -> list[tuple[str, str]]:
            status, body = n2.request("POST", "/v1/query", query)
            assert status == 200, body
            return [tuple(r) for r in json.loads(body)["rows"]]

        # The projection shows them once it has applied every one's last event.
        expected = [(t, "dead") for t in on_n1]
        # (On a loaded machine the surviving node's projection trails: give it time.)
        seen: list[list[tuple[str, str]]] = [[]]

        def shown() -> bool:
            seen[0] = leaked()
            return seen[0] == expected

        try:
            wait_until(shown, 90, "the dead node's containers as leaks")
        except AssertionError as e:
            raise AssertionError(f"{e}: leaked_resources shows {seen[0]}") from e
        assert leaked() == expected

        n1.start(timeout=60)
        wait_until(lambda: _containers(docker_client, "n1") == [], 30, "n1 to remove its orphans")
        assert _ends(url, ids) == {t: ["task.succeeded"] for t in ids}
    finally:
        _remove_all_of(docker_client, "n1")


def test_a_node_never_removes_another_node_s_container_even_when_a_command_names_it(
    cluster: Path, tmp_dir: Path, daemons: list[DaemonProc], docker_client: Any
) -> None:
    url = _url(cluster, "node")
    n1 = _node(daemons, cluster, tmp_dir, "n1")
    _node(daemons, cluster, tmp_dir, "n2")
    _submit(n1, 1, "sleep 4; echo kept", "other")
    # Whichever node runs it, the command goes to the other one.
    wait_until(
        lambda: any(_containers(docker_client, n) for n in ("n1", "n2")), 60, "the task to run"
    )
    owner = "n1" if _containers(docker_client, "n1") else "n2"
    other = "n2" if owner == "n1" else "n1"
    (container,) = docker_client.containers.list(
        all=True,
        sparse=True,
        filters={"label": [f"supervisor.node={owner}", "supervisor.task=other-0"]},
    )
    command = CleanupCommand(
        command_id="cross-node-1",
        node_id=other,
        action="remove_container",
        resource_kind="container",
        resource=container.id,
        rule="orphan_container",
        decision_id="cross-node-decision",
        issued_at=utcnow(),
        task_id="other-0",
        attempt=1,
    )

    async def publish() -> None:
        nc = await nats.connect(**connect_options(url))
        try:
            assert await JetStreamCommands(nc.jetstream()).publish(command)
        finally:
            await nc.close()

    asyncio.run(publish())
    wait_until(lambda: _all_ended(url, ["other-0"]), 60, "the task to end")
    assert _ends(url, ["other-0"]) == {"other-0": ["task.succeeded"]}
    outcomes = [
        e
        for e in asyncio.run(stream_events(url, "sup.reconcile.outcome.>"))
        if isinstance(e, ReconcileOutcome) and e.command_id == "cross-node-1"
    ]
    assert [(o.node_id, o.outcome, o.final) for o in outcomes] == [(other, "refused", True)]
    assert f"not a managed container of node {other}" in outcomes[0].detail


def _retire(root: Path, tmp: Path, node_id: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor",
            "node",
            "retire",
            node_id,
            "--config",
            str(root / "node.toml"),
            "--data-dir",
            str(tmp / "operator"),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_retired_node_s_attempts_are_closed_and_its_resources_abandoned(
    cluster: Path, tmp_dir: Path, daemons: list[DaemonProc], docker_client: Any
) -> None:
    url = _url(cluster, "node")
    # Heartbeats time out only after a minute: the retirement alone lets n2 go on.
    slow_death = {
        "scheduling": {"concurrency": 3, "ack_wait_s": 3.0, "ack_progress_s": 1.0},
        "reconcile": {"interval_s": 1.0, "heartbeat_s": 0.5, "heartbeat_timeout_s": 60.0},
    }
    n1 = _node(daemons, cluster, tmp_dir, "n1", slow_death)
    n2 = _node(daemons, cluster, tmp_dir, "n2", slow_death)
    try:
        ids = _submit(n1, 6, "sleep 4", "retire")
        wait_until(lambda: len(_containers(docker_client, "n1")) == 3, 60, "n1 to run three tasks")
        on_n1 = _containers(docker_client, "n1")

        alive = _retire(cluster, tmp_dir, "n2")
        assert alive.returncode == 2
        assert "node n2 sent a heartbeat" in alive.stderr and "it is alive" in alive.stderr

        n1.kill()
        done = _retire(cluster, tmp_dir, "n1", "--force", "--reason", "its disk died", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "node_id": "n1",
            "closed_attempts": [f"{t}/1" for t in on_n1],
        }

        wait_until(lambda: _all_ended(url, ids), timeout=120, what="every task to end")
        assert _ends(url, ids) == {t: ["task.succeeded"] for t in ids}
        events = asyncio.run(stream_events(url))
        (retired,) = [e for e in events if _tag(e) == "node.retired"]
        assert (retired.node_id, retired.reason, retired.open_attempts) == (  # type: ignore[attr-defined]
            "n1",
            "its disk died",
            3,
        )
        closings = sorted(
            (e.task_id, e.node_id)
            for e in events
            if _tag(e) == "attempt.finished" and e.error_code == "SUPERVISOR_LOST"  # type: ignore[attr-defined]
        )
        assert closings == [(t, "n1") for t in on_n1]

        sql = (
            "SELECT task_id, owner FROM leaked_resources "
            "WHERE node_id = 'n1' AND kind = 'container' ORDER BY 1"
        )

        def abandoned() -> list[tuple[str, str]]:
            status, body = n2.request("POST", "/v1/query", json.dumps({"sql": sql}).encode())
            assert status == 200, body
            return [tuple(r) for r in json.loads(body)["rows"]]

        wait_until(lambda: abandoned() == [(t, "retired") for t in on_n1], 30, "the abandoned list")
        assert _containers(docker_client, "n1") == on_n1
    finally:
        _remove_all_of(docker_client, "n1")


def test_roles_a_projection_host_reads_the_fleet_with_the_reader_credential_and_no_docker(
    cluster: Path, tmp_dir: Path, daemons: list[DaemonProc]
) -> None:
    url = _url(cluster, "node")
    node_cfg: dict[str, Any] = {
        "nats": tomllib.loads((cluster / "node.toml").read_text())["nats"],
        "node_id": "n1",
    }
    worker = DaemonProc(
        tmp_dir / "n1", None, config=node_cfg, args=("--roles", "executor,reconciler")
    )
    daemons.append(worker)
    worker.start(timeout=60)
    reader_cfg: dict[str, Any] = {
        "nats": tomllib.loads((cluster / "reader.toml").read_text())["nats"],
        "node_id": "analytics",
        # It must never need an engine: this one does not exist.
        "docker_url": f"unix://{tmp_dir}/no-docker.sock",
    }
    reader = DaemonProc(
        tmp_dir / "analytics", None, config=reader_cfg, args=("--roles", "projection")
    )
    daemons.append(reader)
    reader.start(timeout=60)

    ids = _submit(worker, 3, "echo role", "roles")
    wait_until(lambda: _all_ended(url, ids), 60, "the tasks to end")
    sql = "SELECT task_id, state FROM tasks WHERE task_id LIKE 'roles-%' ORDER BY 1"

    def rows() -> list[tuple[str, str]]:
        status, body = reader.request("POST", "/v1/query", json.dumps({"sql": sql}).encode())
        assert status == 200, body
        return [tuple(r) for r in json.loads(body)["rows"]]

    wait_until(lambda: rows() == [(t, "succeeded") for t in ids], 30, "the projection to see them")
    status, body = reader.get("/v1/tasks/roles-0")
    assert status == 200 and json.loads(body)["state"] == "succeeded", body

    status, body = reader.request("POST", "/v1/tasks", json.dumps(task("true")).encode())
    assert status == 503 and json.loads(body)["error"]["code"] == "ROLE_UNAVAILABLE", body
    status, body = worker.request("POST", "/v1/query", json.dumps({"sql": "SELECT 1"}).encode())
    assert status == 503 and json.loads(body)["error"]["code"] == "QUERY_UNAVAILABLE", body
    status, body = reader.get("/readyz")
    assert status == 200, body
    assert "docker" not in json.loads(body)["checks"]


def test_roles_that_do_not_exist_are_a_usage_error(tmp_dir: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor",
            "serve",
            "--roles",
            "executor,scheduler",
            "--data-dir",
            str(tmp_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "give one or more of executor, projection, reconciler" in done.stderr
