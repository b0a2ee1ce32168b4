"""Defaults shared by the read side's CLI and its query code (no import of DuckDB here)."""

MAX_ROWS = 10_000
"""Rows a query returns at most unless it asks for another limit."""
TIMEOUT_S = 30.0
"""Seconds a query runs at most unless it asks for another limit."""
FORMATS = ("table", "json", "csv")
"""The output formats of `supervisor sql`."""

EXPORT_FORMATS = ("parquet", "csv")
"""The file formats `supervisor export` writes (`projections.query.export`)."""
