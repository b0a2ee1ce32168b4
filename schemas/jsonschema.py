"""Generate the JSON Schema files under `schemas/json/` from the Structs.

`python -m schemas.jsonschema` rewrites them; a test regenerates them in memory and fails on
any byte of difference, so the committed files always describe the code.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import msgspec

from schemas.commands import CleanupCommand
from schemas.events import AnyEvent
from schemas.spec import ExecutionError, Result, TaskSpec

JSON_DIR = Path(__file__).parent / "json"

_DOCUMENTS: dict[str, object] = {
    "task_spec.json": TaskSpec,
    "result.json": Result,
    "execution_error.json": ExecutionError,
    "events.json": AnyEvent,
    "commands.json": CleanupCommand,
}


def _clean(node: object) -> object:
    """`node` with every description dedented the way `inspect.cleandoc` does: msgspec
    0.23 dedents docstrings and earlier versions keep their indentation, and the files must
    not depend on which one is installed."""
    if isinstance(node, dict):
        return {
            k: inspect.cleandoc(v) if k == "description" and isinstance(v, str) else _clean(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def _open(node: object) -> object:
    """`node` with no object closed to other properties: an event's reader ignores the fields
    it does not know, those of the spec a `task.submitted` holds too (`decode_event`)."""
    if isinstance(node, dict):
        return {k: _open(v) for k, v in node.items() if (k, v) != ("additionalProperties", False)}
    if isinstance(node, list):
        return [_open(v) for v in node]
    return node


def render() -> dict[str, bytes]:
    """Return file name -> exact bytes of every generated schema."""
    out: dict[str, bytes] = {}
    for name, typ in _DOCUMENTS.items():
        schema = _clean(msgspec.json.schema(typ))
        if name == "events.json":
            schema = _open(schema)
        out[name] = (json.dumps(schema, indent=2, sort_keys=True) + "\n").encode()
    return out


def write(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in render().items():
        path = directory / name
        path.write_bytes(data)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write():
        sys.stdout.write(f"{p}\n")
