"""The task contract: what a submitter sends (TaskSpec) and what it gets back (Result).

Field names are fixed by the design; new fields get defaults so old clients keep working.
Specs are decoded strictly (`forbid_unknown_fields`): a misspelt field is an error, not a
silently ignored wish.
"""

from __future__ import annotations

import binascii
import hashlib
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")

# A token that is safe as one NATS subject token and as a Docker label value.
Token = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]

ErrorType = Literal["infrastructure", "resource", "timeout", "user_code", "validation", "security"]


class Limits(Struct, forbid_unknown_fields=True, kw_only=True):
    """Resource limits of one attempt. The configured bounds cap them at admission."""

    timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    memory_mb: Annotated[int, Meta(ge=6)] = 128
    cpus: Annotated[float, Meta(gt=0)] = 1.0
    pids: Annotated[int, Meta(ge=4)] = 64
    output_bytes: Annotated[int, Meta(ge=0)] = 1_048_576
    cpu_time_s: Annotated[float, Meta(gt=0)] | None = None
    """CPU seconds the attempt may use in all its processes, read from its cgroup's CPU
    accounting (distinct from the wall-clock `timeout_s`); past it the container is killed
    and the attempt fails `timeout/CPU_TIME_EXCEEDED`. None: no CPU-time limit."""


class RetryPolicy(Struct, forbid_unknown_fields=True, kw_only=True):
    """Exponential backoff with optional full jitter; only retryable errors are retried."""

    max_attempts: Annotated[int, Meta(ge=1, le=100)] = 3
    base_delay_s: Annotated[float, Meta(ge=0)] = 1.0
    multiplier: Annotated[float, Meta(ge=1)] = 2.0
    max_delay_s: Annotated[float, Meta(ge=0)] = 30.0
    jitter: bool = True


class TaskSpec(Struct, forbid_unknown_fields=True, kw_only=True):
    """One task as submitted. `files` (text) and `files_base64` (bytes, base64) are written
    to a workspace mounted read-only at /workspace (those named in `executables`
    executable); `stdin` (text) or `stdin_base64` (bytes, base64) is the script's standard
    input, closed at its end (without either, stdin is empty). The security requests
    (`network`, `privileged`, `cap_add`, `mounts`) are refused unless the configured policy
    allows them; `callback_url` unless `[callbacks] allowed` names its destination;
    `runtime` unless `[sandbox] runtimes` lists it."""

    image: Annotated[str, Meta(min_length=1, max_length=512)]
    command: Annotated[list[str], Meta(min_length=1)]
    task_id: Token | None = None
    files: dict[str, str] = {}
    files_base64: dict[str, str] = {}
    executables: list[str] | UnsetType = UNSET
    """Names of `files` / `files_base64` written executable (mode 0755, the others 0644): a
    program compiled elsewhere, or a script with a `#!` line, run as the command itself.
    Left out of the JSON when not given, so that the specs (and `task.submitted` events) of
    tasks without it read as before to older readers."""
    stdin: str | None = None
    stdin_base64: str | None = None
    env: dict[str, str] = {}
    priority: Priority = "normal"
    correlation_id: Annotated[str, Meta(max_length=128)] | None = None
    limits: Limits = msgspec.field(default_factory=Limits)
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    network: str = "none"
    privileged: bool = False
    cap_add: list[str] = []
    mounts: list[dict[str, Any]] = []
    callback_url: Annotated[str, Meta(max_length=2048)] | None = None
    runtime: Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] | None = None
    """The OCI runtime to run in (`runc`, `runsc`), one of `[sandbox] runtimes`; None: the
    node's `[sandbox] runtime`."""

    def file_bytes(self) -> dict[str, bytes]:
        """Every file of the workspace as bytes: `files` encoded UTF-8, `files_base64`
        decoded. Raises ValueError for base64 that does not decode (admission checks it)."""
        out = {name: text.encode() for name, text in self.files.items()}
        for name, data in self.files_base64.items():
            out[name] = b64decode(data)
        return out

    def stdin_bytes(self) -> bytes | None:
        """The standard input as bytes, or None when the spec gives none."""
        if self.stdin_base64 is not None:
            return b64decode(self.stdin_base64)
        return None if self.stdin is None else self.stdin.encode()


def b64decode(text: str) -> bytes:
    """Standard base64 (RFC 4648, padded); anything else raises ValueError."""
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError(f"not base64: {e}") from e


_NESTED = {"limits": Limits, "retry": RetryPolicy}


