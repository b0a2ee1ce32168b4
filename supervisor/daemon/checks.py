"""The daemon's readiness checks (`/readyz`): each a function that answers a `Check`,
made from what it looks at; `daemon_checks` is the set a daemon serves."""

from __future__ import annotations

from collections.abc import Callable

from schemas.errors import DockerError
from schemas.http import Check, CheckFn
from schemas.spec import Sandbox
from supervisor.daemon.monitor import ResourceMonitor
from supervisor.docker.engine_breaker import DockerBreaker, Pingable
from supervisor.docker.runtime import DockerRuntime
from supervisor.execution.pool import WarmPool


def docker_check(runtime: Pingable) -> CheckFn:
    async def check() -> Check:
        try:
            await runtime.ping()
        except DockerError as e:
            return Check(ok=False, reason=str(e), details={"error": e.tag})
        return Check(ok=True, reason="Docker answered ping")

    return check


def nats_check(connected: Callable[[], bool], cause: Callable[[], str | None]) -> CheckFn:
    """Connected to NATS; when not, `cause` may say why (the embedded server died)."""

    async def check() -> Check:
        if connected():
            return Check(ok=True, reason="connected to NATS")
        return Check(ok=False, reason=cause() or "not connected to NATS")

    return check


def breaker_check(breaker: DockerBreaker) -> CheckFn:
    async def check() -> Check:
        st = breaker.state
        details = {"state": st.status, "failures": st.failures}
        if st.status == "closed":
            return Check(ok=True, reason="the Docker breaker is closed", details=details)
        return Check(
            ok=False,
            details=details,
            reason=f"the Docker breaker is {st.status} after {st.failures} engine failures",
        )

    return check


def outbox_check(backlog: Callable[[], int], max_backlog: int) -> CheckFn:
    async def check() -> Check:
        n = backlog()
        details = {"backlog": n, "max_backlog": max_backlog}
        if n <= max_backlog:
            return Check(ok=True, reason=f"{n} events waiting to be published", details=details)
        return Check(
            ok=False,
            details=details,
            reason=f"{n} events waiting to be published, more than {max_backlog}",
        )

    return check


def pressure_check(monitor: ResourceMonitor) -> CheckFn:
    async def check() -> Check:
        reasons = monitor.reasons
        if not reasons:
            return Check(ok=True, reason="the host is under every threshold")
        return Check(
            ok=False,
            reason="host under pressure: " + "; ".join(reasons),
            details={"metrics": sorted(monitor.alerting)},
        )

    return check


def daemon_checks(
    *,
    runtime: Pingable,
    connected: Callable[[], bool],
    backlog: Callable[[], int],
    breaker: DockerBreaker,
    monitor: ResourceMonitor,
    max_backlog: int,
    nats_down: Callable[[], str | None] = lambda: None,
) -> dict[str, CheckFn]:
    """The daemon's five checks, in the order `/readyz` reports them."""
    return {
        "docker": docker_check(runtime),
        "nats": nats_check(connected, nats_down),
        "breaker": breaker_check(breaker),
        "outbox": outbox_check(backlog, max_backlog),
        "pressure": pressure_check(monitor),
    }


# --- the app ---------------------------------------------------------------------------------


def pool_check(pool: WarmPool) -> CheckFn:
    """The warm pool: always ready (a task with no parked container starts cold); the
    details say what is parked, per shape, against `[pool] size`."""

    async def check() -> Check:
        if not pool.enabled:
            return Check(ok=True, reason="no warm pool (size 0): every task starts cold")
        parked = pool.parked()
        details = {"size": pool.cfg.size, "shapes": pool.shapes(), "parked": parked}
        total = sum(parked.values())
        return Check(
            ok=True,
            reason=f"{total} container(s) parked in {len(pool.shapes())} shape(s)",
            details=details,
        )

    return check


def runtime_check(runtime: DockerRuntime, sandbox: Sandbox) -> CheckFn:
    """The node's OCI runtime (`[sandbox] runtime`) is registered with the engine; the
    details say which of `[sandbox] runtimes` it has, and whether a gVisor one records
    refused forks (without that, a gVisor task's fork limit holds but is not classified
    `PIDS_LIMIT`)."""

    async def check() -> Check:
        try:
            known = await runtime.runtimes()
        except DockerError as e:
            return Check(ok=False, reason=f"cannot list the engine's runtimes: {e}")
        allowed = {
            name: (
                "absent"
                if name not in known
                else "gvisor, forks traced"
                if known[name].fork_log_dir
                else "gvisor, forks NOT traced"
                if known[name].gvisor
                else "present"
            )
            for name in dict.fromkeys([sandbox.runtime, *sandbox.runtimes])
        }
        details = {"runtime": sandbox.runtime, "runtimes": allowed}
        if sandbox.runtime not in known:
            return Check(
                ok=False,
                details=details,
                reason=f"runtime {sandbox.runtime!r} ([sandbox] runtime) is not registered "
                f"with the Docker engine (it has: {', '.join(sorted(known))}); "
                "scripts/setup registers runsc",
            )
        return Check(ok=True, reason=f"runtime {sandbox.runtime!r} is registered", details=details)

    return check
