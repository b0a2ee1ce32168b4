"""The current-state rows of a small batch, computed in Python. Pure: no I/O.

A live batch holds a few events, and the `MERGE`s of `projections.store.apply` cost their
planning whatever their input: tens of milliseconds each, which is most of a live batch.
So for a small batch the store reads the stored rows of the keys the batch touches, and
this module computes their new rows; the store then replaces them (one `DELETE` and one
Arrow insert per table). Large batches (a replay) keep the set-based `MERGE`s.

Both are made from the same declarations (`projections.store.current`): each `Fold` here is
`projections.store.table_fold.folder` of a table, each `MERGE` `projections.store.merge.merge_sql`
of it. `tests/test_fold.py` projects random histories both ways, cut anywhere, and
compares every row.

A batch folded here also skips the staging tables when it can: the fact tables `errors`,
`cleanups` and `alerts` get their rows from `fact_rows` (the `INSERT`s of
`projections.store.apply`, column for column), and `events` the batch's Arrow table itself.

Events are dicts: the envelope of `STAGING["batch"]` merged with the row of the event's
own staging kind, named by `_kind` (their column names do not overlap); timestamps are
naive UTC, as DuckDB returns them. A row is a dict of the table's columns.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from projections.store.current import TABLES
from projections.store.rules import NO_CTX, Event, Look, Lookup, Row, Table
from projections.store.table_fold import Folder, folder, select

__all__ = ["FACT_KINDS", "FOLDS", "Event", "Fold", "Look", "Row", "fact_rows"]

# --- the fact tables ----------------------------------------------------------------------

FACT_KINDS: Final[dict[str, str]] = {"errors": "error", "cleanups": "cleanup", "alerts": "alert"}
"""Each fact table `fact_rows` fills, and the staging kind it is made of."""

_SUFFIX: Final[dict[str, str]] = {"cleanups": "outcome", "alerts": "kind"}
"""The column that is `split_part(type, '.', 2)` (`cleanup.failed` -> `failed`)."""


def fact_rows(table: str, columns: list[str], events: Iterable[Event]) -> list[Row]:
    """The rows `INSERT_ERRORS`, `INSERT_CLEANUPS` or `INSERT_ALERTS` would add: one per
    event of the table's kind, its envelope and its kind's columns."""
    kind, suffix = FACT_KINDS[table], _SUFFIX.get(table)
    out = []
    for e in events:
        if e["_kind"] == kind:
            row = {c: e[c] for c in columns if c != suffix}
            if suffix is not None:
                parts = e["type"].split(".")
                row[suffix] = parts[1] if len(parts) > 1 else ""
            out.append(row)
    return out


# --- the current-state tables -------------------------------------------------------------


@dataclass(frozen=True)
class Fold:
    """One current-state table as the Python fold sees it: its key columns, which events
    touch which key (`select`), the new row of a key (`fold`: from its stored row, None
    if new, its events and the looked-up rows), and the rows of another table it looks up."""

    table: Table
    fold: Folder

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def keys(self) -> tuple[str, ...]:
        return self.table.keys

    @property
    def lookup(self) -> Lookup | None:
        return self.table.lookup

    def select(self, events: Iterable[Event]) -> dict[Any, list[Event]]:
        return select(self.table, events)

    def key_of(self, row: Row) -> Any:
        keys = self.table.keys
        return row[keys[0]] if len(keys) == 1 else tuple(row[k] for k in keys)

    def _looked_key(self, e: Event) -> Any:
        lk = self.table.lookup
        if lk is None or not lk.when.py(e, NO_CTX):
            return None
        key = tuple(v.py(e) for _, v in lk.on)
        return key[0] if len(key) == 1 else key

    def looked_up(self, groups: dict[Any, list[Event]]) -> set[Any]:
        """The keys of `lookup.table` that the events of `groups` name."""
        keys = (self._looked_key(e) for evs in groups.values() for e in evs)
        return {k for k in keys if k is not None}

    def look(self, rows: dict[Any, Row]) -> Look:
        """`Look` over `rows` (the looked-up table's, by key)."""
        return lambda e: rows.get(k) if (k := self._looked_key(e)) is not None else None


FOLDS: Final[tuple[Fold, ...]] = tuple(Fold(t, folder(t)) for t in TABLES)
"""The tables a small batch folds in Python, in the order they are applied (the `MERGE`s
they replace are `projections.store.apply.FOLDED_MERGES`)."""
