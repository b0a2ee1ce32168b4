"""The warm pool against a real dockerd, nats-server and DuckDB file.

What a task sees in an adopted container is what a cold start gives it: every outcome of
the catalogue an attempt can reach gets the same classification, exit code and output
either way. A parked container removed out of band is never handed to a task; one that
dies is retired; the pool's containers are events, and a dead instance's show in
`leaked_resources`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from schemas import (
    ContainerCreated,
    Limits,
    PoolAdopted,
    PoolParked,
    PoolRetired,
    Result,
    RetryPolicy,
    SupervisorStarted,
    SupervisorStopped,
    TaskSpec,
)
from schemas.config import Config
from schemas.spec import PoolConfig, Sandbox, handoff, pool_shape
from supervisor.daemon.node import Node, open_node
from supervisor.execution.pool import WarmPool
from testing.daemon import FORKS_REFUSED
from testing.projection import project
from testing.stream import stream_events
from tests.conftest import SANDBOX_IMAGE

pytestmark = pytest.mark.usefixtures("docker_client")


RUNTIMES = pytest.mark.parametrize("pooled", ["runc", "runsc"], indirect=True)
"""The outcomes run the same under runc and under gVisor (`runsc`); the pool's own
bookkeeping, which no runtime touches, runs under runc."""


@pytest.fixture
async def pooled(
    tmp_dir: Path, nats_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Node, WarmPool]]:
    """A node and its pool, under the runtime the test names (`RUNTIMES`), else runc."""
    cfg = Config(
        data_dir=str(tmp_dir / "data"),
        node_id="n1",
        pool=PoolConfig(size=1, learn=False, refill_interval_s=0.05),
        sandbox=Sandbox(runtime=getattr(request, "param", "runc")),
    )
    async with open_node(cfg, nats_url=nats_url) as node:
        pool = WarmPool(
            node.runtime,
            node.emitter,
            cfg,
            node.metrics,
            data_dir=node.data_dir,
            watcher=node.watcher,
        )
        pool.start()
        try:
            yield node, pool
        finally:
            await pool.close()
            await node.events.flush(10)


def _spec(command: list[str] | str, **kw: Any) -> TaskSpec:
    limits = {k: kw.pop(k) for k in list(kw) if k in _LIMITS}
    cmd = ["sh", "-c", command] if isinstance(command, str) else command
    return TaskSpec(
        image=SANDBOX_IMAGE,
        command=cmd,
        limits=Limits(**limits),
        retry=RetryPolicy(max_attempts=1),
        **kw,
    )


_LIMITS = ("timeout_s", "memory_mb", "cpus", "pids", "output_bytes", "cpu_time_s")


async def _parked(pool: WarmPool, spec: TaskSpec, timeout: float = 30.0) -> None:
    shape = pool_shape(spec, pool.config.sandbox.runtime)
    assert shape is not None
    pool.keep(shape)
    async with asyncio.timeout(timeout):
        while not pool.parked().get(shape.key()):
            await asyncio.sleep(0.02)


def _hits(node: Node) -> float:
    return sum(
        s.value
        for m in node.metrics.pool_hits.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )


async def _run(node: Node, pool: WarmPool, spec: TaskSpec, *, warm: bool) -> Result:
    if warm:
        await _parked(pool, spec)
    hits = _hits(node)
    node.executor.attempts.pool = pool if warm else None
    try:
        result = await node.executor.run(spec)
        await node.executor.attempts.drain()
    finally:
        node.executor.attempts.pool = None
    assert await node.events.flush(10)
    assert _hits(node) == hits + (1 if warm else 0), "the warm run must adopt a parked container"
    return result


_SEES = (
    "env | grep -v -e ^HOSTNAME= -e ^SUPERVISOR_TASK_ID= | sort; id; cat /proc/1/comm; "
    "echo ppid=$PPID; grep CapEff /proc/self/status; pwd; stat -c '%A %u:%g %s %n' /workspace/*; "
    "touch /workspace/x 2>/dev/null || echo ws-ro; touch /x 2>/dev/null || echo root-ro; "
    "echo tmp >/tmp/t && cat /tmp/t; cat /sys/fs/cgroup/memory/memory.limit_in_bytes "
    "/sys/fs/cgroup/pids/pids.max; ls /sys/class/net; cat"
)

# (id, command, spec fields, (type, code) or None, exit code, compare the output)
CASES: list[tuple[str, Any, dict[str, Any], tuple[str, str] | None, int | None, bool]] = [
    (
        "what_it_sees",
        _SEES,
        {
            "env": {"A": "x y", "B": "it's\n$HOME `x`", "PATH": "/bin:/usr/bin"},
            "files": {"f.txt": "file\n", "d/g": "g"},
            "stdin": "in\n",
        },
        None,
        0,
        True,
    ),
    (
        "binary_io",
        "od -An -tx1 /workspace/b.bin; od -An -tx1",
        {"files_base64": {"b.bin": "AP8BgH8K"}, "stdin_base64": "3q2+7wAK"},
        None,
        0,
        True,
    ),
    (
        "executable",
        ["/workspace/bin/run", "arg"],
        {"files": {"bin/run": "#!/bin/sh\necho ran $0 $1\n"}, "executables": ["bin/run"]},
        None,
        0,
        True,
    ),
    ("nonzero_exit", "echo before; exit 3", {}, ("user_code", "NONZERO_EXIT"), 3, True),
    ("signaled", "kill -SEGV $$", {}, ("user_code", "SIGNALED"), 139, True),
    ("not_found", ["no-such-command"], {}, ("user_code", "NONZERO_EXIT"), 127, False),
    (
        "not_executable",
        ["/workspace/f"],
        {"files": {"f": "x"}},
        ("user_code", "NONZERO_EXIT"),
        126,
        False,
    ),
    (
        "oom",
        "x=a; while true; do x=$x$x; done",
        {"memory_mb": 16},
        ("resource", "OOM_KILLED"),
        137,
        False,
    ),
    ("timeout", "sleep 30", {"timeout_s": 1}, ("timeout", "EXECUTION_TIMEOUT"), 137, False),
    (
        "cpu_time",
        "while :; do :; done",
        {"cpu_time_s": 0.3, "timeout_s": 20},
        ("timeout", "CPU_TIME_EXCEEDED"),
        137,
        False,
    ),
    (
        "output_limit",
        "while true; do echo flood; done",
        {"output_bytes": 1000},
        ("resource", "OUTPUT_LIMIT"),
        137,
        False,
    ),
    (
        "pids_limit",
        FORKS_REFUSED,
        {"pids": 8},
        ("resource", "PIDS_LIMIT"),
        2,
        False,
    ),
]


@RUNTIMES
@pytest.mark.parametrize(
    ("command", "fields", "expected", "exit_code", "same_output"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_an_adopted_container_gives_a_task_what_a_cold_start_gives_it(
    pooled: tuple[Node, WarmPool],
    command: Any,
    fields: dict[str, Any],
    expected: tuple[str, str] | None,
    exit_code: int | None,
    same_output: bool,
) -> None:
    node, pool = pooled
    spec = _spec(command, **fields)
    cold = await _run(node, pool, spec, warm=False)
    warm = await _run(node, pool, spec, warm=True)

    for r in (cold, warm):
        got = (r.error.type, r.error.code) if r.error else None
        assert (got, r.exit_code) == (expected, exit_code), r
        assert r.peak_memory_bytes and r.cpu_time_s is not None, r  # read from its cgroup
    assert (warm.stdout_truncated, warm.stderr_truncated) == (
        cold.stdout_truncated,
        cold.stderr_truncated,
    )
    if same_output:
        assert (warm.stdout, warm.stderr) == (cold.stdout, cold.stderr)
        if "touch /workspace" in str(command):
            assert "ws-ro" in cold.stdout
            # Modes, owners and sizes, not times: a minute may turn between the two runs.
            assert " 5 /workspace/f.txt\n" in cold.stdout and "/workspace/d\n" in cold.stdout
        if command == ["/workspace/bin/run", "arg"]:
            assert cold.stdout == "ran /workspace/bin/run arg\n"
        if "od -An" in str(command):  # every byte in, every byte out
            assert cold.stdout == " 00 ff 01 80 7f 0a\n de ad be ef 00 0a\n"


async def test_a_warm_attempt_is_recorded_as_an_adoption(
    pooled: tuple[Node, WarmPool], nats_url: str
) -> None:
    node, pool = pooled
    spec = _spec("echo hi")
    result = await _run(node, pool, spec, warm=True)

    events = await stream_events(nats_url, f"sup.*.*.n1.{result.task_id}")
    adopted = [e for e in events if isinstance(e, PoolAdopted)]
    created = [e for e in events if isinstance(e, ContainerCreated)]
    assert len(adopted) == 1 and len(created) == 1
    assert created[0].adopted and created[0].container_id == adopted[0].container_id
    parked = [
        e
        for e in await stream_events(nats_url, "sup.pool.parked.n1._")
        if isinstance(e, PoolParked)
    ]
    assert adopted[0].container_id in {e.container_id for e in parked}
    assert (result.status, result.stdout) == ("succeeded", "hi\n")


@pytest.mark.parametrize("seen", [True, False], ids=["watcher_saw_it", "adoption_meets_it"])
async def test_a_parked_container_removed_out_of_band_is_never_handed_to_a_task(
    pooled: tuple[Node, WarmPool], nats_url: str, docker_client, seen: bool
) -> None:  # type: ignore[no-untyped-def]
    node, pool = pooled
    spec = _spec("echo ran")
    await _parked(pool, spec)
    (victim,) = [p for q in pool._parked.values() for p in q]
    if not seen:
        pool.watcher = None  # the engine's events arrive too late to warn the pool
    await asyncio.to_thread(docker_client.api.remove_container, victim.container_id, force=True)
    if seen:  # the pool follows Docker's events: it drops the container by itself
        async with asyncio.timeout(10):
            while pool.owns(victim.container_id):
                await asyncio.sleep(0.02)

    node.executor.attempts.pool = pool
    result = await node.executor.run(spec)
    await node.executor.attempts.drain()
    node.executor.attempts.pool = None
    pool.watcher = node.watcher
    assert await node.events.flush(10)

    assert (result.status, result.attempts, result.stdout) == ("succeeded", 1, "ran\n")
    events = await stream_events(nats_url, "sup.pool.retired.n1._")
    retired = [e for e in events if isinstance(e, PoolRetired)]
    assert [(e.container_id, e.reason) for e in retired] == [(victim.container_id, "vanished")]
    assert not victim.workspace.exists()
    task_events = await stream_events(nats_url, f"sup.*.*.n1.{result.task_id}")
    adopted = [e.container_id for e in task_events if isinstance(e, PoolAdopted)]
    assert victim.container_id not in adopted  # a fresh one may have been parked meanwhile


async def test_parked_containers_of_a_dead_instance_are_leaks(tmp_dir: Path) -> None:
    """Projection: a parked container is not a leak while its instance lives, nor once
    adopted or retired; it is one (with its workspace) once the instance stopped, and when
    its retirement failed."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    n = 0

    def ev(cls: type, instance: str, **kw: Any) -> Any:
        nonlocal n
        n += 1
        kw.setdefault("node_id", "n1")
        return cls(
            event_id=f"e{n}", occurred_at=t0 + timedelta(seconds=n), instance_id=instance, **kw
        )

    def parked(cid: str, instance: str) -> Any:
        return ev(
            PoolParked, instance, container_id=cid, workspace=f"/w/pool-{cid}", shape="s", image="i"
        )

    history = [
        ev(SupervisorStarted, "a", role="serve"),
        ev(SupervisorStarted, "b", role="serve"),
        parked("c-live", "b"),
        parked("c-dead", "a"),
        parked("c-adopted", "a"),
        ev(
            PoolAdopted,
            "a",
            container_id="c-adopted",
            workspace="/w/pool-c-adopted",
            shape="s",
            task_id="t1",
            attempt=1,
        ),
        parked("c-retired", "a"),
        ev(
            PoolRetired,
            "a",
            container_id="c-retired",
            workspace="/w/pool-c-retired",
            shape="s",
            reason="idle",
        ),
        parked("c-failed", "b"),
        ev(
            PoolRetired,
            "b",
            container_id="c-failed",
            workspace="/w/pool-c-failed",
            shape="s",
            reason="idle",
            removed=False,
            error="engine down",
        ),
        ev(SupervisorStopped, "a"),
    ]
    db = project(history, tmp_dir / "p.duckdb")
    with duckdb.connect(str(db), read_only=True) as con:
        states = dict(con.sql("SELECT container_id, state FROM parked_containers").fetchall())
        leaks = con.sql(
            "SELECT kind, resource, owner, last_cleanup_error FROM leaked_resources ORDER BY ALL"
        ).fetchall()
    assert states == {
        "c-live": "parked",
        "c-dead": "parked",
        "c-adopted": "adopted",
        "c-retired": "retired",
        "c-failed": "retire_failed",
    }
    assert leaks == [
        ("container", "c-dead", "stopped", None),
        ("container", "c-failed", "unknown", "engine down"),
        ("workspace", "/w/pool-c-dead", "stopped", None),
        ("workspace", "/w/pool-c-failed", "unknown", "engine down"),
    ]


