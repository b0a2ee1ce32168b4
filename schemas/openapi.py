"""The OpenAPI 3.1 document of the HTTP API, made from the contract's Structs (their JSON
Schemas are the components), so the document cannot drift from what the code decodes.
`supervisor serve` answers it at `GET /openapi.json`; `docs/openapi.json` is a copy
(`python -m schemas.openapi` rewrites it; a test holds the two equal).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from schemas.events import ErrorRaised
from schemas.http import ANSWERS
from schemas.spec import Result, TaskSpec

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
_REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "a bad request, spec or query",
        401: "the bearer token is missing or wrong",
        403: "security/POLICY_VIOLATION",
        404: "no such task (TASK_NOT_FOUND)",
        409: "a conflict (DUPLICATE_TASK_ID, TASK_ENDED)",
        413: "the body or batch is too large",
        429: "resource/QUEUE_FULL (Retry-After: 1)",
        503: "retryable: NATS, the projection or this role is unavailable",
        504: "timeout/QUERY_TIMEOUT",
        507: "resource/DISK_FULL or QUERY_MEMORY",
    }
    out = {str(s): _json(_ref("ErrorAnswer"), reasons[s]) for s in statuses}
    out["default"] = _json(_ref("ErrorAnswer"), "any other error, in the catalogue's shape")
    return out


def _param(name: str, where: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": description,
    }


TASK_ID_PATTERN = r"^(?!batch$)[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
"""A task id in a path: a spec's `task_id` (`schemas.spec.Token`), `batch` excepted (that
is the batch route's own name)."""

_TASK_ID = _param(
    "task_id", "path", {"type": "string", "pattern": TASK_ID_PATTERN}, "the task's id"
)
_V1: list[dict[str, list[str]]] = [{"bearer": []}]


def _paths(max_wait_s: float) -> dict[str, Any]:
    string = {"type": "string"}
    listing = [
        _param("state", "query", string, "a task state (submitted, running, succeeded, ...)"),
        _param("outcome", "query", {"enum": ["succeeded", "failed", "rejected"]}, "outcome"),
        _param("correlation_id", "query", string, "the submitter's correlation id"),
        _param("since", "query", string, "an ISO time, or a duration back: 90s, 10m, 2h, 7d"),
        _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}, "page size"),
        _param("cursor", "query", string, "the previous page's next_cursor"),
    ]
    error_filters = [
        _param("type", "query", string, "an error type"),
        _param("code", "query", string, "an error code"),
        _param("task", "query", string, "a task id"),
        _param("since", "query", string, "history from then first: 10m, 2h or an ISO time"),
        _param("limit", "query", {"type": "integer", "minimum": 1}, "close after N lines"),
    ]
    return {
        "/healthz": {
            "get": {
                "summary": "Liveness: 200 whenever the daemon's loop answers",
                "security": [],
                "responses": {"200": _json(_ref("Health"), "alive")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness, each check with its reason (no file paths shown)",
                "security": [],
                "responses": {
                    "200": _json(_ref("Readiness"), "every check passes"),
                    "503": _json(_ref("Readiness"), "a check fails"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format, or OpenMetrics on request)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "the registry",
                        "content": {"text/plain": {"schema": string}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "the OpenAPI document")},
            }
        },
        "/v1/tasks": {
            "post": {
                "summary": "Submit a task",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("TaskSpec")}},
                },
                "responses": {
                    "202": _json(_ref("Submitted"), "queued: task.submitted is durable"),
                    "200": _json(_ref("Submitted"), "known: the same spec under this task id"),
                    **_errors(400, 401, 403, 409, 413, 429, 503, 507),
                },
            },
            "get": {
                "summary": "List tasks, in the order first seen, a page at a time",
                "parameters": listing,
                "responses": {"200": _json(_ref("TaskPage"), "one page"), **_errors(400, 503)},
            },
        },
        "/v1/tasks/batch": {
            "post": {
                "summary": "Submit up to http.max_batch tasks, each answered as POST /v1/tasks",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("BatchRequest")}},
                },
                "responses": {
                    "200": _json(_ref("BatchAnswer"), "one answer per spec, in order"),
                    **_errors(400, 401, 413),
                },
            }
        },
        "/v1/tasks/{task_id}": {
            "parameters": [_TASK_ID],
            "get": {
                "summary": "A task with its Result once it has ended",
                "parameters": [
                    _param(
                        "wait",
                        "query",
                        {"type": "number", "minimum": 0, "maximum": max_wait_s},
                        "hold the request until the task has ended or this many seconds passed",
                    )
                ],
                "responses": {
                    "200": _json(_ref("TaskView"), "the task (result null until it ends)"),
                    **_errors(400, 401, 404, 503),
                },
            },
            "delete": {
                "summary": "Cancel a task that has not ended",
                "responses": {
                    "202": _json(_ref("Cancelling"), "task.cancel_requested is recorded"),
                    **_errors(401, 404, 409, 503),
                },
            },
        },
        "/v1/query": {
            "post": {
                "summary": "One read-only SQL statement over the projection",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("QueryRequest")}},
                },
                "responses": {
                    "200": _json(_ref("QueryAnswer"), "the rows"),
                    **_errors(400, 401, 503, 504, 507),
                },
            }
        },
        "/v1/errors": {
            "get": {
                "summary": "The error stream, live, one error.raised event a line",
                "parameters": error_filters,
                "responses": {
                    "200": {
                        "description": "JSON lines, each an ErrorRaised event",
                        "content": {"application/x-ndjson": {"schema": _ref("ErrorRaised")}},
                    },
                    **_errors(400, 401),
                },
            }
        },
        "/v1/readyz": {
            "get": {
                "summary": "Readiness with the reasons whole",
                "responses": {
                    "200": _json(_ref("Readiness"), "every check passes"),
                    "503": _json(_ref("Readiness"), "a check fails"),
                    **_errors(401),
                },
            }
        },
    }


