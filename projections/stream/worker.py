"""A decode worker in a process of its own, for bulk runs (replay).

Reading the stream (nats-py) and decoding events (msgspec, Arrow conversion) are both
Python; in one process they take turns on the GIL and a replay runs at the speed of one
core. `DecodeProcess` moves the decoding to a child
(`python -c 'from projections.stream.worker import main; main()'`) that
talks over its stdin/stdout: each request is a pickled `(replies, subjects, payloads)`,
each answer a pickled `Staged` batch (Arrow tables travel as buffers) or the exception
the decoder raised. The pickles are written to and read from the pipes as streams: a
batch of 250k events is about 125 MB in and 155 MB out, and building each as one bytes
object first (then reading it whole) cost a fresh copy of it on each side, most of the
replaying process's page faults.

`DecodePool` runs several children, so that a bulk run decodes batches side by side.

A plain child process rather than `multiprocessing`: nothing of the caller's `__main__`
is re-imported in it, and it never forks a parent that runs DuckDB or Arrow threads. It
exits when its stdin closes, so it dies with its parent.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import pickle
import queue
import subprocess
import sys
import threading
from typing import IO, Any

from projections.errors import ProjectionError
from projections.stream.decode import Staged, stage_raw

_PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size; the default pipe holds 64 KiB


def _write(stream: IO[bytes], obj: Any) -> None:
    pickler = pickle.Pickler(stream, protocol=pickle.HIGHEST_PROTOCOL)
    # No memo: a batch's lists hold hundreds of thousands of distinct strings and bytes,
    # none of them twice, and no cycle; memoizing each cost more than writing it.
    pickler.fast = True
    pickler.dump(obj)
    stream.flush()


def _read(stream: IO[bytes]) -> Any:
    """One pickle from `stream`. EOFError at the end of the stream or in a pickle cut
    short (the other side died)."""
    try:
        return pickle.load(stream)
    except pickle.UnpicklingError as e:
        raise EOFError(str(e)) from e


def _widen(stream: IO[bytes] | None) -> None:
    """Make a pipe hold `_PIPE_BYTES`: fewer switches between the two sides of a batch."""
    if stream is not None:
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)


class DecodeProcess:
    """The child. `stage` is blocking (call it from a thread) and one call at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from projections.stream.worker import main; main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        _widen(self._proc.stdin)
        _widen(self._proc.stdout)

    def stage(self, replies: list[str], subjects: list[str], datas: list[bytes]) -> Staged:
        """`projections.stream.decode.stage_raw`, in the child. ProjectionError if it died."""
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        with self._lock:
            try:
                _write(proc.stdin, (replies, subjects, datas))
                answer = _read(proc.stdout)
            except (OSError, EOFError) as e:
                raise ProjectionError(f"the decode worker died (exit {proc.poll()})") from e
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]

    def close(self, timeout: float = 5.0) -> None:
        proc = self._proc
        if proc.stdin is not None:
            with contextlib.suppress(OSError):  # a dead child: what was unsent is moot
                proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


class DecodePool:
    """`size` decode processes; `stage` runs on whichever is free (call it from up to
    `size` threads at once). Batches decoded side by side keep their order: the projector
    applies them in the order it submitted them."""

    def __init__(self, size: int) -> None:
        self._free: queue.SimpleQueue[DecodeProcess] = queue.SimpleQueue()
        self._all: list[DecodeProcess] = []
        try:
            for _ in range(size):
                self._all.append(DecodeProcess())
        except BaseException:
            self.close()
            raise
        for worker in self._all:
            self._free.put(worker)

    def __len__(self) -> int:
        return len(self._all)

    def stage(self, replies: list[str], subjects: list[str], datas: list[bytes]) -> Staged:
        worker = self._free.get()
        try:
            return worker.stage(replies, subjects, datas)
        finally:
            self._free.put(worker)

    def close(self) -> None:
        for worker in self._all:
            worker.close()


def main() -> None:
    """The child's loop: a batch in, a staged batch (or the exception) out, until EOF."""
    gc.disable()  # a batch's objects hold no cycles; reference counting frees them
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            replies, subjects, datas = _read(stdin)
        except EOFError:
            return
        try:
            answer: Any = stage_raw(replies, subjects, datas)
        except Exception as e:
            answer = e
        del replies, subjects, datas
        _write(stdout, answer)
