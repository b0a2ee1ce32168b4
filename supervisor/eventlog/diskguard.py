"""Whether this node can still record: the data dir's free space.

Everything the supervisor must write lives under the data dir (the outbox, the embedded
NATS store, the projection). When that disk is full the node must say so by name
(`resource/DISK_FULL`), refuse new work it could not record, stop pulling, and pick up by
itself once space is back. `DiskGuard` is the one place that decides it: the disk is full
while events wait in memory because the outbox's disk refused them, or while the free
space is under the configured floor (so that the NATS store, on the same disk, is not the
first to hit the wall). `os.statvfs` costs microseconds, so it is asked, not polled.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


class DiskGuard:
    def __init__(self, path: Path, *, min_free_bytes: int, held: Callable[[], bool]) -> None:
        self.path = Path(path)
        self.min_free_bytes = min_free_bytes
        self.held = held

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the data dir's filesystem."""
        try:
            st = os.statvfs(self.path)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def space_ok(self) -> bool:
        return self.free_bytes() >= self.min_free_bytes

    def reason(self) -> str | None:
        """None while there is room; otherwise why the node cannot record (no paths: this
        reaches `/readyz`, which anyone may read)."""
        if self.held():
            return "DISK_FULL: the data dir has no space left; events wait in memory"
        free = self.free_bytes()
        if free < self.min_free_bytes:
            return (
                f"DISK_FULL: the data dir has {free // 1024} KiB free, under the floor of "
                f"{self.min_free_bytes // 1024} KiB"
            )
        return None
