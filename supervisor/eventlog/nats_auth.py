"""Credentials and roles of the embedded NATS server: it is never anonymous.

On its first start in a data dir the embedded server gets three users with random
passwords, kept in `<data_dir>/nats-auth.json` (mode 0600, never printed, never in
`nats.url`). Each may do what its role needs and nothing else, and NATS enforces it:

- `admin`, used at start-up only, by the process that starts the server: creates the
  streams and brings them to their configuration (`provision_streams`);
- `node`, what a daemon and the CLI commands of that data dir use: publish on the
  supervisor's own subjects (`sup.>`, `suptask.>`, `supcmd.>`), read the streams, pull and
  ack from its own consumers, create those consumers when they are missing, and delete only
  the ephemeral consumers a projector makes. It can create, change, purge or delete no
  stream and delete no durable consumer (so it can neither erase history nor strand the
  queue), and its replies come on `_INBOX_node.>`, which no one else may read;
- `reader`, for an analyst or a `nats` CLI (`supervisor credentials reader`): it may
  subscribe to `sup.>`, follow or read `SUP_EVENTS` through ephemeral or ordered consumers,
  and read its own replies on `_INBOX_reader.>`: no durable consumer, no delete, no other
  client's replies.

A task's stdin, env and files travel only on `suptask.<priority>` (`SUP_TASKS`), which the
reader can neither subscribe to nor read: the `task.submitted` event carries their digests
(`supervisor.intake.submit.public_spec`).

The server is started from a generated configuration, `<data_dir>/nats-server.conf` (0600):
the repo's `nats.conf` and an `authorization` block. Clients carry the credentials in the
URL they connect with (`nats://node:…@127.0.0.1:port`), in memory only; `redact`
(`schemas.errors.redact_url`) is what any message or file shows of it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import msgspec

from schemas.errors import redact_url as redact

AUTH_FILE = "nats-auth.json"
SERVER_CONF = "nats-server.conf"
EVENTS = "SUP_EVENTS"

_API = "$JS.API"
_PRIORITIES = ("high", "normal", "low")
CALLBACKS_CONSUMER = "callbacks"


def _create(stream: str, name: str) -> list[str]:
    """The subjects that create the consumer `name` on `stream` (both of nats-py's forms,
    with and without a filter subject)."""
    return [
        f"{_API}.CONSUMER.CREATE.{stream}.{name}",
        f"{_API}.CONSUMER.CREATE.{stream}.{name}.>",
        f"{_API}.CONSUMER.DURABLE.CREATE.{stream}.{name}",
    ]


# What a reader needs to follow or read SUP_EVENTS (ephemeral and ordered consumers, message
# gets) and nothing more: the bare CREATE subject makes only ephemeral consumers.
_READER_PUBLISH = [
    f"{_API}.INFO",
    f"{_API}.STREAM.NAMES",
    f"{_API}.STREAM.INFO.{EVENTS}",
    f"{_API}.STREAM.MSG.GET.{EVENTS}",
    f"{_API}.DIRECT.GET.{EVENTS}",
    f"{_API}.DIRECT.GET.{EVENTS}.>",
    f"{_API}.CONSUMER.CREATE.{EVENTS}",
    f"{_API}.CONSUMER.INFO.{EVENTS}.*",
    f"{_API}.CONSUMER.MSG.NEXT.{EVENTS}.*",
    f"$JS.ACK.{EVENTS}.>",
    f"$JS.FC.{EVENTS}.>",
]
_READER_PUBLISH_DENY = [
    f"{_API}.CONSUMER.MSG.NEXT.{EVENTS}.{CALLBACKS_CONSUMER}",
    f"$JS.ACK.{EVENTS}.{CALLBACKS_CONSUMER}.>",
]
_READER_SUBSCRIBE = ["sup.>", "_INBOX_reader.>"]

_OWN_SUBJECTS = ["sup.>", "suptask.>", "supcmd.>"]
_NODE_PUBLISH = [
    *_OWN_SUBJECTS,
    f"{_API}.INFO",
    f"{_API}.STREAM.NAMES",
    f"{_API}.STREAM.INFO.*",
    f"{_API}.STREAM.MSG.GET.*",
    f"{_API}.DIRECT.GET.>",
    f"{_API}.CONSUMER.CREATE.{EVENTS}",  # ephemeral: tail, history, the projector
    *_create(EVENTS, CALLBACKS_CONSUMER),
    *[n for p in _PRIORITIES for n in _create("SUP_TASKS", f"exec-{p}")],
    *_create("SUP_COMMANDS", "*"),  # cmd-<node>: one per node, shared by the fleet
    f"{_API}.CONSUMER.INFO.>",
    f"{_API}.CONSUMER.MSG.NEXT.>",
    f"{_API}.CONSUMER.DELETE.{EVENTS}.*",  # the projector's own ephemeral consumers
    "$JS.ACK.>",
    "$JS.FC.>",
]
_NODE_PUBLISH_DENY = [f"{_API}.CONSUMER.DELETE.{EVENTS}.{CALLBACKS_CONSUMER}"]
_NODE_SUBSCRIBE = [*_OWN_SUBJECTS, "_INBOX_node.>"]


class Credentials(msgspec.Struct, frozen=True):
    node: str
    reader: str
    admin: str = ""  # data dirs made before the admin user get one at their next start


def ensure_credentials(data_dir: Path) -> Credentials:
    """The data dir's credentials, made on first use (random, file mode 0600)."""
    path = Path(data_dir) / AUTH_FILE
    try:
        creds = msgspec.json.decode(path.read_bytes(), type=Credentials)
        if creds.admin:
            return creds
        creds = msgspec.structs.replace(creds, admin=secrets.token_urlsafe(24))
        path.unlink()  # rewritten below, with the users it had
    except FileNotFoundError:
        creds = Credentials(
            node=secrets.token_urlsafe(24),
            reader=secrets.token_urlsafe(24),
            admin=secrets.token_urlsafe(24),
        )
    return msgspec.json.decode(
        write_private_once(path, msgspec.json.encode(creds)), type=Credentials
    )


