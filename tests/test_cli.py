"""The CLI's surface: `--version`, help that states the defaults, each subcommand with only
the options it uses, and bad values refused with exit 2 before anything runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.cli.main import build_parser


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version_and_the_defaults_in_the_help() -> None:
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("supervisor ")
    help_text = cli("--help").stdout
    assert "./.supervisor" in help_text and "127.0.0.1:8787" in help_text


def _options(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions)  # type: ignore[union-attr]
    return {o for a in sub.choices[command]._actions for o in a.option_strings}  # type: ignore[attr-defined,index]


def test_each_subcommand_has_only_the_options_it_uses() -> None:
    assert "--nats" not in _options("credentials")
    assert "--node-id" not in _options("credentials")
    assert "--node-id" not in _options("tail")
    assert "--node-id" not in _options("sql")
    assert {"--nats", "--node-id", "--config", "--data-dir"} <= _options("serve")
    assert "--node-id" in _options("reconcile")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("tail", "--type", "usercode"), "invalid choice: 'usercode'"),
        (("tail", "--errors", "--code", "OOM"), "unknown error code 'OOM'"),
        (("serve", "--log-level", "loud"), "invalid choice: 'LOUD'"),
        (("sql", "SELECT 1", "--timeout", "nan"), "--timeout"),
        (("sql", "SELECT 1", "--max-rows", "-1"), "--max-rows"),
    ],
)
def test_bad_values_are_usage_errors(args: tuple[str, ...], message: str) -> None:
    done = cli(*args)
    assert done.returncode == 2
    assert message in done.stderr


def test_replay_into_a_missing_directory_is_refused(tmp_dir: Path) -> None:
    done = cli(
        "replay", "--db", str(tmp_dir / "nowhere" / "p.duckdb"), "--data-dir", str(tmp_dir / "data")
    )
    assert done.returncode == 2
    assert "does not exist" in done.stderr
    assert not (tmp_dir / "data").exists()  # refused before any NATS was started


def test_a_mistyped_option_is_the_subcommands_error_with_the_nearest_option() -> None:
    done = cli("sql", "--fromat", "json", "SELECT 1")

    assert done.returncode == 2
    assert done.stderr.startswith("usage: supervisor sql ")
    assert done.stderr.rstrip().endswith(
        "supervisor sql: error: unrecognized option --fromat (did you mean --format?)"
    )


def test_a_mistyped_command_gets_the_nearest_one() -> None:
    done = cli("sqll", "SELECT 1")

    assert done.returncode == 2
    assert "unknown command 'sqll'; did you mean 'sql'?" in done.stderr


def test_submit_with_no_daemon_says_so_and_leaves_nothing_behind(tmp_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "submit", "-"],
        input='{"image": "supervisor-sandbox:busybox", "command": ["true"]}',
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_dir,
        env={k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")},
    )

    assert done.returncode == 3
    assert "cannot submit: no daemon runs on the data dir" in done.stderr
    assert "start `supervisor serve` there, or give --nats URL" in done.stderr
    assert list(tmp_dir.iterdir()) == []
