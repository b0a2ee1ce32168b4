"""The `/v1` API's HTTP mapping, the token and serving, on a real loopback port asked with
aiohttp's client. The handlers are stubs: the intake and the query engine are tested where
they live; here only the HTTP mapping is.
"""

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from projections.errors import QueryRefused, QueryTimeout
from schemas import ExecutionError, TaskSpec
from schemas.config import HttpConfig
from schemas.errors import ApiError, ConfigError, NatsUnavailable
from schemas.http import Check
from supervisor.daemon.api import create_app, http_token
from supervisor.daemon.http_server import HttpServer, HttpServerError, parse_listen
from supervisor.intake.submit import Submission
from supervisor.observability.metrics import Metrics
from tests.test_http import SPEC, serving

# --- the v1 API ------------------------------------------------------------------------------


class Api:
    """Stub handlers: answer what each test sets, record what they were given."""

    def __init__(self) -> None:
        self.specs: list[TaskSpec] = []
        self.reply: Submission | Exception = Submission("t-1", "c-1", True, stream_seq=1)
        self.tasks: dict[str, Mapping[str, Any]] = {"t-1": {"task_id": "t-1", "state": "running"}}
        self.query_error: Exception | None = None

    async def submit(self, spec: TaskSpec) -> Submission:
        self.specs.append(spec)
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply

    async def task(self, task_id: str, wait_s: float = 0.0) -> Mapping[str, Any] | None:
        return self.tasks.get(task_id)

    async def query(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        if self.query_error is not None:
            raise self.query_error
        return {"columns": ["n"], "rows": [[len(request["sql"])]]}


def _rejection(code: str, type_: str, retryable: bool) -> Submission:
    err = ExecutionError(
        type=type_,  # type: ignore[arg-type]
        code=code,
        message=f"refused: {code}",
        retryable=retryable,
        details={"k": 1},
        task_id="t-1",
    )
    return Submission("t-1", "c-1", False, error=err)


@contextlib.asynccontextmanager
async def api(
    token: str | None = None, **kw: Any
) -> AsyncIterator[tuple[Api, aiohttp.ClientSession]]:
    handlers = Api()
    async with serving(
        create_app(metrics=Metrics(), readiness={}, handlers=handlers, token=token, **kw)  # type: ignore[arg-type]
    ) as client:
        yield handlers, client


async def _call(
    client: aiohttp.ClientSession, method: str, path: str, **kw: Any
) -> tuple[int, Any]:
    async with client.request(method, path, **kw) as r:
        assert r.content_type == "application/json"
        return r.status, await r.json()


async def test_an_accepted_task_is_202_with_its_ids() -> None:
    async with api() as (handlers, client):
        reply = await _call(client, "POST", "/v1/tasks", json={**SPEC, "priority": "high"})

    assert reply == (202, {"task_id": "t-1", "correlation_id": "c-1", "status": "queued"})
    assert [(s.image, s.priority) for s in handlers.specs] == [
        ("supervisor-sandbox:busybox", "high")
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "spec"),
        (b'{"command": ["true"]}', "spec"),
        (
            b'{"image": "x", "command": ["true"], "limits": {"memory_mb": "lots"}}',
            "limits.memory_mb",
        ),
    ],
)
async def test_an_invalid_spec_is_400_and_never_reaches_the_intake(body: bytes, field: str) -> None:
    async with api() as (handlers, client):
        status, doc = await _call(client, "POST", "/v1/tasks", data=body)

    assert status == 400
    assert (doc["error"]["type"], doc["error"]["code"], doc["error"]["field"]) == (
        "validation",
        "INVALID_SPEC",
        field,
    )
    assert doc["error"]["message"].startswith(f"invalid spec: {field}: ")
    assert handlers.specs == []


