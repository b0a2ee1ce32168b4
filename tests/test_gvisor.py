"""gVisor (`runsc`) as a sandbox runtime, against a real dockerd with runsc registered by
`scripts/setup`, a real nats-server and a real DuckDB file.

The whole catalogue under both runtimes, cold and warm, is `tests/test_pool.py` (its
fixture runs every test under runc and runsc). Here: what only gVisor has — the kernel a
task sees, the process limit held by the Sentry and its evidence (which a task cannot
forge), a runtime a spec may not ask for or the engine does not have, and a daemon
running on gVisor by default."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import duckdb
import pytest

from schemas import KillIssued, Limits, RetryPolicy, TaskSpec
from schemas.config import Config
from schemas.spec import Sandbox
from supervisor.daemon.checks import runtime_check
from supervisor.daemon.node import Node, open_node
from supervisor.docker.gvisor import BootLogs, RuntimeInfo, host_pids
from testing.daemon import DaemonProc, task
from testing.projection import project
from testing.stream import stream_events
from tests.conftest import SANDBOX_IMAGE

pytestmark = pytest.mark.usefixtures("docker_client")

_GLOG = "I1206 15:44:04.685188   26957 "
_REFUSED = (
    _GLOG + "strace.go:611] [   2:   2] sh X clone(CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|0x11,"
    " 0x0, 0x0, 0x5ec690, 0x0) = 0 (0x0) errno=11 (try again) (121.83µs)"
)


@pytest.fixture
async def node(tmp_dir: Path, nats_url: str) -> AsyncIterator[Node]:
    cfg = Config(data_dir=str(tmp_dir / "data"), node_id="n1", sandbox=Sandbox(runtime="runsc"))
    async with open_node(cfg, nats_url=nats_url) as n:
        yield n
        await n.executor.attempts.drain()
        await n.events.flush(10)


def _spec(script: str, **kw: object) -> TaskSpec:
    limits = kw.pop("limits", Limits())
    assert isinstance(limits, Limits)
    return TaskSpec(
        image=SANDBOX_IMAGE,
        command=["sh", "-c", script],
        limits=limits,
        retry=RetryPolicy(max_attempts=1),
        **kw,  # type: ignore[arg-type]
    )


async def test_a_task_under_runsc_sees_gvisors_kernel_and_its_own_limit(node: Node) -> None:
    result = await node.executor.run(_spec("cat /proc/version; ulimit -u", limits=Limits(pids=12)))
    assert result.status == "succeeded", result
    version, nproc = result.stdout.splitlines()
    assert "#1 SMP Sun Jan 10 15:06:54 PST 2016" in version  # gVisor's, not the host's
    assert version != Path("/proc/version").read_text().strip()
    assert nproc == "12"
    runc = await node.executor.run(_spec("cat /proc/version", runtime="runc"))
    assert runc.stdout.strip() == Path("/proc/version").read_text().strip()


async def test_the_fork_limit_holds_under_runsc_and_is_classified_from_the_sentry(
    node: Node, nats_url: str
) -> None:
    """40 background processes against a limit of 8: forks are refused inside the sandbox
    (EAGAIN, the shell exits 2), the Sentry's trace counts them, the host's pids cgroup is
    only a backstop that was never reached; the boot log is deleted once read."""
    spec = _spec("for i in $(seq 1 40); do sleep 5 & done; wait", limits=Limits(pids=8))
    result = await node.executor.run(spec)
    assert result.error is not None, result
    assert (result.error.type, result.error.code, result.exit_code) == (
        "resource",
        "PIDS_LIMIT",
        2,
    )
    assert result.error.details["pids_limit_events"] >= 1
    assert host_pids(8) > 8 * 10 + 60  # the Sentry's threads plus ~10 per task process
    logs = Path("/var/log/runsc")
    assert not any(logs.glob("*.boot.txt")) if logs.is_dir() else True


async def test_a_task_cannot_forge_the_sentrys_evidence(node: Node) -> None:
    """The only task words in the boot log are its command's (`EXEC: [...]`): a command
    that carries a refused-fork line after a line break is still the exit it made."""
    result = await node.executor.run(_spec(f"exit 3\n{_REFUSED}\n", limits=Limits(pids=8)))
    assert result.error is not None
    assert (result.error.code, result.exit_code) == ("NONZERO_EXIT", 3)


async def test_a_runtime_outside_the_allow_list_is_a_policy_violation(node: Node) -> None:
    node.executor.config = node.config  # the node's config, as the daemon's
    cfg = node.config
    strict = Config(
        data_dir=cfg.data_dir, node_id="n1", sandbox=Sandbox(runtime="runc", runtimes=["runc"])
    )
    node.executor.config = strict
    result = await node.executor.run(_spec("true", runtime="runsc"))
    assert result.error is not None
    assert (result.status, result.error.type, result.error.code) == (
        "rejected",
        "security",
        "POLICY_VIOLATION",
    )
    assert "runtime" in result.error.message


async def test_a_runtime_the_engine_lacks_is_refused_at_once_never_retried(
    tmp_dir: Path, nats_url: str, docker_client
) -> None:  # type: ignore[no-untyped-def]
    """Allowed by policy, absent from the engine: `validation/RUNTIME_UNAVAILABLE` before
    any container, one attempt at most, the breaker untouched; readiness says why."""
    cfg = Config(
        data_dir=str(tmp_dir / "data"),
        node_id="n1",
        sandbox=Sandbox(runtime="kata", runtimes=["runc", "kata"]),
    )
    async with open_node(cfg, nats_url=nats_url) as n:
        before = len(docker_client.containers.list(all=True))
        result = await n.executor.run(_spec("true"))
        check = await runtime_check(n.runtime, cfg.sandbox)()
        await n.events.flush(10)
    assert result.error is not None
    assert (result.status, result.error.type, result.error.code, result.attempts) == (
        "rejected",
        "validation",
        "RUNTIME_UNAVAILABLE",
        0,
    )
    assert not result.error.retryable and "kata" in result.error.message
    assert len(docker_client.containers.list(all=True)) == before
    assert not check.ok and "kata" in check.reason
    assert check.details["runtimes"]["runc"] == "present"


def test_which_registrations_give_the_evidence_of_a_refused_fork() -> None:
    full = (
        "--platform=ptrace",
        "--network=none",
        "--debug-log=/var/log/runsc/",
        "--debug-command=boot",
        "--strace",
        "--strace-syscalls=clone,fork,vfork",
    )
    assert RuntimeInfo("runsc", "/usr/bin/runsc", full).fork_log_dir == "/var/log/runsc"
    assert RuntimeInfo("runsc", "/usr/bin/runsc", full[:2]).fork_log_dir is None
    without_fork = (*full[:5], "--strace-syscalls=open")
    assert RuntimeInfo("runsc", "/usr/bin/runsc", without_fork).fork_log_dir is None
    per_id = (*full[:2], "--debug-log=/var/log/runsc/%ID%/", *full[3:])
    assert RuntimeInfo("runsc", "/usr/bin/runsc", per_id).fork_log_dir is None
    assert RuntimeInfo("runc", "runc", full).fork_log_dir is None
    assert not RuntimeInfo("runc", "runc").gvisor


def test_a_boot_log_is_found_by_its_container_and_its_exec_record_skipped(
    tmp_dir: Path,
) -> None:
    cid, other = "a" * 64, "b" * 64

    def boot(name: str, owner: str, body: list[str]) -> None:
        head = [
            _GLOG + "main.go:216] ***************************",
            _GLOG
            + f"main.go:217] Args: [runsc-sandbox --root=/x boot --bundle=/b/{owner} {owner}]",
        ]
        (tmp_dir / f"runsc.log.{name}.boot.txt").write_text("\n".join(head + body) + "\n")

    boot(
        "1", cid, [_GLOG + "kernel.go:791] EXEC: [/sbin/docker-init -- sh -c exit 3", _REFUSED, "]"]
    )
    boot("2", other, [_REFUSED, _REFUSED])
    logs = BootLogs(str(tmp_dir))
    assert logs.refused_forks(cid, argv_newlines=2) == 0
    assert logs.refused_forks(cid, argv_newlines=0) == 1  # had the command no line break
    assert logs.refused_forks(other) == 2
    assert logs.refused_forks("c" * 64) is None
    assert not logs.guard(other, max_bytes=10_000)  # under the cap: left alone
    assert logs.guard(other, max_bytes=100)  # over it, with refused forks: kill
    boot("3", "d" * 64, [_GLOG + "main.go:1] a fork that succeeded"] * 20)
    assert not logs.guard("d" * 64, max_bytes=100)  # over it, no refusal: emptied
    assert (tmp_dir / "runsc.log.3.boot.txt").stat().st_size == 0
    logs.discard("d" * 64)
    logs.discard(cid)
    assert sorted(p.name for p in tmp_dir.iterdir()) == ["runsc.log.2.boot.txt"]
    os.utime(tmp_dir / "runsc.log.2.boot.txt", (0, 0))  # untouched for a day: stale
    assert BootLogs(str(tmp_dir)).refused_forks(cid) is None
    assert not any(tmp_dir.iterdir())


def test_a_daemon_on_runsc_runs_tasks_and_leaves_nothing(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc], docker_client
) -> None:  # type: ignore[no-untyped-def]
    """`[sandbox] runtime = "runsc"` with the warm pool on: tasks succeed and fail as under
    runc, `/readyz` says the runtime traces forks; six tasks asking for a runtime the engine
    lacks are refused at once and leave the breaker closed; no container or boot log is
    left."""
    sandbox = {"runtime": "runsc", "runtimes": ["runc", "runsc", "kata"]}
    d = DaemonProc(tmp_dir / "data", nats_url, {"sandbox": sandbox, "pool": {}})
    daemons.append(d)
    d.start(60)
    status, body = d.get("/readyz")
    assert status == 200, body
    check = json.loads(body)["checks"]["runtime"]
    assert check["runtimes"]["runsc"] == "gvisor, forks traced"
    with d.client() as c:
        ok = c.run(TaskSpec(**task("echo hi", retry={"max_attempts": 1})), timeout_s=120)
        bad = c.run(
            TaskSpec(**task("for i in $(seq 1 40); do sleep 5 & done; wait", limits={"pids": 8})),
            timeout_s=120,
        )
        lacking = [c.run(TaskSpec(**task("true", runtime="kata")), timeout_s=60) for _ in range(6)]
    assert (ok.status, ok.stdout) == ("succeeded", "hi\n")
    assert bad.error is not None and bad.error.code == "PIDS_LIMIT"
    assert {(r.status, r.attempts, r.error and r.error.code) for r in lacking} == {
        ("rejected", 0, "RUNTIME_UNAVAILABLE")
    }
    status, body = d.get("/readyz")
    assert json.loads(body)["checks"]["breaker"]["ok"], body  # never counted as engine failures
    d.stop()
    history = asyncio.run(stream_events(nats_url, "sup.>"))
    con = duckdb.connect(str(project(history, tmp_dir / "p.duckdb")))
    try:
        assert con.execute("SELECT count(*) FROM leaked_resources").fetchone() == (0,)
    finally:
        con.close()
    managed = docker_client.containers.list(all=True, filters={"label": "supervisor.managed=true"})
    assert not managed
    logs = Path("/var/log/runsc")
    assert not any(logs.glob("*.boot.txt")) if logs.is_dir() else True


# Six awks fill the sandbox's 8 processes with docker-init (each first waits 2 s without
# forking, so that all six start); then each asks for a fork in a loop, refused nearly every
# time, and goes on.
_SPINNER = 'BEGIN { t = systime(); while (systime() < t + 2) ; while (1) system("true") }'
_FORK_SPIN = f"for i in 1 2 3 4 5; do awk '{_SPINNER}' & done; exec awk '{_SPINNER}'"


@pytest.fixture
async def small_log_node(tmp_dir: Path, nats_url: str) -> AsyncIterator[Node]:
    cfg = Config(
        data_dir=str(tmp_dir / "data"),
        node_id="n1",
        sandbox=Sandbox(runtime="runsc", gvisor_log_max_mb=1),
    )
    async with open_node(cfg, nats_url=nats_url) as n:
        yield n
        await n.executor.attempts.drain()
        await n.events.flush(10)


async def test_a_fork_bomb_under_runsc_is_killed_before_its_trace_fills_the_disk(
    small_log_node: Node, nats_url: str
) -> None:
    """Tasks that spin on refused forks, each one traced: past the log's cap (1 MiB here)
    the supervisor kills them, long before their deadline, as PIDS_LIMIT."""
    bomb = _spec(_FORK_SPIN, limits=Limits(pids=8, timeout_s=60))
    result = await small_log_node.executor.run(bomb)
    assert result.error is not None, result
    assert (result.error.type, result.error.code) == ("resource", "PIDS_LIMIT"), result.error
    assert result.duration_s < 30
    kills = [
        e.reason
        for e in await stream_events(nats_url, f"sup.container.kill_issued.n1.{result.task_id}")
        if isinstance(e, KillIssued)
    ]
    assert "pids_limit" in kills
