"""One exception root, one branch per layer.

Adapters translate library errors (docker-py, nats-py, DuckDB, OS) into these classes with
`raise ... from e`; retry, the breaker and classification act only on these classes, never
on library exceptions or message text. Each class carries `tag`, the stable name recorded
as `Evidence.adapter_error`.
"""

from __future__ import annotations

import re
from typing import Any

_USERINFO = re.compile(r"^(nats|tls|ws|wss)://[^@/]*@")


def redact_url(url: str) -> str:
    """A NATS URL (or a comma-separated list) without its credentials: what any message,
    log line or file shows of it."""
    return ",".join(_USERINFO.sub(r"\1://", u) for u in url.split(","))


class SupervisorError(Exception):
    """Root of every error the project raises on purpose."""

    tag = "supervisor_error"


class InternalError(SupervisorError):
    """An exception no layer expected, caught at the edge of an attempt so that it ends
    as a classified outcome (`INTERNAL_ERROR`) instead of a lost attempt."""

    tag = "internal"

    def __init__(self, where: str, error: BaseException) -> None:
        self.where = where
        self.error_class = type(error).__name__
        super().__init__(f"{where}: unexpected {self.error_class}: {error}"[:2000])


# --- input -------------------------------------------------------------------------------


class SpecError(SupervisorError):
    """The task spec is unusable as given."""

    tag = "spec_error"


class InvalidSpec(SpecError):
    tag = "invalid_spec"

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid spec: {field}: {reason}")


class PolicyViolation(SpecError):
    tag = "policy_violation"

    def __init__(self, request: str, reason: str) -> None:
        self.request = request
        self.reason = reason
        super().__init__(f"policy violation: {request}: {reason}")


# --- docker ------------------------------------------------------------------------------


class DockerError(SupervisorError):
    """Something went wrong talking to the Docker engine."""

    tag = "docker_error"

    def __init__(self, operation: str, detail: str = "", *, status: int | None = None) -> None:
        self.operation = operation
        self.detail = detail
        self.status = status
        super().__init__(f"docker {operation} failed" + (f": {detail}" if detail else ""))


class DockerUnavailable(DockerError):
    """The daemon cannot be reached (connection refused, socket missing, timeout)."""

    tag = "docker_unavailable"


class DockerApiError(DockerError):
    """The daemon answered with a server error."""

    tag = "docker_api_error"


class DockerRequestRefused(DockerApiError):
    """The daemon refused the request itself (an HTTP 4xx other than not-found): the
    spec's fault, never the engine's, so it is neither retried nor counted by the
    breaker."""

    tag = "docker_request_refused"


class ImageNotFound(DockerError):
    tag = "image_not_found"


class RuntimeUnavailable(SupervisorError):
    """The OCI runtime a task needs is not registered with the engine: the task is refused
    before any container exists (never retried, never counted by the breaker)."""

    tag = "runtime_unavailable"


class ContainerVanished(DockerError):
    """The container was removed while the supervisor still needed it."""

    tag = "container_vanished"


# --- event log ---------------------------------------------------------------------------


class EventLogError(SupervisorError):
    tag = "event_log_error"


class NatsUnavailable(EventLogError):
    tag = "nats_unavailable"

    def __init__(self, url: str, detail: str = "") -> None:
        self.url = redact_url(url)
        super().__init__(f"NATS at {self.url} is unreachable" + (f": {detail}" if detail else ""))


class HistoryUnprotected(EventLogError):
    """`SUP_EVENTS` is missing, or does not deny deletes and purges: the daemon will not
    write history that anyone could erase."""

    tag = "history_unprotected"

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"history is not protected: {detail}")


class NoDaemon(NatsUnavailable):
    """A one-shot command that needs a daemon's NATS found none: no `--nats`, no
    `SUPERVISOR_NATS_URL`, no configured servers, and no daemon answering on the data dir."""

    tag = "no_daemon"

    def __init__(self, purpose: str, data_dir: str) -> None:
        self.purpose = purpose
        self.data_dir = data_dir
        EventLogError.__init__(
            self,
            f"cannot {purpose}: no daemon runs on the data dir {data_dir} and no NATS is named; "
            "start `supervisor serve` there, or give --nats URL (or SUPERVISOR_NATS_URL)",
        )
        self.url = ""


class OutboxError(EventLogError):
    tag = "outbox_error"


class DiskFull(OutboxError):
    """The data dir has no space left (ENOSPC, EDQUOT): nothing more can be recorded."""

    tag = "disk_full"


class EmbeddedNatsError(EventLogError):
    """The embedded nats-server could not be started."""

    tag = "embedded_nats_error"


# --- reconciler --------------------------------------------------------------------------


class ReconcileError(SupervisorError):
    """A reconcile pass or a cleanup command could not be carried out."""

    tag = "reconcile_error"


class ProjectionLagging(ReconcileError):
    """The projection did not show the pass's own inventory in time: deciding from it
    would judge the node on stale facts."""

    tag = "projection_lagging"

    def __init__(self, inventory_id: str, waited_s: float) -> None:
        self.inventory_id = inventory_id
        self.waited_s = waited_s
        super().__init__(
            f"the projection did not show inventory {inventory_id} within {waited_s:g}s"
        )


class CommandBusError(ReconcileError):
    """A command could not be published to (or read from) `SUP_COMMANDS`."""

    tag = "command_bus_error"


# --- configuration -----------------------------------------------------------------------


class ConfigError(SupervisorError):
    tag = "config_error"


class DataDirInUse(ConfigError):
    """Another live daemon holds the data dir (`supervisor.daemon.datadir`): a usage error."""

    tag = "data_dir_in_use"

    def __init__(self, data_dir: object, pid: int | None) -> None:
        self.data_dir = data_dir
        self.pid = pid
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"data dir {data_dir} is in use by {holder}")


class ApiError(SupervisorError):
    """A handler's precise HTTP answer: `status` and the catalogue-shaped body."""

    tag = "api_error"

    def __init__(self, status: int, type: str, code: str, message: str, **details: Any) -> None:
        self.status = status
        self.type = type
        self.code = code
        self.message = message
        self.details = details
        super().__init__(f"{status} {type}/{code}: {message}")


def projection_unavailable(why: str) -> ApiError:
    """The read API's answer while there is no projection to read: 503
    PROJECTION_UNAVAILABLE, saying why."""
    return ApiError(503, "infrastructure", "PROJECTION_UNAVAILABLE", why)
