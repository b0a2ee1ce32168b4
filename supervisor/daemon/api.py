"""The daemon's HTTP endpoint (aiohttp, in the daemon's own event loop).

Routes:
- `GET /healthz`: 200 `{"status": "ok"}` whenever the loop answers.
- `GET /readyz`: `{"ready": bool, "checks": {name: {"ok", "reason", ...}}}`; 503 unless
  every check passes. Checks run concurrently, each bounded by `check_timeout_s` (a check
  that hangs or raises fails with that as its reason).
- `GET /metrics`: the Prometheus registry, encoded as the client's `Accept` asks
  (`prometheus_client`'s negotiation: text format by default, OpenMetrics on request).
- `GET /openapi.json`: the OpenAPI 3.1 document of every route (`schemas.openapi`).
- `POST /v1/tasks`, `GET /v1/tasks/{id}`, `POST /v1/query`: served by the injected
  `Handlers` (the daemon's intake and the read side). When a token is configured, `/v1/*`
  requires `Authorization: Bearer <token>`.

Every error is JSON in the catalogue's shape, `{"error": {"type", "code", "message", ...}}`:
400 INVALID_SPEC (and other validation errors), 401 UNAUTHORIZED, 403 POLICY_VIOLATION,
404 NOT_FOUND / TASK_NOT_FOUND, 405 METHOD_NOT_ALLOWED, 409 DUPLICATE_TASK_ID,
413 BODY_TOO_LARGE, 429 QUEUE_FULL, 507 DISK_FULL,
503 for what is retryable later (NATS_UNAVAILABLE, DOCKER_UNAVAILABLE, CIRCUIT_OPEN,
HOST_PRESSURE, ...), 504 QUERY_TIMEOUT, 500 INTERNAL. Handlers raise the project's
exceptions (or `ApiError` for a precise answer); the read side's classes are recognised by
their stable `tag`, since this package must not import `projections`.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import msgspec
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from schemas import ExecutionError, TaskSpec
from schemas.config import HttpConfig, inline_or_file
from schemas.errors import (
    ApiError,
    DockerUnavailable,
    InvalidSpec,
    NatsUnavailable,
    PolicyViolation,
    SupervisorError,
)
from schemas.http import Check, CheckFn
from schemas.openapi import MAX_WAIT_S, TASK_ID_PATTERN, document
from supervisor.daemon.datadir import generated_token
from supervisor.daemon.http_server import body_deadline
from supervisor.observability.metrics import Metrics
from supervisor.policy.admission import decode_spec
from supervisor.policy.breaker import CircuitOpen

log = logging.getLogger("supervisor.daemon.api")

DEFAULT_MAX_BODY = 64 * 1024 * 1024
_encoder = msgspec.json.Encoder()


class Submission(Protocol):
    """What the intake answers (`supervisor.intake.submit.Submission` has this shape)."""

    @property
    def task_id(self) -> str: ...
    @property
    def correlation_id(self) -> str: ...
    @property
    def accepted(self) -> bool: ...
    @property
    def error(self) -> ExecutionError | None: ...
    @property
    def existing(self) -> bool: ...


class Handlers(Protocol):
    """The `/v1` API, provided by the daemon. Each may raise the project's exceptions."""

    async def submit(self, spec: TaskSpec) -> Submission:
        """Queue a decoded spec (validation, policy and queue bound are the intake's)."""
        ...

    async def task(self, task_id: str, wait_s: float = 0.0) -> Mapping[str, Any] | None:
        """The task's current state as JSON-able values; None if it is unknown."""
        ...

    async def query(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        """Run a read-only query described by the request body (a JSON object)."""
        ...

    async def tasks(self, params: Mapping[str, str]) -> Mapping[str, Any]:
        """One page of the tasks matching `params` (state, outcome, correlation_id, since,
        limit, cursor)."""
        ...

    async def cancel(self, task_id: str) -> Mapping[str, Any]:
        """Record the cancellation of a task that has not ended (ApiError 404 / 409)."""
        ...

    def errors(self, params: Mapping[str, str]) -> AsyncIterator[bytes]:
        """The error events matching `params` (type, code, task, since, limit), each the raw
        JSON it was published as, as they arrive. Raises ValueError for a bad filter."""
        ...


def create_app(
    *,
    metrics: Metrics,
    readiness: Mapping[str, CheckFn],
    handlers: Handlers | None = None,
    token: str | None = None,
    check_timeout_s: float = 2.0,
    on_scrape: Callable[[], Awaitable[None] | None] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    max_batch: int = 100,
    body_timeout_s: float = 30.0,
    max_wait_s: float = MAX_WAIT_S,
) -> web.Application:
    """Build the app. `readiness` maps a check name to its check; `handlers` None leaves
    `/v1` unrouted (404); `on_scrape` runs (and is awaited when it is a coroutine function)
    before each `/metrics`: refresh gauges there."""
    app = web.Application(
        middlewares=[_errors, _auth(token), body_deadline(max_body_bytes, body_timeout_s)],
        client_max_size=max_body_bytes,
    )

    async def healthz(_: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readiness_doc(scrub: bool) -> web.Response:
        names = list(readiness)
        results = await asyncio.gather(*(_run_check(readiness[n], check_timeout_s) for n in names))
        checks = dict(zip(names, results, strict=True))
        ready = all(c.ok for c in results)
        metrics.ready.set(1 if ready else 0)
        for name, c in checks.items():
            metrics.ready_check.labels(name).set(1 if c.ok else 0)
        doc = _check_doc if scrub else _full_check_doc
        body = {"ready": ready, "checks": {n: doc(c) for n, c in checks.items()}}
        return json_response(body, status=200 if ready else 503)

    async def readyz(_: web.Request) -> web.Response:
        return await readiness_doc(scrub=True)

    async def readyz_full(_: web.Request) -> web.Response:
        """`/readyz` with the reasons whole (file paths included), behind the token."""
        return await readiness_doc(scrub=False)

    async def metrics_text(request: web.Request) -> web.Response:
        if on_scrape is not None and inspect.isawaitable(pending := on_scrape()):
            await pending
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(metrics.registry), headers={"Content-Type": content_type})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/readyz", readyz_full)
    app.router.add_get("/metrics", metrics_text)

    async def openapi_doc(request: web.Request) -> web.Response:
        """The document as this daemon serves it: its own origin (the one the client
        reached), whether /v1 needs a token, its longest `?wait`."""
        doc = document(
            server=str(request.url.origin()),
            token_required=token is not None,
            max_wait_s=max_wait_s,
        )
        return web.Response(body=_encoder.encode(doc), content_type="application/json")

    app.router.add_get("/openapi.json", openapi_doc)
    if handlers is not None:
        _Api(handlers, max_batch, max_wait_s).add_to(app)
    return app


class _Api:
    """The `/v1` routes over the injected `Handlers`: each route one method."""

    def __init__(self, handlers: Handlers, max_batch: int, max_wait_s: float) -> None:
        self.handlers = handlers
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v1/errors", self.errors)
        app.router.add_post("/v1/tasks", self.submit)
        app.router.add_post("/v1/tasks/batch", self.batch)
        app.router.add_get("/v1/tasks", self.tasks)
        # Only a task id matches (`batch` excepted): another path is a 404 at once, and the
        # batch route's Allow header is its own.
        one_task = "/v1/tasks/{task_id:" + TASK_ID_PATTERN.strip("^$") + "}"
        app.router.add_get(one_task, self.task)
        app.router.add_delete(one_task, self.cancel)
        app.router.add_post("/v1/query", self.query)

    async def submit(self, request: web.Request) -> web.Response:
        return await self.submit_one(await request.read())

    async def batch(self, request: web.Request) -> web.Response:
        """`{"tasks": [spec, ...]}`, at most `self.max_batch`: each spec as `POST /v1/tasks`
        would take it, in order; `{"results": [{"status": <its HTTP status>, "body": <its
        answer>}, ...]}`, 200 whatever each item's outcome."""
        try:
            doc = msgspec.json.decode(await request.read())
        except msgspec.DecodeError as e:
            raise ApiError(400, "validation", "INVALID_SPEC", f"batch: not JSON: {e}") from e
        specs = doc.get("tasks") if isinstance(doc, dict) else None
        if not isinstance(specs, list) or not specs or set(doc) != {"tasks"}:
            raise ApiError(
                400, "validation", "INVALID_SPEC", 'batch: the body must be {"tasks": [spec, ...]}'
            )
        if len(specs) > self.max_batch:
            raise ApiError(
                413,
                "validation",
                "BATCH_TOO_LARGE",
                f"batch: {len(specs)} tasks, at most {self.max_batch} (http.max_batch)",
            )
        results = []
        for spec in specs:
            try:
                answer = await self.submit_one(msgspec.json.encode(spec))
            except SupervisorError as e:
                answer = error_response(e)
            assert isinstance(answer.body, bytes)
            results.append({"status": answer.status, "body": msgspec.json.decode(answer.body)})
        return json_response({"results": results})

    async def submit_one(self, body: bytes) -> web.Response:
        spec = decode_spec(body)
        sub = await self.handlers.submit(spec)
        if sub.accepted:
            doc = {
                "task_id": sub.task_id,
                "correlation_id": sub.correlation_id,
                "status": "known" if sub.existing else "queued",
            }
            return json_response(doc, status=200 if sub.existing else 202)
        err = sub.error
        if err is None:
            raise ApiError(500, "infrastructure", "INTERNAL", "the intake refused without a reason")
        headers = {"Retry-After": "1"} if err.code == "QUEUE_FULL" else None
        return _error(
            _status_for_code(err.code, err.retryable),
            err.type,
            err.code,
            err.message,
            headers=headers,
            details=err.details,
            retryable=err.retryable,
            task_id=sub.task_id,
        )

    async def tasks(self, request: web.Request) -> web.Response:
        return json_response(await self.handlers.tasks(request.query))

    async def cancel(self, request: web.Request) -> web.Response:
        return json_response(await self.handlers.cancel(request.match_info["task_id"]), status=202)

    async def task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        wait_s = _wait_param(request.query.get("wait"), self.max_wait_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        pause = WAIT_POLL_MIN_S
        while True:
            # A read side that can wait answers once the task has ended (or when the wait
            # is over); one that cannot answers at once, and this loop asks again.
            doc = await self.handlers.task(task_id, max(deadline - loop.time(), 0.0))
            left = deadline - loop.time()
            if (doc is not None and doc.get("outcome") is not None) or left <= 0:
                break
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, WAIT_POLL_MAX_S)
        if doc is None:
            raise ApiError(404, "validation", "TASK_NOT_FOUND", f"no task {task_id!r}")
        return json_response(doc)

    async def query(self, request: web.Request) -> web.Response:
        return json_response(await self.handlers.query(await query_body(request)))

    async def errors(self, request: web.Request) -> web.StreamResponse:
        try:
            events = self.handlers.errors(dict(request.query))
            first = asyncio.ensure_future(anext(events))
            await asyncio.wait([first], timeout=0.05)  # a bad filter fails before the 200
            failed = first.exception() if first.done() else None
            if isinstance(failed, ValueError):
                raise ApiError(400, "validation", "INVALID_QUERY", str(failed))
            if failed is not None and not isinstance(failed, StopAsyncIteration):
                raise failed
        except ValueError as e:
            raise ApiError(400, "validation", "INVALID_QUERY", str(e)) from e
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            line = await first  # StopAsyncIteration: the stream ended at once
            while True:
                await resp.write(line + b"\n")
                line = await anext(events)
        except (StopAsyncIteration, ConnectionResetError):
            pass
        finally:
            first.cancel()
            await events.aclose()  # type: ignore[attr-defined]
        return resp


async def _run_check(fn: CheckFn, timeout_s: float) -> Check:
    try:
        async with asyncio.timeout(timeout_s):
            return await fn()
    except TimeoutError:
        return Check(ok=False, reason=f"no answer within {timeout_s:g}s")
    except Exception as e:
        log.exception("readiness check failed")
        return Check(ok=False, reason=f"the check raised {type(e).__name__}: {e}")


# An absolute path of two parts or more: what `/readyz`, which anyone may read, never shows
# (the full reason goes to the log).
_PATH_RE = re.compile(r"(?<![\w.])/(?:[^\s/:'\",;()\[\]]+/)+[^\s/:'\",;()\[\]]*")


def without_paths(text: str) -> str:
    return _PATH_RE.sub("<path>", text)


def _full_check_doc(c: Check) -> dict[str, Any]:
    return {"ok": c.ok, "reason": c.reason, **c.details}


def _check_doc(c: Check) -> dict[str, Any]:
    if not c.ok and c.reason and _PATH_RE.search(c.reason):
        log.debug("readiness: %s", c.reason)
    details = {k: without_paths(v) if isinstance(v, str) else v for k, v in c.details.items()}
    return {"ok": c.ok, "reason": without_paths(c.reason), **details}


async def query_body(request: web.Request) -> dict[str, Any]:
    """The JSON object of a `/v1/query` request. Raises ApiError 400 INVALID_QUERY."""
    try:
        body = msgspec.json.decode(await request.read())
    except msgspec.DecodeError as e:
        raise ApiError(400, "validation", "INVALID_QUERY", f"not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "validation", "INVALID_QUERY", "the body must be a JSON object")
    return body


# --- errors and auth --------------------------------------------------------------------------


def json_response(
    doc: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """`doc` as a JSON answer."""
    return web.Response(
        body=_encoder.encode(doc), status=status, headers=headers, content_type="application/json"
    )


def _error(
    status: int,
    type: str,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    return json_response(
        {"error": {"type": type, "code": code, "message": message, **extra}},
        status=status,
        headers=headers,
    )


def _status_for_code(code: str, retryable: bool) -> int:
    if code == "QUEUE_FULL":
        return 429
    if code == "POLICY_VIOLATION":
        return 403
    if code == "DUPLICATE_TASK_ID":
        return 409
    if code == "DISK_FULL":
        return 507
    return 503 if retryable else 400


# The read side's errors, by their stable tag: status, type, code.
_TAGS: dict[str, tuple[int, str, str]] = {
    "query_refused": (400, "validation", "QUERY_REFUSED"),
    "query_failed": (400, "validation", "QUERY_FAILED"),
    "projection_damaged": (503, "infrastructure", "PROJECTION_DAMAGED"),
    "query_memory": (507, "resource", "QUERY_MEMORY"),
    "query_timeout": (504, "timeout", "QUERY_TIMEOUT"),
    "stream_unavailable": (503, "infrastructure", "STREAM_UNAVAILABLE"),
}
_HTTP_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    413: "BODY_TOO_LARGE",
}


def error_response(e: SupervisorError) -> web.Response:
    """The catalogue-shaped answer for one of the project's exceptions."""
    match e:
        case ApiError():
            return _error(e.status, e.type, e.code, e.message, **e.details)
        case InvalidSpec():
            return _error(400, "validation", "INVALID_SPEC", str(e), field=e.field)
        case PolicyViolation():
            return _error(403, "security", "POLICY_VIOLATION", str(e), field=e.request)
        case NatsUnavailable():
            return _error(503, "infrastructure", "NATS_UNAVAILABLE", str(e), retryable=True)
        case CircuitOpen():
            return _error(503, "infrastructure", "CIRCUIT_OPEN", str(e), retryable=True)
        case DockerUnavailable():
            return _error(503, "infrastructure", "DOCKER_UNAVAILABLE", str(e), retryable=True)
    if e.tag in _TAGS:
        status, type_, code = _TAGS[e.tag]
        return _error(status, type_, code, str(e))
    log.error("request failed: %s", e)
    return _error(500, "infrastructure", "INTERNAL", str(e))


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except SupervisorError as e:
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, f"HTTP_{e.status}")
        return _error(e.status, "validation", code, e.reason, headers=_allow_header(e))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return _error(500, "infrastructure", "INTERNAL", "internal error")


def _allow_header(e: web.HTTPException) -> dict[str, str] | None:
    allow = e.headers.get("Allow")
    return {"Allow": allow} if allow else None


def _auth(token: str | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if expected is not None and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(
                    401,
                    "security",
                    "UNAUTHORIZED",
                    "a valid bearer token is required for /v1",
                    headers={"WWW-Authenticate": 'Bearer realm="supervisor"'},
                )
        return await handler(request)

    return auth


WAIT_POLL_MIN_S, WAIT_POLL_MAX_S = 0.02, 0.1
"""How often a waiting request reads the task again: from 20 ms, doubling up to 0.1 s, so
an answer comes at most 0.1 s after the projection applied the task's end (one keyed read of
`tasks` each time; the projection itself applies a live batch within a few hundred ms)."""


def _wait_param(text: str | None, max_wait_s: float) -> float:
    """`?wait=S`: seconds to hold the request until the task has ended (0 to
    `http.max_wait_s`)."""
    if text is None:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= max_wait_s:  # also refuses nan
        raise ApiError(
            400,
            "validation",
            "INVALID_QUERY",
            f"wait {text[:40]!r}: seconds from 0 to {max_wait_s:g}",
        )
    return value


def http_token(cfg: HttpConfig, data_dir: Path | None = None) -> str | None:
    """The bearer token: `token`, else the first line of `token_file`, else (given the data
    dir) the one made there at the first start (`generated_token`). Raises ConfigError
    when both are set, or the file cannot be read or is empty."""
    configured = inline_or_file(cfg.token, cfg.token_file, "http.token")
    if configured is not None or data_dir is None:
        return configured
    return generated_token(data_dir)
