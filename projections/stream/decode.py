"""Raw stream messages -> a columnar batch of events, and dead letters. Pure: no I/O.

Each payload is decoded with the contract's own decoder (`schemas.decode_event`), so the
projector accepts exactly what the schemas accept, and dispatched by type (`_EXTRACT`) to
the staging rows of its kind (`STAGING`): the envelope of every event goes to `events`, and
what the projection reads of its body to one narrow table per kind, keyed by `seq`. The
store loads these as Arrow tables; SQL never parses JSON.

A payload that fails gets one of these reasons (the `detail` column says more):

- `undecodable`: not JSON (or not UTF-8), or not a JSON object;
- `unknown_type`: no `type`, or a type the schemas do not define;
- `unsupported_schema_version`: written by a newer schema than this reader knows;
- `invalid_event`: a known type whose fields do not match its schema.

Adding an event type: an entry in `_EXTRACT` naming its kind and the row it contributes
(an existing kind, or a new one in `STAGING` with its Arrow types), then the SQL of
`projections.store.apply` that uses it.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import accumulate
from typing import Any, Final

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from schemas import (
    EVENT_TYPES,
    NO_TASK,
    SCHEMA_VERSION,
    AttemptFinished,
    AttemptStarted,
    CleanupFailed,
    CleanupSucceeded,
    ContainerCreated,
    ContainerExited,
    ContainerStarted,
    ErrorRaised,
    Event,
    KillIssued,
    NodeHeartbeat,
    NodeInventory,
    ReconcileDecision,
    ReconcileOutcome,
    ResourceAlert,
    ResourceRecovered,
    SupervisorStarted,
    SupervisorStopped,
    TaskFailed,
    TaskRejected,
    TaskSubmitted,
    TaskSucceeded,
    WorkspaceCreated,
    decode_event,
)
from schemas.lifecycle import PROOF_TYPES
from schemas.projected import seen_container, workspace_owner
from schemas.streams import payload_signer

TAGS: Final[dict[type[Event], str]] = {cls: str(cls.__struct_config__.tag) for cls in EVENT_TYPES}
KNOWN_TYPES: Final[frozenset[str]] = frozenset(TAGS.values())

_TS = pa.timestamp("us")
STAGING: Final[dict[str, pa.Schema]] = {
    "batch": pa.schema(
        [
            ("seq", pa.int64()),
            ("subject", pa.string()),
            ("stored_ns", pa.int64()),
            ("type", pa.string()),
            ("event_id", pa.string()),
            ("occurred_at", _TS),
            ("node_id", pa.string()),
            ("instance_id", pa.string()),
            ("task_id", pa.string()),
            ("attempt", pa.int32()),
            ("correlation_id", pa.string()),
            ("schema_version", pa.int32()),
            ("payload", pa.string()),
            # Who signed it (`signer`), judged by the store (`schemas.lifecycle.Keyring`).
            ("proof", pa.string()),
        ]
    ),
    "submitted": pa.schema(
        [
            ("seq", pa.int64()),
            ("priority", pa.string()),
            ("image", pa.string()),
            ("max_attempts", pa.int32()),
        ]
    ),
    "terminal": pa.schema(
        [
            ("seq", pa.int64()),
            ("exit_code", pa.int32()),
            ("error_type", pa.string()),
            ("error_code", pa.string()),
            ("duration_s", pa.float64()),
        ]
    ),
    "attempt": pa.schema(
        [
            ("seq", pa.int64()),
            ("max_attempts", pa.int32()),
            ("outcome", pa.string()),
            ("exit_code", pa.int32()),
            ("error_type", pa.string()),
            ("error_code", pa.string()),
            ("duration_s", pa.float64()),
        ]
    ),
    "container": pa.schema(
        [
            ("seq", pa.int64()),
            ("container_id", pa.string()),
            ("image", pa.string()),
            ("deadline", pa.float64()),
            ("exit_code", pa.int32()),
            ("oom_killed", pa.bool_()),
            ("kill_reason", pa.string()),
        ]
    ),
    "workspace": pa.schema(
        [
            ("seq", pa.int64()),
            ("path", pa.string()),
            ("files", pa.int32()),
            ("bytes", pa.int64()),
        ]
    ),
    "error": pa.schema(
        [
            ("seq", pa.int64()),
            ("error_type", pa.string()),
            ("code", pa.string()),
            ("message", pa.string()),
            ("retryable", pa.bool_()),
            ("container_id", pa.string()),
        ]
    ),
    "cleanup": pa.schema(
        [
            ("seq", pa.int64()),
            ("step", pa.string()),
            ("resource", pa.string()),
            ("duration_s", pa.float64()),
            ("already_gone", pa.bool_()),
            ("reason", pa.string()),
            ("error_class", pa.string()),
        ]
    ),
    "alert": pa.schema(
        [
            ("seq", pa.int64()),
            ("metric", pa.string()),
            ("value", pa.float64()),
            ("threshold", pa.float64()),
        ]
    ),
    "instance": pa.schema(
        [
            ("seq", pa.int64()),
            ("role", pa.string()),
            ("pid", pa.int32()),
            ("timeout_s", pa.float64()),
        ]
    ),
    "inventory": pa.schema(
        [
            ("seq", pa.int64()),
            ("observed_at", _TS),
            ("workspace_root", pa.string()),
            (
                "containers",
                pa.list_(
                    pa.struct(
                        [
                            ("container_id", pa.string()),
                            ("state", pa.string()),
                            ("created_at", _TS),
                            ("task_id", pa.string()),
                            ("attempt", pa.int32()),
                            ("instance_id", pa.string()),
                            ("deadline", _TS),
                            ("managed", pa.bool_()),
                            ("label_node", pa.string()),
                        ]
                    )
                ),
            ),
            (
                "workspaces",
                pa.list_(
                    pa.struct(
                        [
                            ("path", pa.string()),
                            ("created_at", _TS),
                            ("task_id", pa.string()),
                            ("attempt", pa.int32()),
                        ]
                    )
                ),
            ),
        ]
    ),
    "decision": pa.schema(
        [
            ("seq", pa.int64()),
            ("rule", pa.string()),
            ("resource_kind", pa.string()),
            ("resource", pa.string()),
            ("evidence_seqs", pa.list_(pa.int64())),
            ("command_id", pa.string()),
            ("dry_run", pa.bool_()),
            ("action", pa.string()),
            ("reason", pa.string()),
            ("resource_task_id", pa.string()),
            ("resource_attempt", pa.int32()),
            ("since", _TS),
        ]
    ),
    "outcome": pa.schema(
        [
            ("seq", pa.int64()),
            ("command_id", pa.string()),
            ("outcome", pa.string()),
            ("final", pa.bool_()),
            ("delivery", pa.int32()),
            ("rule", pa.string()),
            ("action", pa.string()),
            ("resource_kind", pa.string()),
            ("resource", pa.string()),
            ("detail", pa.string()),
        ]
    ),
}
"""Each staging table (registered as `_<kind>` while a batch is applied) and its columns.
`batch` holds every valid event's envelope and payload; the others what the projection
reads of each kind's body."""

