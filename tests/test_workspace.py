"""Workspaces on a real filesystem: removal is idempotent and tolerates a concurrent one."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

from supervisor.execution.workspace import create_workspace, remove_workspace


def test_two_removals_of_one_workspace_at_once_both_succeed(tmp_dir: Path) -> None:
    """A cleanup command may remove a workspace while the attempt's own cleanup does: the
    files one of them unlinks first are not a failure of the other."""
    files = {f"d{d}/f{f}": b"x" for d in range(10) for f in range(20)}
    for _ in range(10):
        path, _ = create_workspace(tmp_dir, "t-1", 1, files)
        results: list[bool | BaseException] = []

        def remove(path: Path = path, results: list[bool | BaseException] = results) -> None:
            try:
                results.append(remove_workspace(path))
            except OSError as e:
                results.append(e)

        threads = [threading.Thread(target=remove) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        assert all(isinstance(r, bool) for r in results), results
        assert not path.exists()


def test_removing_a_workspace_already_gone_says_so(tmp_dir: Path) -> None:
    path, _ = create_workspace(tmp_dir, "t-1", 1, {"main.sh": b"true"})

    assert remove_workspace(path) is False
    assert remove_workspace(path) is True


def test_files_named_executable_are_the_only_ones_that_may_run(tmp_dir: Path) -> None:
    files = {"run": b"#!/bin/sh", "lib/tool": b"\x7fELF", "data.txt": b"x"}
    path, total = create_workspace(tmp_dir, "t-1", 1, files, frozenset({"run", "lib/tool"}))

    modes = {name: stat.S_IMODE((path / name).stat().st_mode) for name in files}
    assert modes == {"run": 0o755, "lib/tool": 0o755, "data.txt": 0o644}
    assert total == sum(map(len, files.values()))
