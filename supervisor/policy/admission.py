"""Admission of a task spec: decoding, the configured bounds and the security policy.

Pure: takes bytes or a spec plus the configuration, returns the spec or raises
`InvalidSpec` / `PolicyViolation` with a message naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import urlsplit

import msgspec

from schemas import TaskSpec
from schemas.config import Bounds, Policy
from schemas.errors import InvalidSpec, PolicyViolation
from schemas.spec import b64decode

# msgspec names the location as "at `$.a.b`" and an extra key as "unknown field `k`".
_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN_RE = re.compile(r"unknown field `([^`]*)`")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_decoder = msgspec.json.Decoder(TaskSpec)
_encoder = msgspec.json.Encoder()
# A file's path: each part at most NAME_MAX (255 bytes on Linux file systems), the whole
# well under PATH_MAX, and not so deep that making its directories is a risk.
_MAX_NAME_PART = 255
_MAX_PATH = 1024
_MAX_DEPTH = 32


def decode_spec(data: bytes | str) -> TaskSpec:
    """Decode a JSON spec strictly. The error names the offending field."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as e:
        m = _PATH_RE.search(str(e))
        path = m.group(1) if m else ""
        unknown = _UNKNOWN_RE.search(str(e))
        if unknown:
            path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        raise InvalidSpec(path or "spec", str(e)) from e
    except msgspec.DecodeError as e:
        raise InvalidSpec("spec", f"not valid JSON: {e}") from e


# The image reference grammar of the Docker engine (distribution's `reference` package):
# [domain[:port]/]path-component[/path-component...][:tag][@digest], path components in
# lower case. Anything else would reach the engine as a bad request.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IMAGE_RE = re.compile(
    rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?/)?"
    rf"{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)
_MAX_IMAGE_NAME = 255
RESERVED_ENV_PREFIX = "SUPERVISOR_"
# Characters no file name of a spec may hold: controls (C0, DEL, C1) and the bidirectional
# formatting marks that make a name read as another one.
_BAD_NAME_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def check_image(image: str) -> None:
    """Raise `InvalidSpec("image", ...)` unless `image` is a valid image reference."""
    if not image.strip():
        raise InvalidSpec("image", "must not be empty")
    ref = image.split("@", 1)[0]
    head, _, tail = ref.rpartition(":")
    name = head if head and "/" not in tail else ref
    if len(name) > _MAX_IMAGE_NAME or _IMAGE_RE.fullmatch(image) is None:
        raise InvalidSpec(
            "image",
            f"{image!r} is not an image reference ([registry/]name[:tag][@digest], "
            "name in lower case)",
        )


RESERVED_TASK_IDS = frozenset({"batch"})
"""Task ids the HTTP API's paths take for themselves (`/v1/tasks/batch`)."""


def check_bounds(spec: TaskSpec, bounds: Bounds) -> None:
    if spec.task_id in RESERVED_TASK_IDS:
        raise InvalidSpec("task_id", f"{spec.task_id!r} is reserved (a route of the HTTP API)")
    check_image(spec.image)
    if not spec.command:
        raise InvalidSpec("command", "must hold at least one argument")
    if len(spec.command) > bounds.max_command_args:
        raise InvalidSpec("command", f"more than {bounds.max_command_args} arguments")
    if any("\x00" in a for a in spec.command):
        raise InvalidSpec("command", "an argument contains a NUL byte")
    lim = spec.limits
    for field, value, top in (
        ("limits.timeout_s", lim.timeout_s, bounds.max_timeout_s),
        ("limits.memory_mb", lim.memory_mb, bounds.max_memory_mb),
        ("limits.cpus", lim.cpus, bounds.max_cpus),
        ("limits.pids", lim.pids, bounds.max_pids),
        ("limits.output_bytes", lim.output_bytes, bounds.max_output_bytes),
    ):
        if value > top:
            raise InvalidSpec(field, f"{value} is above the configured bound {top}")
    if lim.cpu_time_s is not None and lim.cpu_time_s > bounds.max_cpu_time_s:
        raise InvalidSpec(
            "limits.cpu_time_s",
            f"{lim.cpu_time_s} is above the configured bound {bounds.max_cpu_time_s}",
        )
    if len(spec.env) > bounds.max_env:
        raise InvalidSpec("env", f"more than {bounds.max_env} variables")
    for key, env_value in spec.env.items():
        if not _ENV_KEY.match(key):
            raise InvalidSpec(f"env.{key}", "not a valid variable name")
        if key.startswith(RESERVED_ENV_PREFIX):
            raise InvalidSpec(
                f"env.{key}", f"names starting with {RESERVED_ENV_PREFIX} are the supervisor's own"
            )
        if "\x00" in env_value:
            raise InvalidSpec(f"env.{key}", "value contains a NUL byte")
    retry = spec.retry
    for field, delay in (
        ("retry.base_delay_s", retry.base_delay_s),
        ("retry.max_delay_s", retry.max_delay_s),
    ):
        if delay > bounds.max_retry_delay_s:
            raise InvalidSpec(
                field, f"{delay} is above the configured bound {bounds.max_retry_delay_s}"
            )
    _check_files(spec, bounds)
    _check_stdin(spec, bounds)
    size = len(_encoder.encode(spec))
    if size > bounds.max_spec_bytes:
        raise InvalidSpec(
            "spec", f"{size} bytes as JSON is above the configured bound {bounds.max_spec_bytes}"
        )