DEAD_SCHEMA: Final = pa.schema(
    [
        ("seq", pa.int64()),
        ("subject", pa.string()),
        ("stored_ns", pa.int64()),
        ("data", pa.binary()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


class _Probe(msgspec.Struct):
    """Just enough of an envelope to say why a payload was refused."""

    type: object = None
    schema_version: object = None


_probe_decoder = msgspec.json.Decoder(_Probe)


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    subject: str
    stored_ns: int
    data: bytes
    reason: str
    detail: str


@dataclass
class Batch:
    """Messages of one stream range, in stream order. `rows[kind]` are tuples in the column
    order of `STAGING[kind]`; `repeats` counts events dropped because their `event_id`
    appeared earlier in the same batch; `last_seq` is the watermark the batch reaches."""

    rows: dict[str, list[tuple[Any, ...]]] = field(
        default_factory=lambda: {kind: [] for kind in STAGING}
    )
    dead: list[DeadLetter] = field(default_factory=list)
    repeats: int = 0
    last_seq: int = 0

    @property
    def events(self) -> int:
        return len(self.rows["batch"])

    def __len__(self) -> int:
        return self.events + len(self.dead) + self.repeats


def refusal(data: bytes, error: Exception) -> tuple[str, str]:
    """(reason, detail) for a payload `decode_event` refused with `error`."""
    try:
        probe = _probe_decoder.decode(data)
    except (msgspec.DecodeError, ValueError) as e:
        return "undecodable", str(e)
    if not isinstance(probe.type, str) or probe.type not in KNOWN_TYPES:
        return "unknown_type", f"type {probe.type!r} is not in the schemas"
    version = probe.schema_version
    if isinstance(version, int) and version > SCHEMA_VERSION:
        return "unsupported_schema_version", f"schema_version {version} > {SCHEMA_VERSION}"
    return "invalid_event", str(error)


def decode_batch(
    seqs: list[int], subjects: list[str], stored_ns: list[int], datas: list[bytes]
) -> Batch:
    """Validate and sort one range of messages (four parallel lists, in stream order).
    Never raises for a bad payload: it becomes a dead letter. An `event_id` seen earlier in
    the batch is dropped; repeats of earlier batches are the store's to drop."""
    batch = Batch(last_seq=seqs[-1] if seqs else 0)
    rows = batch.rows
    envelopes = rows["batch"]
    ids: set[str] = set()
    for seq, subject, ns, data in zip(seqs, subjects, stored_ns, datas, strict=True):
        try:
            ev = decode_event(data)
        except (msgspec.DecodeError, ValueError) as e:
            reason, detail = refusal(data, e)
            batch.dead.append(DeadLetter(seq, subject, ns, data, reason, detail))
            continue
        if not 1 <= ev.schema_version <= SCHEMA_VERSION:
            detail = f"schema_version {ev.schema_version} not in 1..{SCHEMA_VERSION}"
            batch.dead.append(
                DeadLetter(seq, subject, ns, data, "unsupported_schema_version", detail)
            )
            continue
        if ev.event_id in ids:
            batch.repeats += 1
            continue
        ids.add(ev.event_id)
        extract = _EXTRACT.get(type(ev))
        if extract is not None:
            rows[extract[0]].append((seq, *extract[1](ev)))
        envelopes.append(
            (
                seq,
                subject,
                ns,
                TAGS[type(ev)],
                ev.event_id,
                ev.occurred_at,
                ev.node_id,
                ev.instance_id,
                ev.task_id or NO_TASK,
                ev.attempt,
                ev.correlation_id,
                ev.schema_version,
                data,
                signer(data) if TAGS[type(ev)] in PROOF_TYPES else None,
            )
        )
    return batch


UNSIGNED: Final = "-"
BAD_SIGNATURE: Final = "!"


def signer(data: bytes) -> str:
    """The staged `proof` of an event whose signature is checked, before the store judges
    it: the public key whose signature verifies, `BAD_SIGNATURE` or `UNSIGNED`."""
    key = payload_signer(data)
    return UNSIGNED if key is None else key or BAD_SIGNATURE


def _result(ev: TaskSucceeded | TaskFailed) -> tuple[Any, ...]:
    r = ev.result
    e = r.error
    return (r.exit_code, e and e.type, e and e.code, r.duration_s)


def _rejected(ev: TaskRejected) -> tuple[Any, ...]:
    e, r = ev.error, ev.result
    return (r and r.exit_code, e.type, e.code, r and r.duration_s)


def _inventory(ev: NodeInventory) -> tuple[Any, ...]:
    """The listing's time and root, and its containers (labels parsed) and workspaces (owner
    parsed from the dir name) as lists of structs, unnested by SQL."""
    containers = []
    for c in ev.containers:
        s = seen_container(c.container_id, c.state, c.created, c.labels)
        containers.append(
            {
                "container_id": s.container_id,
                "state": s.state,
                "created_at": s.created_at,
                "task_id": s.task_id,
                "attempt": s.attempt,
                "instance_id": s.instance_id,
                "deadline": s.deadline,
                "managed": s.managed,
                "label_node": s.node_id,
            }
        )
    workspaces = []
    for w in ev.workspaces:
        task_id, attempt = workspace_owner(w.path)
        workspaces.append(
            {
                "path": w.path,
                "created_at": datetime.fromtimestamp(w.created, UTC),
                "task_id": task_id,
                "attempt": attempt,
            }
        )
    return (ev.observed_at or ev.occurred_at, ev.workspace_root, containers, workspaces)


# What the projection reads of each type's body: type -> (staging kind, row after `seq`).
# A dict rather than `match`: this runs once per event in the projector's hot loop, and a
# match statement tries its cases in order (it cost three times as much).
_EXTRACT: Final[dict[type[Event], tuple[str, Callable[[Any], tuple[Any, ...]]]]] = {
    CleanupSucceeded: (
        "cleanup",
        lambda e: (e.step, e.resource, e.duration_s, e.already_gone, None, None),
    ),
    CleanupFailed: (
        "cleanup",
        lambda e: (e.step, e.resource, e.duration_s, False, e.reason, e.error_class),
    ),
    ContainerCreated: (
        "container",
        lambda e: (e.container_id, e.image, e.deadline, None, None, None),
    ),
    ContainerStarted: ("container", lambda e: (e.container_id, None, None, None, None, None)),
    ContainerExited: (
        "container",
        lambda e: (e.container_id, None, None, e.exit_code, e.evidence.oom_killed, None),
    ),
    KillIssued: ("container", lambda e: (e.container_id, None, None, None, None, e.reason)),
    AttemptStarted: ("attempt", lambda e: (e.max_attempts, None, None, None, None, None)),
    AttemptFinished: (
        "attempt",
        lambda e: (None, e.outcome, e.exit_code, e.error_type, e.error_code, e.duration_s),
    ),
    WorkspaceCreated: ("workspace", lambda e: (e.path, e.files, e.bytes)),
    TaskSubmitted: ("submitted", lambda e: (e.priority, e.spec.image, e.spec.retry.max_attempts)),
    TaskSucceeded: ("terminal", _result),
    TaskFailed: ("terminal", _result),
    TaskRejected: ("terminal", _rejected),
    ErrorRaised: (
        "error",
        lambda e: (e.error_type, e.code, e.message, e.retryable, e.container_id),
    ),
    ResourceAlert: ("alert", lambda e: (e.metric, e.value, e.threshold)),
    ResourceRecovered: ("alert", lambda e: (e.metric, e.value, e.threshold)),
    SupervisorStarted: ("instance", lambda e: (e.role, e.pid, None)),
    SupervisorStopped: ("instance", lambda e: (None, None, None)),
    NodeHeartbeat: ("instance", lambda e: (e.role, None, e.timeout_s)),
    NodeInventory: ("inventory", _inventory),
    ReconcileDecision: (
        "decision",
        lambda e: (
            e.rule,
            e.resource_kind,
            e.resource,
            list(e.evidence_seqs),
            e.command_id,
            e.dry_run,
            e.action,
            e.reason,
            e.resource_task_id,
            e.resource_attempt,
            e.since,
        ),
    ),
    ReconcileOutcome: (
        "outcome",
        lambda e: (
            e.command_id,
            e.outcome,
            e.final,
            e.delivery,
            e.rule,
            e.action,
            e.resource_kind,
            e.resource,
            e.detail,
        ),
    ),
}
"""Types absent here (task.retry_scheduled, breaker.*, resource.sample) are kept in
`events` only."""


@dataclass(frozen=True)
class Staged:
    """A batch as the store loads it: one Arrow table per staging kind, the dead letters,
    and the counts that do not need the database."""

    tables: dict[str, pa.Table]
    dead: pa.Table
    events: int
    repeats: int
    last_seq: int


def stage(batch: Batch) -> Staged:
    """Turn the rows of `batch` into Arrow tables (no database needed)."""
    tables = {kind: to_arrow(kind, rows) for kind, rows in batch.rows.items()}
    dead = to_arrow(
        "dead", [(d.seq, d.subject, d.stored_ns, d.data, d.reason, d.detail) for d in batch.dead]
    )
    return Staged(tables, dead, batch.events, batch.repeats, batch.last_seq)


def seq_position(token_count: int) -> int:
    """Where the stream sequence is among the dot-separated tokens of a JetStream
    delivery's reply subject: `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.
    <pending>` (v1, 9 tokens), or with the domain and account hash before the stream (v2).
    The consumer sequence, the stored-at time (ns) and the pending count follow it."""
    return 5 if token_count == 9 else 7


def reply_tokens(reply: str) -> tuple[list[str], int]:
    """A reply subject's tokens and `seq_position` in them."""
    tokens = reply.split(".")
    return tokens, seq_position(len(tokens))


def parse_reply(reply: str) -> tuple[int, int, int]:
    """(stream sequence, stored-at in ns since the epoch, messages pending) from a
    JetStream delivery's reply subject (both the v1 and the v2, domain-aware, layouts)."""
    tokens, base = reply_tokens(reply)
    return int(tokens[base]), int(tokens[base + 2]), int(tokens[base + 3])


def parse_replies(replies: list[str]) -> tuple[list[int], list[int]]:
    """`parse_reply` of many at once, in Arrow: (stream sequences, stored-at ns). One
    server answers in one layout; a batch mixing both is parsed one by one."""
    tokens = pc.split_pattern(pa.array(replies, pa.string()), ".")
    lengths = pc.unique(pc.list_value_length(tokens)).to_pylist()
    if len(lengths) != 1 or lengths[0] < 9:
        parsed = [parse_reply(r) for r in replies]
        return [p[0] for p in parsed], [p[1] for p in parsed]
    base = seq_position(lengths[0])
    seqs = pc.cast(pc.list_element(tokens, base), pa.int64()).to_pylist()
    stored = pc.cast(pc.list_element(tokens, base + 2), pa.int64()).to_pylist()
    return seqs, stored


def stage_raw(replies: list[str], subjects: list[str], datas: list[bytes]) -> Staged:
    """JetStream deliveries (reply subjects, subjects, payloads) -> a staged batch."""
    if not replies:
        return stage(decode_batch([], [], [], []))
    seqs, stored = parse_replies(replies)
    return stage(decode_batch(seqs, subjects, stored, datas))


def to_arrow(kind: str, rows: list[tuple[Any, ...]]) -> pa.Table:
    """The rows of one kind as an Arrow table of `STAGING[kind]` (or `DEAD_SCHEMA`)."""
    schema = DEAD_SCHEMA if kind == "dead" else STAGING[kind]
    if not rows:
        return schema.empty_table()
    columns = list(zip(*rows, strict=True))
    arrays = [_array(col, f) for col, f in zip(columns, schema, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


def _array(values: tuple[Any, ...], f: pa.Field) -> pa.Array:
    if f.name == "payload":
        return _text(values)
    return pa.array(values, f.type)


def _text(values: tuple[bytes, ...]) -> pa.Array:
    """Validated UTF-8 JSON payloads as a string column: one join and the offsets, not a
    converter call per value (that one grows its buffer value by value, on fresh memory
    for each batch of a replay, at several times the cost)."""
    try:
        offsets = array("i", accumulate(map(len, values), initial=0))
    except OverflowError:  # over 2 GiB: the converter splits it into chunks
        return pa.array(values, pa.binary()).view(pa.string())
    return pa.StringArray.from_buffers(
        len(values), pa.py_buffer(offsets), pa.py_buffer(b"".join(values))
    )
