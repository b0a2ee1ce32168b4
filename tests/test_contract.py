"""The contract: generated JSON Schema is committed and current, subjects have five tokens,
events round-trip, and imports flow one way."""

from __future__ import annotations

import ast
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from schemas import (
    EVENT_TYPES,
    ErrorRaised,
    TaskSpec,
    TaskSubmitted,
    TaskSucceeded,
    decode_event,
    encode_event,
)
from schemas.config import load_config
from schemas.errors import ConfigError
from schemas.jsonschema import JSON_DIR, render
from schemas.lifecycle import InvalidTransition, next_container_state, next_task_state
from schemas.spec import newer_spec, public_spec
from tests.layout import PURE

ROOT = Path(__file__).resolve().parent.parent


def test_committed_json_schema_matches_the_structs() -> None:
    rendered = render()

    assert sorted(p.name for p in JSON_DIR.glob("*.json")) == sorted(rendered)
    for name, data in rendered.items():
        assert (JSON_DIR / name).read_bytes() == data, (
            f"{name} drifted: run python -m schemas.jsonschema"
        )


def test_every_event_tag_is_unique_and_category_prefixed() -> None:
    tags = [msgspec.inspect.type_info(t).tag for t in EVENT_TYPES]  # type: ignore[attr-defined]

    assert len(tags) == len(set(tags))
    for t, cls in zip(tags, EVENT_TYPES, strict=True):
        assert t.split(".")[0] == cls.category


def test_subjects_have_five_tokens_and_errors_use_their_type() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    err = ErrorRaised(
        event_id="e1",
        occurred_at=now,
        node_id="n1",
        instance_id="i",
        task_id="t-1",
        error_type="timeout",
        code="EXECUTION_TIMEOUT",
        message="m",
        retryable=True,
    )

    assert err.subject() == "sup.error.timeout.n1.t-1"
    assert decode_event(encode_event(err)) == err


def test_unknown_fields_are_ignored_by_old_readers() -> None:
    raw = (
        b'{"type":"supervisor.stopped","event_id":"e","occurred_at":"2026-01-01T00:00:00Z",'
        b'"node_id":"n1","instance_id":"i","reason":"exit","added_in_v2":42}'
    )

    ev = decode_event(raw)

    assert ev.subject() == "sup.supervisor.stopped.n1._"


def test_fields_a_newer_writer_added_to_a_spec_are_ignored_too() -> None:
    """A submitted spec refuses unknown fields; one inside a `task.submitted` from a newer
    writer (its spec's, its limits') is read without them, like the event's own. Anything
    else wrong with the event still fails."""
    spec = TaskSpec(image="i", command=["true"])
    event = TaskSubmitted(
        event_id="e",
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        node_id="n1",
        instance_id="i",
        task_id="t-1",
        spec=spec,
    )
    doc = msgspec.json.decode(encode_event(event))
    doc["spec"]["added_in_v2"] = {"x": 1}
    doc["spec"]["limits"]["added_too"] = 2

    assert decode_event(msgspec.json.encode(doc)) == event
    with pytest.raises(msgspec.ValidationError, match=r"at `\$\.attempt`"):
        decode_event(msgspec.json.encode({**doc, "attempt": "one"}))
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(msgspec.json.encode(doc["spec"]), type=TaskSpec)
    # The published schemas say the same: a spec is closed, an event's spec is not.
    assert b'"additionalProperties": false' in (JSON_DIR / "task_spec.json").read_bytes()
    assert b'"additionalProperties": false' not in (JSON_DIR / "events.json").read_bytes()


def test_a_work_message_from_a_newer_node_is_told_from_garbage() -> None:
    ok = b'{"image": "i", "command": ["x"], "task_id": "t-1", "v2": 1, "limits": {"v2": 2}}'
    spec, unknown = newer_spec(ok) or (None, None)
    assert spec == TaskSpec(image="i", command=["x"], task_id="t-1")
    assert unknown == ["v2", "limits.v2"]
    for not_one in (
        b'{"image": "i", "command": ["x"], "task_id": "t-1"}',  # nothing unknown
        b'{"image": "i", "command": ["x"], "v2": 1}',  # no task id
        b'{"image": "i", "command": "x", "task_id": "t-1", "v2": 1}',  # a known field wrong
        b"[1]",
        b"{not json",
    ):
        assert newer_spec(not_one) is None, not_one


def test_a_spec_without_executables_reads_as_before() -> None:
    """A spec's embedded form forbids unknown fields, so `executables` (added later) is left
    out of the JSON unless given: a task that does not use it travels, and its
    `task.submitted` is kept, as older readers decode it. Its public form is a set."""
    plain = TaskSpec(image="i", command=["true"])
    assert b"executables" not in msgspec.json.encode(plain)
    assert b"executables" not in msgspec.json.encode(public_spec(plain))
    assert public_spec(msgspec.structs.replace(plain, executables=[])) == public_spec(plain)

    marked = TaskSpec(
        image="i", command=["./b"], files={"a": "", "b": ""}, executables=["b", "a", "b"]
    )
    assert public_spec(marked).executables == ["a", "b"]
    again = msgspec.json.decode(msgspec.json.encode(public_spec(marked)), type=TaskSpec)
    assert again == public_spec(marked) == public_spec(again)


