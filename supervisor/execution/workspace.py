"""Workspaces: one temp dir per attempt under `<data_dir>/workspaces`, holding the spec's
files, mounted read-only into the container. Readable by the sandbox's non-root user."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

WORKSPACES = "workspaces"


def create_workspace(
    root: Path,
    task_id: str,
    attempt: int,
    files: dict[str, bytes],
    executables: Collection[str] = (),
) -> tuple[Path, int]:
    """Write `files` (already validated as relative paths) into a new dir, those named in
    `executables` executable; returns (dir, bytes)."""
    base = root / WORKSPACES
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{task_id}.{attempt}.", dir=base))
    os.chmod(path, 0o755)
    try:
        total = fill_workspace(path, files, executables)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path, total


def remove_workspace(path: Path) -> bool:
    """Remove the dir; True when it was already gone. Raises OSError when it cannot. What
    vanishes meanwhile (another removal of the same dir: a cleanup command racing the
    attempt's own cleanup) is not a failure."""
    if not path.exists():
        return True
    if sys.version_info >= (3, 12):  # where `onexc` replaces the deprecated `onerror`
        shutil.rmtree(path, onexc=_ignore_vanished)
    else:
        shutil.rmtree(path, onerror=_ignore_vanished)
    return False


def _ignore_vanished(func: Any, path: str, exc: Any) -> None:
    error = exc if isinstance(exc, BaseException) else exc[1]  # onexc: the exception itself
    if not isinstance(error, FileNotFoundError):
        raise error


def fill_workspace(path: Path, files: dict[str, bytes], executables: Collection[str] = ()) -> int:
    """Write `files` into the existing dir `path` (a warm pool's parked workspace, empty
    until now), as `create_workspace` does; returns the bytes written. Files are readable
    by the sandbox's user (0644), those named in `executables` executable too (0755)."""
    total = 0
    for name, content in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        target.write_bytes(content)
        os.chmod(target, 0o755 if name in executables else 0o644)
        total += len(content)
    return total