def test_the_hand_off_quotes_every_byte() -> None:
    data = handoff("tok", {"A": "'; rm -rf / #\n$(x)"}, ["echo", "a b", "`c`"])
    lines = data.decode().split("\n")
    assert lines[0] == "tok" and lines[-2] == "tok" and lines[-1] == ""
    assert "export A=''\"'\"'; rm -rf / #\n$(x)'" in data.decode()
    assert lines[-3] == "exec echo 'a b' '`c`'"
    with pytest.raises(ValueError, match="token"):
        handoff("exec x", {}, ["x"])  # a token that is a line of the script


@pytest.mark.parametrize(
    "fields",
    [
        {"network": "bridge"},
        {"privileged": True},
        {"cap_add": ["NET_ADMIN"]},
        {"mounts": [{"source": "/tmp", "target": "/m"}]},
        {"env": {"NOT-A-NAME": "x"}},
        {"env": {"SHLVL": "3"}},
    ],
)
def test_a_spec_no_parked_container_can_serve_starts_cold(fields: dict[str, Any]) -> None:
    assert pool_shape(_spec("true")) is not None
    assert pool_shape(_spec("true", **fields)) is None


@RUNTIMES
@pytest.mark.parametrize(
    ("fault", "code"),
    [("kill", "KILLED_EXTERNALLY"), ("remove", "CONTAINER_VANISHED"), ("cancel", "CANCELLED")],
)
async def test_a_fault_from_outside_is_classified_alike_warm_or_cold(
    pooled: tuple[Node, WarmPool], docker_client, fault: str, code: str
) -> None:  # type: ignore[no-untyped-def]
    """The outcomes an attempt meets from outside: its container killed or removed by
    someone else, or its task cancelled, in a cold and in an adopted container."""
    node, pool = pooled
    spec = _spec("sleep 30", timeout_s=20)
    outcomes = []
    for warm in (False, True):
        if warm:
            await _parked(pool, spec)
        node.executor.attempts.pool = pool if warm else None
        run = asyncio.ensure_future(node.executor.run(spec))
        async with asyncio.timeout(30):
            while not node.executor.live:
                await asyncio.sleep(0.02)
        (cid,) = node.executor.live
        task_id = node.executor.live[cid].em.task_id
        await asyncio.sleep(0.3)
        if fault == "kill":
            await asyncio.to_thread(docker_client.api.kill, cid)
        elif fault == "remove":
            await asyncio.to_thread(docker_client.api.remove_container, cid, force=True)
        else:
            await node.executor.cancel(task_id)
        result = await run
        await node.executor.attempts.drain()
        node.executor.attempts.pool = None
        assert result.error is not None
        outcomes.append((result.error.type, result.error.code))
    assert outcomes[0] == outcomes[1] == ("infrastructure", code)