DEFAULT_SERVER = "http://127.0.0.1:8787"
MAX_WAIT_S = 300.0


def document(
    version: str = "1",
    *,
    server: str = DEFAULT_SERVER,
    token_required: bool = True,
    max_wait_s: float = MAX_WAIT_S,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document, as JSON values (msgspec gives tuple defaults as tuples).
    A daemon serves it with its own `server` URL, says whether /v1 needs a token, and
    gives the longest `?wait` it holds a request for."""
    _, made = msgspec.json.schema_components(
        (*ANSWERS, TaskSpec, Result, ErrorRaised), ref_template=_REF
    )
    components = msgspec.json.decode(msgspec.json.encode(made))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Container execution supervisor",
            "version": version,
            "description": (
                "Submit tasks that run in hardened containers, read their results, cancel "
                "them, query the projection and follow the errors. /v1 routes need "
                "`Authorization: Bearer <token>` when a token is configured."
            ),
        },
        "servers": [{"url": server}],
        "security": _V1 if token_required else [],
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": _paths(max_wait_s),
        "webhooks": {
            "taskEnded": {
                "post": {
                    "summary": "A task's Result, POSTed to its callback_url once it has ended",
                    "description": (
                        "Signed: X-Supervisor-Signature is sha256=<hex HMAC-SHA256 of "
                        '"<X-Supervisor-Timestamp>." + body> under [callbacks] secret. '
                        "Retried with backoff until a 2xx answer, at most "
                        "[callbacks] max_attempts times; at least once."
                    ),
                    "requestBody": {
                        "content": {"application/json": {"schema": _ref("CallbackBody")}}
                    },
                    "responses": {"2XX": {"description": "delivered"}},
                }
            }
        },
    }


def render() -> str:
    return json.dumps(document(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    DOC_PATH.write_text(render())
    print(DOC_PATH)