def _check_files(spec: TaskSpec, bounds: Bounds) -> None:
    both = set(spec.files) & set(spec.files_base64)
    if both:
        raise InvalidSpec(f"files_base64.{min(both)}", "is also named in files")
    if len(spec.files) + len(spec.files_base64) > bounds.max_files:
        raise InvalidSpec("files", f"more than {bounds.max_files} files")
    total = 0
    for name, content in spec.files.items():
        _check_file_name(name)
        total += len(content.encode())
    for name, data in spec.files_base64.items():
        _check_file_name(name)
        try:
            total += len(b64decode(data))
        except ValueError as e:
            raise InvalidSpec(f"files_base64.{name}", str(e)) from e
    if total > bounds.max_files_bytes:
        raise InvalidSpec("files", f"{total} bytes is above the bound {bounds.max_files_bytes}")
    _check_no_file_is_a_dir([*spec.files, *spec.files_base64])
    for name in spec.executables or ():
        if name not in spec.files and name not in spec.files_base64:
            raise InvalidSpec(f"executables.{name[:64]}", "names no file of files or files_base64")


def _check_stdin(spec: TaskSpec, bounds: Bounds) -> None:
    if spec.stdin is not None and spec.stdin_base64 is not None:
        raise InvalidSpec("stdin_base64", "give stdin or stdin_base64, not both")
    field = "stdin" if spec.stdin is not None else "stdin_base64"
    try:
        data = spec.stdin_bytes()
    except ValueError as e:
        raise InvalidSpec(field, str(e)) from e
    if data is not None and len(data) > bounds.max_stdin_bytes:
        raise InvalidSpec(
            field, f"{len(data)} bytes is above the configured bound {bounds.max_stdin_bytes}"
        )


def _check_file_name(name: str) -> None:
    """A plain relative path: no empty, `.` or `..` part (so no `a//b`, `./x`, `x/`), no
    control or bidirectional formatting character."""
    parts = name.split("/")
    if _BAD_NAME_CHARS.search(name):
        raise InvalidSpec(f"files.{name!r}", "holds a control or bidirectional character")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise InvalidSpec(
            f"files.{name[:64]}",
            "must be a relative path inside the workspace, without empty, '.' or '..' parts",
        )
    if len(name.encode()) > _MAX_PATH or len(parts) > _MAX_DEPTH:
        raise InvalidSpec(
            f"files.{name[:64]}",
            f"a path of at most {_MAX_PATH} bytes and {_MAX_DEPTH} levels is allowed",
        )
    if any(len(p.encode()) > _MAX_NAME_PART for p in parts):
        raise InvalidSpec(
            f"files.{name[:64]}", f"each part of a path is at most {_MAX_NAME_PART} bytes"
        )


def _check_no_file_is_a_dir(names: list[str]) -> None:
    files = set(names)
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in files:
                raise InvalidSpec(f"files.{name}", f"{parent!r} is a file, not a directory")


def check_policy(
    spec: TaskSpec,
    policy: Policy,
    callbacks: Sequence[str] = (),
    runtimes: Sequence[str] | None = None,
) -> None:
    """`runtimes`: the runtimes a spec may name (`[sandbox] runtimes`; None: any)."""
    if spec.runtime is not None and runtimes is not None and spec.runtime not in runtimes:
        raise PolicyViolation(
            "runtime", f"runtime {spec.runtime!r} is not allowed (allowed: {list(runtimes)})"
        )
    if spec.privileged and not policy.allow_privileged:
        raise PolicyViolation("privileged", "privileged containers are forbidden")
    refused = [
        c for c in spec.cap_add if c.upper() not in {a.upper() for a in policy.allowed_capabilities}
    ]
    if refused:
        raise PolicyViolation("cap_add", f"capabilities {refused} are forbidden")
    if spec.network not in policy.allowed_networks:
        raise PolicyViolation(
            "network", f"network {spec.network!r} is forbidden (allowed: {policy.allowed_networks})"
        )
    if spec.mounts and not policy.allow_mounts:
        raise PolicyViolation("mounts", "host mounts are forbidden")
    if spec.callback_url is not None:
        why = callback_refused(spec.callback_url, callbacks)
        if why is not None:
            raise PolicyViolation("callback_url", why)


def callback_refused(url: str, allowed: Sequence[str]) -> str | None:
    """Why `url` may not be called back (None: it may): it must be http(s) without
    credentials, with the scheme, host and port of an `allowed` prefix and a path under
    that prefix's. Nothing is allowed by default, so a spec cannot make the supervisor
    request an address of its choosing."""
    if not allowed:
        return "callbacks are not allowed ([callbacks] allowed is empty)"
    target = _origin_and_path(url)
    if target is None:
        return f"{url!r} is not a plain http(s) URL (no credentials, no dot segments)"
    for prefix in allowed:
        rule = _origin_and_path(prefix)
        if rule is not None and rule[0] == target[0] and target[1].startswith(rule[1]):
            return None
    return f"{url!r} is not under an allowed callback prefix ([callbacks] allowed)"


def _origin_and_path(url: str) -> tuple[tuple[str, str, int], str] | None:
    try:
        u = urlsplit(url)
        port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password:
        return None
    if port is None or any(c in url for c in "\r\n\t "):
        return None
    if any(p in (".", "..") or p.lower().startswith("%2e") for p in u.path.split("/")):
        return None  # a dot segment would leave the allowed prefix once resolved
    return (u.scheme, u.hostname.lower(), port), u.path or "/"


def admit(
    spec: TaskSpec,
    bounds: Bounds,
    policy: Policy,
    callbacks: Sequence[str] = (),
    runtimes: Sequence[str] | None = None,
) -> TaskSpec:
    """Bounds first (is the spec sane), then policy (is it allowed; `callbacks` are the
    allowed callback prefixes, `runtimes` the runtimes a spec may name)."""
    check_bounds(spec, bounds)
    check_policy(spec, policy, callbacks, runtimes)
    return spec