@pytest.mark.parametrize(
    ("code", "type_", "retryable", "status"),
    [
        ("QUEUE_FULL", "resource", True, 429),
        ("INVALID_SPEC", "validation", False, 400),
        ("POLICY_VIOLATION", "security", False, 403),
        ("HOST_PRESSURE", "resource", True, 503),
    ],
)
async def test_a_refused_task_answers_with_the_catalogue_error(
    code: str, type_: str, retryable: bool, status: int
) -> None:
    async with api() as (handlers, client):
        handlers.reply = _rejection(code, type_, retryable)
        async with client.post("/v1/tasks", json=SPEC) as r:
            got = (r.status, await r.json(), r.headers.get("Retry-After"))

    assert got == (
        status,
        {
            "error": {
                "type": type_,
                "code": code,
                "message": f"refused: {code}",
                "details": {"k": 1},
                "retryable": retryable,
                "task_id": "t-1",
            }
        },
        "1" if code == "QUEUE_FULL" else None,
    )


async def test_nats_down_at_submit_is_503() -> None:
    async with api() as (handlers, client):
        handlers.reply = NatsUnavailable("jetstream", "task.submitted could not be made durable")
        reply = await _call(client, "POST", "/v1/tasks", json=SPEC)

    assert reply == (
        503,
        {
            "error": {
                "type": "infrastructure",
                "code": "NATS_UNAVAILABLE",
                "retryable": True,
                "message": "NATS at jetstream is unreachable: task.submitted could not be made durable",
            }
        },
    )


async def test_a_task_is_found_or_404() -> None:
    async with api() as (_, client):
        found = await _call(client, "GET", "/v1/tasks/t-1")
        missing = await _call(client, "GET", "/v1/tasks/t-404")

    assert found == (200, {"task_id": "t-1", "state": "running"})
    assert missing == (
        404,
        {"error": {"type": "validation", "code": "TASK_NOT_FOUND", "message": "no task 't-404'"}},
    )


async def test_query_passes_the_body_and_maps_the_read_sides_errors() -> None:
    async with api() as (handlers, client):
        ok = await _call(client, "POST", "/v1/query", json={"sql": "SELECT 1"})
        not_object = await _call(client, "POST", "/v1/query", json=["SELECT 1"])
        handlers.query_error = QueryRefused("only one SELECT is allowed")
        refused = await _call(client, "POST", "/v1/query", json={"sql": "DROP TABLE tasks"})
        handlers.query_error = QueryTimeout(5.0)
        slow = await _call(client, "POST", "/v1/query", json={"sql": "SELECT 1"})
        handlers.query_error = ApiError(409, "validation", "CONFLICT", "try later", hint="x")
        precise = await _call(client, "POST", "/v1/query", json={"sql": "SELECT 1"})
        handlers.query_error = KeyError("bug")
        bug = await _call(client, "POST", "/v1/query", json={"sql": "SELECT 1"})

    assert ok == (200, {"columns": ["n"], "rows": [[8]]})
    assert not_object == (
        400,
        {
            "error": {
                "type": "validation",
                "code": "INVALID_QUERY",
                "message": "the body must be a JSON object",
            }
        },
    )
    assert refused == (
        400,
        {
            "error": {
                "type": "validation",
                "code": "QUERY_REFUSED",
                "message": "query refused: only one SELECT is allowed",
            }
        },
    )
    assert slow == (
        504,
        {
            "error": {
                "type": "timeout",
                "code": "QUERY_TIMEOUT",
                "message": "query interrupted after its time limit of 5s",
            }
        },
    )
    assert precise == (
        409,
        {"error": {"type": "validation", "code": "CONFLICT", "message": "try later", "hint": "x"}},
    )
    assert bug == (
        500,
        {"error": {"type": "infrastructure", "code": "INTERNAL", "message": "internal error"}},
    )