def write_private_once(path: Path, data: bytes) -> bytes:
    """Write `data` to `path` (mode 0600, fsync'd) unless a concurrent writer got there
    first; returns what `path` holds then (the first writer's data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # a concurrent first start keeps the one written first
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


def read_credentials(data_dir: Path) -> Credentials | None:
    try:
        return msgspec.json.decode((Path(data_dir) / AUTH_FILE).read_bytes(), type=Credentials)
    except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def server_config(base: str, creds: Credentials) -> str:
    """`base` (the text of nats.conf) with the two users and their permissions."""

    def quoted(items: list[str]) -> str:
        return ", ".join(f'"{i}"' for i in items)

    # No admin without a password of its own (credentials made before it had none).
    admin = f'{{user: "admin", password: "{creds.admin}"}}' if creds.admin else ""
    return f"""{base.rstrip()}

# Generated by the supervisor for this data dir: who may connect, and what each may do.
authorization {{
  users = [
    {admin}
    {{user: "node", password: "{creds.node}",
      permissions: {{
        publish: {{allow: [{quoted(_NODE_PUBLISH)}], deny: [{quoted(_NODE_PUBLISH_DENY)}]}}
        subscribe: {{allow: [{quoted(_NODE_SUBSCRIBE)}]}}
      }}
    }}
    {{user: "reader", password: "{creds.reader}",
      permissions: {{
        publish: {{allow: [{quoted(_READER_PUBLISH)}], deny: [{quoted(_READER_PUBLISH_DENY)}]}}
        subscribe: {{allow: [{quoted(_READER_SUBSCRIBE)}]}}
      }}
    }}
  ]
}}
"""


def write_server_config(data_dir: Path, base_conf: Path, creds: Credentials) -> Path:
    """Write the embedded server's configuration (mode 0600); returns its path."""
    path = Path(data_dir) / SERVER_CONF
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(server_config(base_conf.read_text(), creds))
    os.chmod(path, 0o600)
    return path


def with_user(url: str, user: str, password: str) -> str:
    """`url` carrying `user:password` (replacing any it had)."""
    scheme, _, rest = redact(url).partition("://")
    return f"{scheme}://{user}:{password}@{rest}"
