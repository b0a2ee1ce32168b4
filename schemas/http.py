"""The HTTP API's answers, as Structs: what `supervisor serve` sends, what
`supervisor.client` decodes, and what the OpenAPI document (`docs/openapi.json`) is made
from. Answers may gain fields; a reader ignores what it does not know (no
`forbid_unknown_fields` here, unlike the spec).

At the end, the one port between a host of the API (`supervisor serve`'s daemon, a
projection-only host, the projection's own process) and the parts it runs (the
projection, the reconciler's state), declared here so that neither side imports the
other: `ReadHost`, `PartHost` (`supervisor.daemon.extension.DaemonContext` is one)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from msgspec import Meta, Struct

from schemas.spec import ErrorType, Result, TaskSpec


class ApiErrorBody(Struct, kw_only=True):
    """The catalogue's shape of an error. `retryable`, `details`, `task_id`, `field` and
    other keys appear when they say something about this error."""

    type: ErrorType
    code: str
    message: str
    retryable: bool | None = None
    details: dict[str, Any] | None = None
    task_id: str | None = None
    field: str | None = None


class ErrorAnswer(Struct, kw_only=True):
    """Every error answer: `{"error": {...}}`."""

    error: ApiErrorBody


class Submitted(Struct, kw_only=True):
    """`POST /v1/tasks`: 202 `queued` (durably submitted), 200 `known` (the same spec was
    submitted before under this task id)."""

    task_id: str
    correlation_id: str
    status: Literal["queued", "known"]


class TaskRow(Struct, kw_only=True):
    """A task as the projection's `tasks` table holds it (docs/projections.md). Times are
    ISO 8601, UTC."""

    task_id: str
    state: str | None = None
    outcome: Literal["succeeded", "failed", "rejected"] | None = None
    priority: str | None = None
    image: str | None = None
    node_id: str | None = None
    correlation_id: str | None = None
    max_attempts: int | None = None
    attempts: int | None = None
    submitted_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    error_type: str | None = None
    error_code: str | None = None
    duration_s: float | None = None
    submitted_seq: int | None = None
    finished_seq: int | None = None
    terminal_events: int | None = None
    last_seq: int | None = None
    last_event_at: str | None = None
    events: int | None = None


class TaskView(TaskRow, kw_only=True):
    """`GET /v1/tasks/{id}`: the task's row, its `Result` once it has ended (that of the
    terminal event the projection applied), its attempts and errors (rows of `attempts`
    and `errors`), and the stream sequence the projection had applied."""

    result: Result | None = None
    attempt_details: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    projection_seq: int | None = None
    first_seq: int | None = None


class TaskPage(Struct, kw_only=True):
    """`GET /v1/tasks`: one page; `next_cursor` is None on the last."""

    tasks: list[TaskRow]
    next_cursor: str | None = None
    projection_seq: int | None = None


class BatchRequest(Struct, kw_only=True):
    """`POST /v1/tasks/batch`: at most `http.max_batch` specs."""

    tasks: list[TaskSpec]


class BatchItem(Struct, kw_only=True):
    """One spec's answer: the status and body `POST /v1/tasks` would have given."""

    status: int
    body: dict[str, Any]


class BatchAnswer(Struct, kw_only=True):
    results: list[BatchItem]


class Cancelling(Struct, kw_only=True):
    """`DELETE /v1/tasks/{id}`: the cancellation is recorded."""

    task_id: str
    status: Literal["cancelling"]


class QueryRequest(Struct, kw_only=True):
    """`POST /v1/query`: one read-only SQL statement over the projection."""

    sql: str
    max_rows: int | None = None
    timeout_s: float | None = None
    format: Literal["json", "table", "csv"] = "json"


# A row: any JSON values (`items: {}` says so to generators that want every array typed).
Row = Annotated[list[Any], Meta(extra_json_schema={"items": {}})]


class QueryAnswer(Struct, kw_only=True):
    columns: list[str]
    types: list[str]
    rows: list[Row]
    truncated: bool
    seq: int | None = None
    elapsed_s: float = 0.0
    text: str | None = None


class Health(Struct, kw_only=True):
    status: Literal["ok"]


class Readiness(Struct, kw_only=True):
    """`GET /readyz`: each check's `ok` and `reason` (and what else it reports)."""

    ready: bool
    checks: dict[str, dict[str, Any]]


class CallbackBody(Struct, kw_only=True):
    """What is POSTed to a task's `callback_url` once it has ended. `event_id` is the
    terminal event's, the same on every delivery of it: deliveries are at least once, so a
    receiver keeps the ids it has handled."""

    task_id: str
    event: Literal["task.succeeded", "task.failed", "task.rejected"]
    event_id: str
    correlation_id: str
    result: Result


ANSWERS: tuple[type[Struct], ...] = (
    ErrorAnswer,
    Submitted,
    TaskView,
    TaskPage,
    BatchRequest,
    BatchAnswer,
    Cancelling,
    QueryRequest,
    QueryAnswer,
    Health,
    Readiness,
    CallbackBody,
)
"""Every Struct the OpenAPI document names."""


class Check(Struct, frozen=True, kw_only=True):
    """One readiness check (`/readyz`), shared by the daemon and the parts it runs (the
    live projection, the reconciler): `reason` says why in words, `details` in values."""

    ok: bool
    reason: str
    details: dict[str, Any] = {}


CheckFn = Callable[[], Awaitable[Check]]


class ReadHost(Protocol):
    """A host of parts that read: the NATS they read, the data directory their files go
    in, the Prometheus registry (`prometheus_client.CollectorRegistry`) their metrics go
    on, a readiness check for `/readyz`, and a refresh to await before each `/metrics`."""

    @property
    def nats_url(self) -> str: ...

    @property
    def data_dir(self) -> Path: ...

    @property
    def registry(self) -> Any: ...

    def add_check(self, name: str, check: CheckFn) -> None: ...

    def add_scrape_hook(self, hook: Callable[[], Awaitable[None]]) -> None: ...


class PartHost(ReadHost, Protocol):
    """A `ReadHost` that also lends its JetStream context (`nats.js.JetStreamContext`)."""

    @property
    def js(self) -> Any: ...
