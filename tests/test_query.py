"""Read-only SQL: the statement guard, the locked-down connection, limits, renderers and
the `sql` subcommand."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import duckdb
import pytest

from projections.errors import QueryFailed, QueryRefused, QueryTimeout
from projections.query.query import QueryResult, check_query, open_readonly, run_query
from projections.query.render import render_csv, render_json, render_table
from supervisor.cli.main import main as cli_main
from supervisor.cli.read_parsers import add_parsers
from testing.projection import project
from testing.synthetic import AttemptPlan, HistoryBuilder


@pytest.fixture
def db(tmp_dir: Path) -> Path:
    b = HistoryBuilder()
    b.run_task("t-1")
    b.run_task("t-2", AttemptPlan(error="OOM_KILLED", exit_code=137))
    return project(b.events, tmp_dir / "p.duckdb")


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        (
            "INSERT INTO tasks (task_id) VALUES ('x')",
            "INSERT statements are not allowed: read-only SELECT only",
        ),
        (
            "UPDATE tasks SET state = 'x'",
            "UPDATE statements are not allowed: read-only SELECT only",
        ),
        ("DELETE FROM events", "DELETE statements are not allowed: read-only SELECT only"),
        ("DROP TABLE events", "DROP statements are not allowed: read-only SELECT only"),
        ("CREATE TABLE x AS SELECT 1", "CREATE statements are not allowed: read-only SELECT only"),
        (
            "COPY events TO '/tmp/leak.csv'",
            "COPY statements are not allowed: read-only SELECT only",
        ),
        (
            "ATTACH '/tmp/other.duckdb' AS o",
            "ATTACH statements are not allowed: read-only SELECT only",
        ),
        ("DETACH o", "DETACH statements are not allowed: read-only SELECT only"),
        ("PRAGMA database_size", "PRAGMA statements are not allowed: read-only SELECT only"),
        ("SET threads = 1", "SET statements are not allowed: read-only SELECT only"),
        ("CALL checkpoint()", "CALL statements are not allowed: read-only SELECT only"),
        ("EXPORT DATABASE '/tmp/x'", "EXPORT statements are not allowed: read-only SELECT only"),
        ("INSTALL httpfs", "LOAD statements are not allowed: read-only SELECT only"),
        (
            "EXPLAIN ANALYZE DELETE FROM events",
            "EXPLAIN statements are not allowed: read-only SELECT only",
        ),
        ("SELECT 1; DROP TABLE events", "exactly one statement is allowed, got 2"),
        ("SELECT 1; SELECT 2", "exactly one statement is allowed, got 2"),
        ("", "exactly one statement is allowed, got 0"),
    ],
)
def test_the_guard_refuses_anything_but_one_select(sql: str, reason: str) -> None:
    with pytest.raises(QueryRefused) as info:
        check_query(sql)
    assert info.value.reason == reason


def test_the_guard_refuses_what_does_not_parse() -> None:
    with pytest.raises(QueryRefused, match="does not parse"):
        check_query("SELEC 1")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(*) FROM events",
        "WITH t AS (SELECT task_id FROM tasks) SELECT count(*) FROM t",
        "FROM tasks SELECT task_id",
        "VALUES (1)",
        "DESCRIBE tasks",
        "SELECT 1;",
    ],
)
def test_the_guard_accepts_select_class_statements(sql: str) -> None:
    assert check_query(sql) == sql


def test_run_query_reads_the_projection(db: Path) -> None:
    con = open_readonly(db)
    result = run_query(
        con, "WITH s AS (SELECT task_id, state FROM tasks) SELECT * FROM s ORDER BY 1"
    )
    con.close()
    assert (result.columns, result.types) == (["task_id", "state"], ["VARCHAR", "VARCHAR"])
    assert result.rows == [("t-1", "succeeded"), ("t-2", "failed")]
    assert (result.truncated, result.seq) == (False, 21)  # the watermark it saw


def test_the_connection_blocks_files_writes_and_settings(db: Path) -> None:
    con = open_readonly(db)
    try:
        with pytest.raises(QueryFailed, match="file system operations are disabled"):
            run_query(con, "SELECT * FROM read_csv('/etc/passwd')")
        with pytest.raises(QueryFailed, match="file system operations are disabled"):
            run_query(con, "SELECT * FROM glob('/etc/*')")
        with pytest.raises(duckdb.Error, match=r"attached in read-only mode"):
            con.execute("INSERT INTO tasks (task_id) VALUES ('x')")
        with pytest.raises(duckdb.Error, match="configuration has been locked"):
            con.execute("SET enable_external_access = true")
    finally:
        con.close()


def test_rows_are_capped_and_time_is_limited(db: Path) -> None:
    con = open_readonly(db)
    try:
        capped = run_query(con, "SELECT * FROM range(1000000000)", max_rows=3)
        assert (capped.rows, capped.truncated) == ([(0,), (1,), (2,)], True)
        with pytest.raises(QueryTimeout) as info:
            run_query(con, "SELECT count(*) FROM range(10000000000000) a", timeout_s=0.3)
        assert info.value.limit_s == 0.3
        assert run_query(con, "SELECT 42").rows == [(42,)]  # still usable
    finally:
        con.close()


def test_a_missing_file_is_a_clear_error(tmp_dir: Path) -> None:
    with pytest.raises(QueryFailed, match="no such projection file"):
        open_readonly(tmp_dir / "nope.duckdb")


RESULT = QueryResult(
    columns=["id", "at", "n", "note"],
    types=["VARCHAR", "TIMESTAMP", "BIGINT", "VARCHAR"],
    rows=[
        ("a", dt.datetime(2026, 1, 1, 12, 0), 7, None),
        ("bb", dt.datetime(2026, 1, 2), 12345, "x,y"),
    ],
    truncated=False,
    elapsed_s=0.01,
)


def test_renderers() -> None:
    assert render_table(RESULT) == (
        "id | at                  |     n | note\n"
        "---+---------------------+-------+-----\n"
        "a  | 2026-01-01T12:00:00 |     7 | NULL\n"
        "bb | 2026-01-02T00:00:00 | 12345 | x,y\n"
        "(2 rows)\n"
    )
    assert json.loads(render_json(RESULT)) == [
        {"id": "a", "at": "2026-01-01T12:00:00", "n": 7, "note": None},
        {"id": "bb", "at": "2026-01-02T00:00:00", "n": 12345, "note": "x,y"},
    ]
    assert render_csv(RESULT) == (
        'id,at,n,note\na,2026-01-01T12:00:00,7,\nbb,2026-01-02T00:00:00,12345,"x,y"\n'
    )


def _sql(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    args = parser.parse_args(["sql", *argv])
    return int(args.func(args))


def test_the_sql_command(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _sql("SELECT code, errors FROM error_rates", "--db", str(db), "--format", "csv") == 0
    assert capsys.readouterr().out == "code,errors\nOOM_KILLED,1\n"
    assert _sql("SELECT 1; DROP TABLE tasks", "--db", str(db)) == 2
    assert "exactly one statement is allowed" in capsys.readouterr().err
    assert _sql("COPY tasks TO 'x.csv'", "--db", str(db)) == 2
    assert _sql("SELECT * FROM nowhere", "--db", str(db)) == 1
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["--timeout", "nan"],
        ["--timeout", "inf"],
        ["--timeout", "0"],
        ["--timeout", "-1"],
        ["--max-rows", "-1"],
        ["--max-rows", "0"],
    ],
)
def test_sql_refuses_limits_that_are_not_finite_and_positive(
    db: Path, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        cli_main(["sql", "SELECT 1", "--db", str(db), *flags])

    assert done.value.code == 2
    assert f"argument {flags[0]}" in capsys.readouterr().err
