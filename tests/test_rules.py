"""The declarations of the current-state tables (`projections.store.current`) and what is
made from them: the columns agree with the DDL, and a declaration that cannot mean one
thing is refused when it is written, not when a batch runs. (That the MERGE and the fold
made from one declaration write the same rows is `tests/test_fold.py`.)"""

from __future__ import annotations

import duckdb
import pytest

from projections.store.apply import FOLDED_MERGES
from projections.store.current import TABLES
from projections.store.ddl import TABLE_DDL
from projections.store.merge import merge_sql
from projections.store.rules import (
    F,
    FirstSet,
    Group,
    IsKind,
    Key,
    Last,
    Owner,
    Rule,
    Table,
    Take,
    is_type,
)
from projections.store.table_fold import folder


def test_each_declared_table_has_the_columns_of_its_ddl_in_order() -> None:
    con = duckdb.connect()
    for t in TABLES:
        con.execute(TABLE_DDL[t.name])
        ddl = [r[0] for r in con.execute(f"DESCRIBE {t.name}").fetchall()]
        assert [c for c, _ in t.columns] == ddl, t.name
    assert len(FOLDED_MERGES) == len(TABLES) == 5


def _table(**changes: object) -> Table:
    fields: dict[str, object] = {
        "name": "things",
        "keys": ("thing",),
        "sources": ((None, (F("task_id"),)),),
        "columns": (("thing", Key()), ("node_id", Owner()), ("last_seq", Last(F("seq")))),
        "reads": ("batch",),
    }
    fields.update(changes)
    return Table(**fields)  # type: ignore[arg-type]


def test_a_key_column_must_be_declared_a_key() -> None:
    with pytest.raises(ValueError, match="key columns"):
        _table(keys=("thing", "other"))


def test_a_group_guard_must_be_a_column() -> None:
    g = Group("g", is_type("x.y"), guard="nowhere")
    with pytest.raises(ValueError, match="guard nowhere"):
        _table(columns=(("thing", Key()), ("v", Take(g, F("seq")))))


def test_a_source_reads_only_the_event() -> None:
    rule = Rule(lambda a: True, lambda a: "true", ())
    with pytest.raises(ValueError, match="a source reads only the event"):
        _table(sources=((rule, (F("task_id"), F("attempt"))),))


def test_a_field_that_no_declared_kind_carries_is_refused() -> None:
    columns = (("thing", Key()), ("image", FirstSet(None, F("image"))))
    with pytest.raises(ValueError, match="has the field 'image'"):
        merge_sql(_table(columns=columns), {"submitted": ("priority", "image")})
    sql = merge_sql(_table(columns=columns, kinds=("submitted",)), {"submitted": ("image",)})
    assert "_submitted.image AS image" in sql


def test_a_kind_condition_beyond_the_declared_kinds_is_refused() -> None:
    t = _table(columns=(("thing", Key()), ("n", FirstSet(IsKind("terminal"), F("seq")))))
    with pytest.raises(ValueError, match="beyond"):
        merge_sql(t, {"terminal": ()})


def test_the_fold_of_a_declaration_follows_its_rules() -> None:
    t = _table(columns=(("thing", Key()), ("node_id", Owner()), ("last_seq", Last(F("seq")))))
    fold = folder(t)
    events = [{"seq": 3, "node_id": "n1"}, {"seq": 5, "node_id": "n2"}]
    assert fold("k", None, events, lambda e: None) == {
        "thing": "k",
        "node_id": "n1",
        "last_seq": 5,
    }
    stored = {"thing": "k", "node_id": "n0", "last_seq": 2}
    assert fold("k", stored, events, lambda e: None)["node_id"] == "n0"
