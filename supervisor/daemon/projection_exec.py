"""The projection service's interpreter (`python -m supervisor.compose.projection_service`),
started on its own. This module imports next to nothing, so that `supervisor serve` can
start the interpreter before its own imports: the two processes import side by side, and
`ProjectionProcess` hands the waiting interpreter its setup line once the node is open."""

from __future__ import annotations

import asyncio
import sys

SERVICE = "supervisor.compose.projection_service"


async def start_service(python: str = sys.executable) -> asyncio.subprocess.Process:
    """The service's interpreter, reading its setup line from stdin (closing stdin before
    writing one ends it with 0)."""
    return await asyncio.create_subprocess_exec(
        python,
        "-m",
        SERVICE,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,  # a terminal's Ctrl-C is the daemon's to handle
    )
