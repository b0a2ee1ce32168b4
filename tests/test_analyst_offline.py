"""The analyst's commands without a daemon, on a real daemon's data dir, nats-server and
DuckDB file: `sql`, `report`, `audit` and `export` read the stopped daemon's projection (or
rebuild one from the stream when its file is held) and say which; `export` writes Parquet
and CSV that another DuckDB reads back row for row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from schemas import TaskSpec
from testing.daemon import DaemonProc, task

pytestmark = pytest.mark.usefixtures("docker_client")


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=env,
    )


def _count(path: Path, fmt: str) -> int:
    row = duckdb.connect().execute(f"SELECT count(*) FROM read_{fmt}('{path}')").fetchone()
    assert row is not None
    return int(row[0])


def test_the_read_commands_work_on_a_stopped_daemons_data_dir(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc]
) -> None:
    d = DaemonProc(tmp_dir / "data", nats_url)
    daemons.append(d)
    d.start(60)
    with d.client() as c:
        c.run(TaskSpec(**task("echo ok", retry={"max_attempts": 1})), timeout_s=60)
        c.run(TaskSpec(**task("exit 3", retry={"max_attempts": 1})), timeout_s=60)
    data = d.data_dir
    # While the daemon runs, its projection file is held: export rebuilds one.
    held = _cli(data, "export", "tasks", "--out", str(tmp_dir / "live.csv"))
    assert held.returncode == 0, held.stderr
    assert "rebuilt one from SUP_EVENTS" in held.stderr
    assert _count(tmp_dir / "live.csv", "csv") == 2
    d.stop()

    sql = _cli(
        data, "sql", "SELECT state, count(*) AS n FROM tasks GROUP BY ALL", "--format", "json"
    )
    assert sql.returncode == 0, sql.stderr
    assert "no daemon answered" in sql.stderr
    assert f"reading the data dir's projection {data.resolve()}" in sql.stderr
    rows = json.loads(sql.stdout)
    assert sorted((r["state"], r["n"]) for r in rows) == [("failed", 1), ("succeeded", 1)]

    report = _cli(data, "report", "--out", str(tmp_dir / "r.html"))
    assert report.returncode == 0, report.stderr
    assert "reading the data dir's projection" in report.stderr
    assert "2 tasks" in report.stderr and (tmp_dir / "r.html").stat().st_size > 1000

    audit = _cli(data, "audit")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "replaying SUP_EVENTS" in audit.stderr and "clean" in audit.stdout

    out = tmp_dir / "errors.parquet"
    done = _cli(data, "export", "errors", "--out", str(out))
    assert done.returncode == 0, done.stderr
    con = duckdb.connect(str(data / "projection.duckdb"), read_only=True)
    try:
        errors = con.execute("SELECT count(*) FROM errors").fetchone()
    finally:
        con.close()
    assert errors is not None and _count(out, "parquet") == errors[0] >= 1
    query = _cli(
        data,
        "export",
        "--query",
        "SELECT task_id, exit_code FROM tasks",
        "--out",
        str(tmp_dir / "t.csv"),
    )
    assert query.returncode == 0, query.stderr
    assert "2 rows of the query" in query.stderr and _count(tmp_dir / "t.csv", "csv") == 2


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--out", "x.csv"), "give a TABLE or --query SQL"),
        (("nope", "--out", "x.csv"), "no table or view 'nope' (there are: "),
        (("tasks", "--out", "x.txt"), "cannot tell the format of x.txt"),
        (("--query", "DELETE FROM tasks", "--out", "x.csv"), "export:"),
    ],
    ids=["neither", "unknown_table", "unknown_format", "not_a_select"],
)
def test_a_bad_export_is_refused_with_what_to_give(
    tmp_dir: Path, args: tuple[str, ...], says: str
) -> None:
    db = tmp_dir / "p.duckdb"
    duckdb.connect(str(db)).execute("CREATE TABLE tasks (task_id VARCHAR)").close()
    argv = [a if not a.startswith("x.") else str(tmp_dir / a) for a in args]
    done = _cli(tmp_dir, "export", *argv, "--db", str(db))
    assert done.returncode == 2, done.stderr
    assert says in done.stderr
    assert not list(tmp_dir.glob("x.*"))
