"""The read side: the projector (SUP_EVENTS -> DuckDB), the tables and views, replay,
the lifecycle audit, read-only SQL, and the daemon's live projection and query endpoint
(`ProjectionPart`). See docs/projections.md."""

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