def _known(spec: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A spec's JSON object without the fields this version does not know, and their names
    (`limits.x` for one of its limits)."""
    out = {k: v for k, v in spec.items() if k in TaskSpec.__struct_fields__}
    dropped = sorted(set(spec) - set(out))
    for name, struct in _NESTED.items():
        if isinstance(out.get(name), dict):
            nested = out[name]
            out[name] = {k: v for k, v in nested.items() if k in struct.__struct_fields__}
            dropped += sorted(f"{name}.{k}" for k in set(nested) - set(out[name]))
    return out, dropped


def spec_fields_known(event: bytes, error: msgspec.ValidationError) -> bytes:
    """An event's JSON whose embedded `spec` (strict, as a submitted spec must be) holds
    fields a newer writer added: the same without them, as the event's own unknown fields
    are ignored. Re-raises `error` when it is about anything else."""
    if "unknown field" not in str(error) or "`$.spec" not in str(error):
        raise error
    raw = msgspec.json.decode(event)
    return msgspec.json.encode({**raw, "spec": _known(raw["spec"])[0]})


def newer_spec(data: bytes) -> tuple[TaskSpec, list[str]] | None:
    """A spec (a work message) that is valid but for fields this version does not know (a
    newer node's intake took it): the spec without them, and their names. None for anything
    else: not JSON, not an object, no task id, or wrong in a field this version knows."""
    try:
        raw = msgspec.json.decode(data)
        if not isinstance(raw, dict):
            return None
        known, dropped = _known(raw)
        spec = msgspec.convert(known, TaskSpec)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return (spec, dropped) if dropped and spec.task_id is not None else None


class ExecutionError(Struct, kw_only=True):
    """A classified error: `type` and `code` come from the catalogue, `retryable` from the
    catalogue's default for that code. `details` holds the evidence that decided it."""

    type: ErrorType
    code: str
    message: str
    retryable: bool
    details: dict[str, Any] = {}
    task_id: str | None = None
    container_id: str | None = None
    timestamp: str | None = None


class Result(Struct, kw_only=True):
    """The outcome of a task after all its attempts."""

    task_id: str
    status: Literal["succeeded", "failed", "rejected"]
    attempts: int
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_s: float = 0.0
    error: ExecutionError | None = None
    cpu_time_s: float | None = None
    """CPU seconds the last attempt's processes used (its cgroup, sampled every few ms while
    it ran). None when no sample could be read (a remote engine, or no container ran)."""
    peak_memory_bytes: int | None = None
    """The last attempt's peak memory use (its cgroup's high-water mark), None likewise."""


def _digest(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


def public_spec(spec: TaskSpec) -> TaskSpec:
    """`spec` as the event log keeps it: what a task brings in (files, stdin, env values)
    as digests (`sha256:<hex>`), so that no subject a reader may follow carries a secret;
    the whole spec travels only on the work queue (`SUP_TASKS`). Two specs are the same
    task exactly when their public forms are equal. Idempotent."""

    def hidden(value: str) -> str:
        return value if value.startswith("sha256:") and len(value) == 71 else _digest(value)

    return msgspec.structs.replace(
        spec,
        files={name: hidden(v) for name, v in spec.files.items()},
        files_base64={name: hidden(v) for name, v in spec.files_base64.items()},
        stdin=None if spec.stdin is None else hidden(spec.stdin),
        stdin_base64=None if spec.stdin_base64 is None else hidden(spec.stdin_base64),
        env={k: hidden(v) for k, v in spec.env.items()},
        executables=sorted(set(spec.executables or ())) or UNSET,
    )


# --- the warm pool's contract ---------------------------------------------------------------
#
# The warm pool's contract: its configuration, the shape a parked container is made for,
# whether a spec fits one, and the hand-off a parked container reads before it becomes the
# task. Pure: no I/O. `docs/running.md` ("The warm pool") explains the design.
#
# A parked container is created and started ahead of demand with everything a cold start of
# its shape would give it (image, user, limits, `/tmp`, a read-only bind-mounted workspace,
# no network) except its command: it runs `WAITER`, a POSIX shell that blocks reading its
# standard input. A task adopts it by writing its files into the (still empty) workspace dir,
# then sending `handoff(...)` followed by its own standard input; the shell exports the task's
# variables and `exec`s the task's command, which then stands where a cold start puts it:
# the only child of the container's init. A command that cannot be executed ends the shell
# with 127 (not found) or 126 (not executable), as it ends a cold start's init.


class Sandbox(Struct, forbid_unknown_fields=True, kw_only=True):
    """How every task container is hardened, and the OCI runtime it runs in."""

    user: Annotated[
        str, msgspec.Meta(description="The user every task container runs as (`uid:gid`).")
    ] = "65534:65534"
    tmpfs_size: Annotated[
        str, msgspec.Meta(description="Size of the container's `/tmp` tmpfs.")
    ] = "16m"
    workspace_mount: Annotated[
        str, msgspec.Meta(description="Where the workspace is mounted, read-only.")
    ] = "/workspace"
    stop_timeout_s: Annotated[
        float,
        msgspec.Meta(description="Grace between SIGTERM and SIGKILL when a container is stopped."),
    ] = 5.0
    runtime: Annotated[
        str,
        msgspec.Meta(
            description="The OCI runtime of every task container whose spec names none: "
            "`runc`, or `runsc` (gVisor, registered by `scripts/setup`; `docs/running.md`).",
            pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        ),
    ] = "runc"
    runtimes: Annotated[
        list[str],
        msgspec.Meta(
            description="The runtimes a spec may ask for with `runtime` (anything else is "
            "`security/POLICY_VIOLATION`); one the engine lacks is refused "
            "`validation/RUNTIME_UNAVAILABLE`."
        ),
    ] = msgspec.field(default_factory=lambda: ["runc", "runsc"])
    gvisor_log_max_mb: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            description="Under gVisor, how large a task's boot log (its fork trace) may grow: "
            "past it, a task with refused forks is killed (`PIDS_LIMIT`), another's log "
            "is emptied.",
        ),
    ] = 64


def _pool_doc(text: str) -> msgspec.Meta:
    """A configuration key's meaning (`docs/configuration.md`)."""
    return msgspec.Meta(description=text)


class Shape(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What a parked container is made for: a task adopts one only if its image and limits
    are exactly these (the user, `/tmp` and the workspace's mount point are the node's)."""

    image: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    memory_mb: Annotated[int, msgspec.Meta(ge=6)] = 128
    cpus: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    pids: Annotated[int, msgspec.Meta(ge=4)] = 64
    runtime: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    """None: the node's `[sandbox] runtime`."""

    def key(self) -> str:
        """A short, stable name of the shape (labels, events, metrics)."""
        key = f"{self.image}|{self.memory_mb}m|{self.cpus:g}cpu|{self.pids}pids"
        return key if self.runtime in (None, "runc") else f"{key}|{self.runtime}"


class PoolConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """The warm pool: containers created and started ahead of demand, each adopted by
    exactly one task and removed after it (`docs/running.md`)."""

    size: Annotated[
        int,
        _pool_doc("Parked containers kept ready per shape (0: no pool, every task starts cold)."),
        msgspec.Meta(ge=0, le=64),
    ] = 2
    shapes: Annotated[
        list[Shape],
        _pool_doc(
            "Shapes kept warm from the start (`image`, `memory_mb`, `cpus`, `pids`). Others "
            "are learnt: a task that finds no parked container of its shape runs cold and "
            "makes its shape warm."
        ),
    ] = []
    learn: Annotated[
        bool, _pool_doc("Whether a task's shape that is not in `shapes` is kept warm after it.")
    ] = True
    max_shapes: Annotated[
        int,
        _pool_doc("Most shapes kept warm at once (learnt ones beyond it are not)."),
        msgspec.Meta(ge=1),
    ] = 4
    idle_s: Annotated[
        float,
        _pool_doc("A learnt shape no task used for this long is retired with its containers."),
        msgspec.Meta(gt=0),
    ] = 300.0
    max_age_s: Annotated[
        float,
        _pool_doc("A parked container older than this is replaced by a fresh one."),
        msgspec.Meta(gt=0),
    ] = 3600.0
    refill_interval_s: Annotated[
        float,
        _pool_doc("How often the pool checks its containers and refills; a failing shape waits."),
        msgspec.Meta(gt=0),
    ] = 1.0


_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# Variables the waiting shell itself sets and exports: removed before the task's command
# runs, so that what the command inherits is what a cold start gives it.
_SHELL_OWN: Final = ("SHLVL", "OLDPWD")

WAITER: Final = (
    "IFS= read -r t || exit 125\n"
    "s=\n"
    'while IFS= read -r l; do [ "$l" = "$t" ] && break; s="$s$l\n'
    '"; done\n'
    "unset l\n"
    'eval "$s"\n'
)
"""The parked container's script (`/bin/sh -c WAITER`): reads a token line, then the lines
of the hand-off up to that token again, and evaluates them. `read` takes one byte at a
time from a pipe, so everything after the hand-off is left for the task."""


def handoff(token: str, env: Mapping[str, str], command: Sequence[str]) -> bytes:
    """What a parked container reads before it becomes the task: the token, a script that
    exports `env` and `exec`s `command`, and the token again. Everything is single-quoted,
    so no byte of a value is ever interpreted."""
    q = shlex.quote
    lines = [f"unset {' '.join(_SHELL_OWN)}"]
    if env:
        lines.append("export " + " ".join(f"{k}={q(v)}" for k, v in env.items()))
    cmd = " ".join(q(a) for a in command)
    lines.append("unset t s")
    lines.append(f"exec {cmd}")
    body = "\n".join(lines)
    if token in body.split("\n"):
        raise ValueError("a line of the hand-off is its token")
    return f"{token}\n{body}\n{token}\n".encode()


def pool_shape(spec: TaskSpec, default_runtime: str | None = None) -> Shape | None:
    """The shape of the parked container `spec` would adopt, or None when it must start
    cold: it asks for a network, privileges, capabilities or mounts (set at creation), or
    has a variable whose name a shell cannot export (or that the waiting shell sets)."""
    if spec.network != "none" or spec.privileged or spec.cap_add or spec.mounts:
        return None
    if not all(_NAME.match(k) for k in spec.env) or any(k in _SHELL_OWN for k in spec.env):
        return None
    lim = spec.limits
    return Shape(
        image=spec.image,
        memory_mb=lim.memory_mb,
        cpus=lim.cpus,
        pids=lim.pids,
        runtime=spec.runtime or default_runtime,
    )