def test_terminal_events_carry_a_result() -> None:
    assert "result" in TaskSucceeded.__struct_fields__


def test_lifecycle_accepts_the_executor_order_and_refuses_skips() -> None:
    state = None
    for t in [
        "task.submitted",
        "attempt.started",
        "attempt.finished",
        "task.retry_scheduled",
        "attempt.started",
        "attempt.finished",
        "task.succeeded",
    ]:
        state = next_task_state(state, t)

    assert state == "succeeded"
    assert next_container_state("exited", "removed") == "removed"
    try:
        next_task_state("succeeded", "attempt.started")
    except InvalidTransition as e:
        assert e.state == "succeeded"
    else:
        raise AssertionError("a terminal task must not start an attempt")


_PURE_FORBIDDEN = {
    "docker",
    "nats",
    "duckdb",
    "aiohttp",
    "psutil",
    "subprocess",
    "socket",
    "requests",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _pure_modules() -> dict[str, Path]:
    found = {}
    for entry in PURE:
        path = ROOT / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            found[".".join(file.relative_to(ROOT).with_suffix("").parts)] = file
    return found


def test_the_pure_decisions_import_only_the_contract_and_do_no_io() -> None:
    """The pure decisions (`tests/layout.py` `PURE`) import `schemas` and one another,
    and nothing that does I/O. (The arrows between the parts are `tests/test_layout.py`'s.)"""
    pure = _pure_modules()
    assert "supervisor.policy.classify" in pure and "schemas.lifecycle" in pure
    packages = {name.rsplit(".", 1)[0] for name in pure} | set(pure)
    for module, path in pure.items():
        imports = _imports(path)
        project = {
            m
            for m in imports
            if m.split(".")[0] in {"supervisor", "projections"} and m not in packages
        }
        assert project == set(), (module, project)
        assert not {m.split(".")[0] for m in imports} & _PURE_FORBIDDEN, module


def test_the_tracker_follows_a_whole_task_and_flags_a_second_terminal_state() -> None:
    from schemas.lifecycle import LifecycleTracker

    t = LifecycleTracker()
    steps = [
        "task.submitted",
        "attempt.started",
        "attempt.finished",
        "task.retry_scheduled",
        "attempt.started",
        "attempt.finished",
        "task.succeeded",
    ]
    assert [t.observe(s, "t-1") for s in steps] == [None] * len(steps)
    assert t.tasks == {}  # forgotten at its terminal state
    assert t.observe("container.created", "t-1", container_id="c") is None
    assert t.observe("container.started", "t-1", container_id="c") is None
    v = t.observe("container.created", "t-1", container_id="c")
    assert v is not None and (v.machine, v.state, v.event_type) == (
        "container",
        "running",
        "container.created",
    )
    assert t.observe("cleanup.succeeded", "t-1", container_id="c", step="remove_container") is None
    assert t.containers == {}
    t.observe("task.submitted", "t-2")
    v = t.observe("task.succeeded", "t-2")
    assert v is not None and (v.machine, v.state) == ("task", "submitted")
    # A redelivered task joins mid-life: its first event is accepted from a valid source.
    assert t.observe("attempt.started", "t-3") is None
    assert t.tasks["t-3"] == "running"


def test_a_config_file_is_read_by_its_suffix_or_else_by_its_content(tmp_dir: Path) -> None:
    as_json, as_toml = tmp_dir / "a.conf", tmp_dir / "b.cfg"
    as_json.write_text('{"node_id": "j1"}')
    as_toml.write_text('node_id = "t1"\n[scheduling]\nconcurrency = 2\n')
    assert load_config(as_json).node_id == "j1"
    cfg = load_config(as_toml)
    assert (cfg.node_id, cfg.scheduling.concurrency) == ("t1", 2)
    bad = tmp_dir / "c.toml"
    bad.write_text('{"node_id": "x"}')
    with pytest.raises(ConfigError, match=r"invalid config .*c\.toml \(read as TOML\)"):
        load_config(bad)


def test_the_openapi_document_is_valid_and_committed() -> None:
    """A real validator (openapi-spec-validator) accepts the document, and `docs/` holds
    the document the code makes."""
    from openapi_spec_validator import validate

    from schemas.openapi import DOC_PATH, document, render

    validate(document())
    assert DOC_PATH.read_text() == render(), "docs/openapi.json drifted: python -m schemas.openapi"
