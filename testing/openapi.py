"""Checks an HTTP answer against the OpenAPI document (`schemas.openapi`): the status must
be one the document lists for the route and method (or its `default`), and a JSON body
must match the schema it gives. Used by the HTTP tests on every answer of a real daemon."""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator

from schemas.openapi import document


class ContractBreach(AssertionError):
    """An answer the OpenAPI document does not allow."""


@cache
def _doc() -> dict[str, Any]:
    return document()


@cache
def _routes() -> list[tuple[re.Pattern[str], str]]:
    out = []
    for template in _doc()["paths"]:
        pattern = re.sub(r"\{[^/]+\}", "[^/]+", template)
        out.append((re.compile(f"^{pattern}$"), template))
    # A literal route wins over a templated one (/v1/tasks/batch over /v1/tasks/{task_id}).
    return sorted(out, key=lambda rt: "{" in rt[1])


def check_answer(method: str, url: str, status: int, body: bytes, content_type: str) -> None:
    """Raise ContractBreach unless the document allows this answer. Routes the document
    does not name (a 404 for a path that does not exist) must still be catalogue errors."""
    path = urlsplit(url).path
    template = next((t for rx, t in _routes() if rx.match(path)), None)
    op = _doc()["paths"].get(template, {}).get(method.lower()) if template else None
    if op is None:
        if status < 400:
            raise ContractBreach(f"{method} {path}: {status}, a route the document lacks")
        schema: dict[str, Any] = {"$ref": "#/components/schemas/ErrorAnswer"}
    else:
        responses = op["responses"]
        answer = responses.get(str(status)) or responses.get("default")
        if answer is None or (str(status) not in responses and status < 400):
            raise ContractBreach(f"{method} {template}: status {status} is not documented")
        content = answer.get("content", {})
        if "application/json" not in content:
            return  # text (metrics) or JSON lines (checked line by line by their reader)
        schema = content["application/json"]["schema"]
    if "json" not in content_type:
        raise ContractBreach(f"{method} {path}: {status} answered {content_type!r}, not JSON")
    validate(schema, json.loads(body))


def validate(schema: dict[str, Any], value: Any) -> None:
    """Raise ContractBreach unless `value` matches `schema` (refs into the document)."""
    root = {**schema, "components": _doc()["components"]}
    errors = sorted(Draft202012Validator(root).iter_errors(value), key=lambda e: e.path)
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path)
        raise ContractBreach(f"at {where or '<root>'}: {e.message}")