async def test_routing_errors_are_json_too() -> None:
    async with api(max_body_bytes=1024) as (_, client):
        nowhere = await _call(client, "GET", "/v2/nothing")
        async with client.get("/v1/query") as r:
            wrong_method = (r.status, await r.json(), r.headers.get("Allow"))
        too_big = await _call(client, "POST", "/v1/tasks", data=b"x" * 4096)

    assert nowhere == (
        404,
        {"error": {"type": "validation", "code": "NOT_FOUND", "message": "Not Found"}},
    )
    assert wrong_method == (
        405,
        {
            "error": {
                "type": "validation",
                "code": "METHOD_NOT_ALLOWED",
                "message": "Method Not Allowed",
            }
        },
        "POST",
    )
    assert too_big[0] == 413
    assert too_big[1]["error"]["code"] == "BODY_TOO_LARGE"


# --- the token ---------------------------------------------------------------------------------


async def test_the_token_guards_v1_only() -> None:
    async with api(token="s3cret") as (handlers, client):
        missing = await _call(client, "POST", "/v1/tasks", json=SPEC)
        async with client.get("/v1/tasks/t-1", headers={"Authorization": "Bearer wrong"}) as r:
            wrong = (r.status, r.headers["WWW-Authenticate"])
        good = await _call(
            client, "POST", "/v1/tasks", json=SPEC, headers={"Authorization": "Bearer s3cret"}
        )
        async with client.get("/healthz") as r:
            health = r.status
        async with client.get("/metrics") as r:
            scrape = r.status

    assert missing == (
        401,
        {
            "error": {
                "type": "security",
                "code": "UNAUTHORIZED",
                "message": "a valid bearer token is required for /v1",
            }
        },
    )
    assert wrong == (401, 'Bearer realm="supervisor"')
    assert good[0] == 202
    assert len(handlers.specs) == 1
    assert (health, scrape) == (200, 200)


# --- serving ---------------------------------------------------------------------------------


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8787") == ("127.0.0.1", 8787)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8787", "localhost", ":80", "host:port"):
        with pytest.raises(Exception, match="is not HOST:PORT"):
            parse_listen(bad)


async def test_a_taken_port_is_a_clear_error() -> None:
    first = HttpServer(create_app(metrics=Metrics(), readiness={}), "127.0.0.1:0")
    await first.start()
    try:
        second = HttpServer(create_app(metrics=Metrics(), readiness={}), f"127.0.0.1:{first.port}")
        with pytest.raises(HttpServerError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            await second.start()
    finally:
        await first.stop()


async def test_readyz_shows_no_file_path_in_its_reasons() -> None:
    async def failing() -> Check:
        return Check(
            ok=False,
            reason="cannot open /srv/supervisor/data/projection.duckdb: busy",
            details={"where": "/srv/supervisor/data/outbox/abc.log"},
        )

    app = create_app(metrics=Metrics(), readiness={"projection": failing}, token="t0k")
    async with serving(app) as client:
        async with client.get("/readyz") as r:
            doc = await r.json()
        async with client.get("/v1/readyz") as anonymous:
            refused = anonymous.status
        async with client.get("/v1/readyz", headers={"Authorization": "Bearer t0k"}) as full:
            whole = await full.json()

    assert (r.status, doc["checks"]["projection"]) == (
        503,
        {
            "ok": False,
            "reason": "cannot open <path>: busy",
            "where": "<path>",
        },
    )
    # The reasons whole, for whoever holds the token.
    assert refused == 401
    assert (full.status, whole["checks"]["projection"]) == (
        503,
        {
            "ok": False,
            "reason": "cannot open /srv/supervisor/data/projection.duckdb: busy",
            "where": "/srv/supervisor/data/outbox/abc.log",
        },
    )


def test_the_token_may_come_from_a_file(tmp_dir: Path) -> None:
    path = tmp_dir / "token"
    path.write_text("s3cret\n")
    assert http_token(HttpConfig(token_file=str(path))) == "s3cret"
    assert http_token(HttpConfig(token="inline")) == "inline"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        http_token(HttpConfig(token_file=str(path)))
    with pytest.raises(ConfigError, match="not both"):
        http_token(HttpConfig(token="a", token_file=str(path)))
    with pytest.raises(ConfigError, match="No such file"):
        http_token(HttpConfig(token_file=str(tmp_dir / "missing")))
