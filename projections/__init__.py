"""The read side: the projector (SUP_EVENTS -> DuckDB), the tables and views, replay,
the lifecycle audit and read-only SQL. See docs/projections.md."""

from projections.audit import Record, Violation, audit_db, audit_records, load_records
from projections.audit import render_json as render_audit_json
from projections.audit import render_text as render_audit_text
from projections.ddl import DDL_VERSION, TABLES, VIEWS
from projections.decode import Batch, DeadLetter, Staged, decode_batch, stage
from projections.errors import (
    ProjectionError,
    ProjectionStoreError,
    QueryError,
    QueryFailed,
    QueryRefused,
    QueryTimeout,
    StreamUnavailable,
)
from projections.projector import Progress, ProgressCallback, Projector
from projections.query import QueryResult, check_query, open_readonly, run_query
from projections.render import render, render_csv, render_json, render_table
from projections.replay import replay
from projections.store import ApplyResult, ProjectionStore, snapshot, table_rows

__all__ = [
    "DDL_VERSION",
    "TABLES",
    "VIEWS",
    "ApplyResult",
    "Batch",
    "DeadLetter",
    "Progress",
    "ProgressCallback",
    "ProjectionError",
    "ProjectionStore",
    "ProjectionStoreError",
    "Projector",
    "QueryError",
    "QueryFailed",
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
    "decode_batch",
    "load_records",
    "open_readonly",
    "render",
    "render_audit_json",
    "render_audit_text",
    "render_csv",
    "render_json",
    "render_table",
    "replay",
    "run_query",
    "snapshot",
    "stage",
    "table_rows",
]
