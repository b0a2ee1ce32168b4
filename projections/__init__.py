"""The read side: the projector (SUP_EVENTS -> DuckDB), the tables and views, replay,
the lifecycle audit, read-only SQL, and the daemon's live projection and query endpoint
(`ProjectionPart`). See docs/projections.md.

The names below are imported on first use (PEP 562), so that importing one module of the
package (e.g. `projections.parsers` from the CLI) does not load DuckDB and Arrow."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, tuple[str, str]] = {
    "ApplyResult": ("projections.store", "ApplyResult"),
    "Batch": ("projections.decode", "Batch"),
    "DDL_VERSION": ("projections.ddl", "DDL_VERSION"),
    "DaemonRefused": ("projections.errors", "DaemonRefused"),
    "DaemonUnreachable": ("projections.errors", "DaemonUnreachable"),
    "DeadLetter": ("projections.decode", "DeadLetter"),
    "Lag": ("projections.live", "Lag"),
    "LiveSettings": ("projections.live", "LiveSettings"),
    "Progress": ("projections.projector", "Progress"),
    "ProgressCallback": ("projections.projector", "ProgressCallback"),
    "ProjectionError": ("projections.errors", "ProjectionError"),
    "ProjectionPart": ("projections.live", "ProjectionPart"),
    "ProjectionStore": ("projections.store", "ProjectionStore"),
    "ProjectionStoreError": ("projections.errors", "ProjectionStoreError"),
    "ProjectionVersionMismatch": ("projections.errors", "ProjectionVersionMismatch"),
    "Projector": ("projections.projector", "Projector"),
    "QueryEndpoint": ("projections.endpoint", "QueryEndpoint"),
    "QueryError": ("projections.errors", "QueryError"),
    "QueryFailed": ("projections.errors", "QueryFailed"),
    "QueryLimits": ("projections.endpoint", "QueryLimits"),
    "QueryRefused": ("projections.errors", "QueryRefused"),
    "QueryResult": ("projections.query", "QueryResult"),
    "QueryTimeout": ("projections.errors", "QueryTimeout"),
    "Record": ("projections.audit", "Record"),
    "Staged": ("projections.decode", "Staged"),
    "StreamUnavailable": ("projections.errors", "StreamUnavailable"),
    "TABLES": ("projections.ddl", "TABLES"),
    "VIEWS": ("projections.ddl", "VIEWS"),
    "Violation": ("projections.audit", "Violation"),
    "audit_db": ("projections.audit", "audit_db"),
    "audit_records": ("projections.audit", "audit_records"),
    "check_query": ("projections.query", "check_query"),
    "daemon_url": ("projections.client", "daemon_url"),
    "decode_batch": ("projections.decode", "decode_batch"),
    "load_records": ("projections.audit", "load_records"),
    "open_readonly": ("projections.query", "open_readonly"),
    "query_daemon": ("projections.client", "query_daemon"),
    "read_transaction": ("projections.query", "read_transaction"),
    "render": ("projections.render", "render"),
    "render_audit_json": ("projections.audit", "render_json"),
    "render_audit_text": ("projections.audit", "render_text"),
    "render_csv": ("projections.render", "render_csv"),
    "render_json": ("projections.render", "render_json"),
    "render_table": ("projections.render", "render_table"),
    "replay": ("projections.replay", "replay"),
    "result_doc": ("projections.render", "result_doc"),
    "result_from_doc": ("projections.render", "result_from_doc"),
    "run_on_cursor": ("projections.query", "run_on_cursor"),
    "run_query": ("projections.query", "run_query"),
    "snapshot": ("projections.store", "snapshot"),
    "stage": ("projections.decode", "stage"),
    "table_rows": ("projections.store", "table_rows"),
}

__all__ = [
    "DDL_VERSION",
    "TABLES",
    "VIEWS",
    "ApplyResult",
    "Batch",
    "DaemonRefused",
    "DaemonUnreachable",
    "DeadLetter",
    "Lag",
    "LiveSettings",
    "Progress",
    "ProgressCallback",
    "ProjectionError",
    "ProjectionPart",
    "ProjectionStore",
    "ProjectionStoreError",
    "ProjectionVersionMismatch",
    "Projector",
    "QueryEndpoint",
    "QueryError",
    "QueryFailed",
    "QueryLimits",
    "QueryRefused",
    "QueryResult",
    "QueryTimeout",
    "Record",
    "Staged",
    "StreamUnavailable",
    "Violation",
    "audit_db",
    "audit_records",
    "check_query",
    "daemon_url",
    "decode_batch",
    "load_records",
    "open_readonly",
    "query_daemon",
    "read_transaction",
    "render",
    "render_audit_json",
    "render_audit_text",
    "render_csv",
    "render_json",
    "render_table",
    "replay",
    "result_doc",
    "result_from_doc",
    "run_on_cursor",
    "run_query",
    "snapshot",
    "stage",
    "table_rows",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'projections' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from projections.audit import Record, Violation, audit_db, audit_records, load_records
    from projections.audit import render_json as render_audit_json
    from projections.audit import render_text as render_audit_text
    from projections.client import daemon_url, query_daemon
    from projections.ddl import DDL_VERSION, TABLES, VIEWS
    from projections.decode import Batch, DeadLetter, Staged, decode_batch, stage
    from projections.endpoint import QueryEndpoint, QueryLimits
    from projections.errors import (
        DaemonRefused,
        DaemonUnreachable,
        ProjectionError,
        ProjectionStoreError,
        ProjectionVersionMismatch,
        QueryError,
        QueryFailed,
        QueryRefused,
        QueryTimeout,
        StreamUnavailable,
    )
    from projections.live import Lag, LiveSettings, ProjectionPart
    from projections.projector import Progress, ProgressCallback, Projector
    from projections.query import (
        QueryResult,
        check_query,
        open_readonly,
        read_transaction,
        run_on_cursor,
        run_query,
    )
    from projections.render import (
        render,
        render_csv,
        render_json,
        render_table,
        result_doc,
        result_from_doc,
    )
    from projections.replay import replay
    from projections.store import ApplyResult, ProjectionStore, snapshot, table_rows
