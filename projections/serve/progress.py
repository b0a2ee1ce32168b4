"""A one-line progress bar for long replays, drawn on a terminal only.

`ProgressBar(stream)` is a `ProgressCallback`: it redraws at most ten times a second, and
only when `stream` is a TTY, so logs and pipes never see carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from projections.serve.projector import Progress

_WIDTH = 30


def render_bar(p: Progress) -> str:
    """The bar's text for `p` (pure): fraction of the sequence range done, counts, rate."""
    total = max(p.target - p.from_seq, 0)
    done = min(max(p.seq - p.from_seq, 0), total) if total else 0
    frac = done / total if total else 1.0
    filled = int(frac * _WIDTH)
    rate = done / p.elapsed_s if p.elapsed_s > 0 else 0.0
    return (
        f"replay [{'#' * filled}{'.' * (_WIDTH - filled)}] {frac * 100:5.1f}%  "
        f"seq {p.seq:,}/{p.target:,}  {rate:,.0f} msg/s  dead {p.dead:,}"
    )


class ProgressBar:
    """Draws `render_bar` on `stream` (default stderr) if it is a terminal."""

    def __init__(self, stream: TextIO | None = None, *, interval_s: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s
        self._last = 0.0
        self._drawn = False

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < self.interval_s and p.seq < p.target):
            return
        self._last = now
        self.stream.write("\r" + render_bar(p))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
