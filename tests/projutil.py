"""Read back a projection file (tests only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from projections.store.store import snapshot


def tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of the projection file at `path`, row for row (`snapshot`)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        return snapshot(con)
    finally:
        con.close()
