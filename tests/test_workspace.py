"""Workspaces on a real filesystem: removal is idempotent and tolerates a concurrent one; a
small one is written and removed on the event loop, a large one in a worker thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from supervisor.execution.workspace import (
    INLINE_BYTES,
    create_workspace,
    on_loop_if_small,
    remove_workspace,
)

T = TypeVar("T")


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


async def test_a_small_workspace_is_made_and_removed_on_the_loop_a_large_one_not(
    tmp_dir: Path,
) -> None:
    loop_thread = threading.get_ident()
    seen: list[tuple[str, bool]] = []

    def on(name: str, fn: Callable[..., T]) -> Callable[..., T]:
        def call(*args: Any) -> T:
            seen.append((name, threading.get_ident() == loop_thread))
            return fn(*args)

        return call

    for size, label in ((INLINE_BYTES, "small"), (INLINE_BYTES + 1, "large"), (None, "unknown")):
        files = {"main.sh": b"x" * (size or 1)}
        path, written = await on_loop_if_small(
            size, on(label, create_workspace), tmp_dir, "t-1", 1, files
        )
        assert (path / "main.sh").read_bytes() == files["main.sh"]
        assert written == len(files["main.sh"])
        assert await on_loop_if_small(size, on(label, remove_workspace), path) is False
        assert not path.exists()
    assert seen == [
        ("small", True),
        ("small", True),
        ("large", False),
        ("large", False),
        ("unknown", False),
        ("unknown", False),
    ]
