"""What an online judge asks of a task, against a real dockerd and nats-server: standard
input (text and bytes), binary files, a CPU-time limit distinct from the wall clock, and the
CPU time and peak memory each Result carries, read from the container's cgroup."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from schemas import ContainerExited, KillIssued, Limits, Result, RetryPolicy, TaskSpec
from schemas.config import Bounds, Config, Policy
from schemas.errors import InvalidSpec
from supervisor.daemon.node import Node, open_node
from supervisor.policy.admission import admit
from testing.daemon import LINGER
from testing.stream import stream_events
from tests.conftest import SANDBOX_IMAGE

pytestmark = pytest.mark.usefixtures("docker_client")


@pytest.fixture
async def node(tmp_dir: Path, nats_url: str) -> AsyncIterator[Node]:
    cfg = Config(data_dir=str(tmp_dir / "data"), node_id="n1")
    async with open_node(cfg, nats_url=nats_url) as n:
        yield n


def _spec(command: list[str], **kw: object) -> TaskSpec:
    kw.setdefault("retry", RetryPolicy(max_attempts=1))
    return TaskSpec(image=SANDBOX_IMAGE, command=command, **kw)  # type: ignore[arg-type]


async def _run(node: Node, spec: TaskSpec) -> Result:
    result = await node.executor.run(spec)
    await node.executor.attempts.drain()
    assert await node.events.flush(10)
    return result


async def test_stdin_text_and_bytes_reach_the_script(node: Node) -> None:
    text = await _run(node, _spec(["sh", "-c", 'read a; read b; echo "$b/$a"'], stdin="x\ny\n"))
    assert (text.status, text.stdout) == ("succeeded", "y/x\n")

    blob = bytes(range(256)) * 40 + b"\x00\xff"
    raw = await _run(
        node, _spec(["md5sum"], stdin_base64=base64.b64encode(blob).decode(), limits=Limits())
    )
    assert raw.stdout.split()[0] == hashlib.md5(blob).hexdigest()

    # Without stdin the script reads an empty input at once.
    empty = await _run(node, _spec(["wc", "-c"]))
    assert empty.stdout.strip() == "0"


async def test_stdin_the_script_does_not_read_ends_with_it(node: Node) -> None:
    """3 MB the script never reads: the write ends when the container does, the attempt
    is not held until the output drain gives up."""
    result = await _run(node, _spec(["true"], stdin="x" * 3_000_000))
    assert result.status == "succeeded"
    assert result.duration_s < 4  # the drain would give up at 5 s


async def test_binary_files_arrive_byte_for_byte(node: Node) -> None:
    blob = os.urandom(70_000)
    spec = _spec(
        ["sh", "-c", "md5sum /workspace/bin/prog.dat; cat /workspace/readme.txt"],
        files={"readme.txt": "text too\n"},
        files_base64={"bin/prog.dat": base64.b64encode(blob).decode()},
    )
    result = await _run(node, spec)
    assert result.stdout == f"{hashlib.md5(blob).hexdigest()}  /workspace/bin/prog.dat\ntext too\n"


async def test_an_uploaded_program_marked_executable_is_the_command(node: Node) -> None:
    """A judge compiles elsewhere and sends the binary (here a static busybox) with
    `executables`: it runs as the command itself, from the read-only workspace; the same
    file without the mark cannot be executed (126), nor can anything be made executable
    from inside."""
    program = base64.b64encode(Path("/bin/busybox").read_bytes()).decode()
    ran = await _run(
        node,
        _spec(
            [
                "/workspace/bin/busybox",
                "sh",
                "-c",
                "echo ran; chmod +x /workspace/bin/data || echo ro; ls -l /workspace/bin/* | cut -c1-10",
            ],
            files_base64={"bin/busybox": program, "bin/data": program},
            executables=["bin/busybox"],
        ),
    )
    assert ran.status == "succeeded", ran.error
    assert ran.stdout == "ran\nro\n-rwxr-xr-x\n-rw-r--r--\n"  # bin/busybox, bin/data

    unmarked = await _run(
        node,
        _spec(
            ["/workspace/busybox", "true"],
            files_base64={"busybox": program},
        ),
    )
    assert unmarked.exit_code == 126
    assert unmarked.error is not None and unmarked.error.code == "NONZERO_EXIT"


async def test_a_busy_loop_past_its_cpu_time_is_killed(node: Node, nats_url: str) -> None:
    spec = _spec(["sh", "-c", "while :; do :; done"], limits=Limits(cpu_time_s=0.5, timeout_s=30))
    result = await _run(node, spec)
    assert result.error is not None
    assert (result.error.type, result.error.code) == ("timeout", "CPU_TIME_EXCEEDED")
    assert result.error.retryable is False
    assert result.cpu_time_s is not None and result.cpu_time_s >= 0.5
    assert result.duration_s < 30
    events = [e for e in await stream_events(nats_url) if e.task_id == result.task_id]
    kills = [e.reason for e in events if isinstance(e, KillIssued)]
    assert kills == ["cpu_time"]
    (exited,) = [e for e in events if isinstance(e, ContainerExited)]
    assert exited.cpu_time_s == result.cpu_time_s
    assert exited.evidence.kills_issued == ("cpu_time",)


async def test_a_sleeper_outlives_its_cpu_time_in_wall_clock(node: Node) -> None:
    """1.5 s asleep uses almost no CPU: a 0.5 s CPU limit lets it finish."""
    spec = _spec(["sleep", "1.5"], limits=Limits(cpu_time_s=0.5, timeout_s=30))
    result = await _run(node, spec)
    assert result.status == "succeeded", result.error
    assert result.duration_s >= 1.5
    assert result.cpu_time_s is not None and 0 <= result.cpu_time_s < 0.5


async def test_peak_memory_is_the_cgroup_high_water_mark(node: Node) -> None:
    small = await _run(node, _spec(["true"]))
    # dd holds one 40 MiB block in memory.
    big = await _run(
        node,
        _spec(
            ["sh", "-c", "dd if=/dev/zero of=/dev/null bs=40M count=1 2>/dev/null; sleep 0.2"],
            limits=Limits(memory_mb=128),
        ),
    )
    assert big.status == "succeeded", big.error
    assert small.peak_memory_bytes is not None and big.peak_memory_bytes is not None
    assert big.peak_memory_bytes >= 40 * 1024 * 1024 > small.peak_memory_bytes


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"stdin_base64": "!!"}, "stdin_base64", "not base64"),
        ({"stdin": "a", "stdin_base64": "YQ=="}, "stdin_base64", "not both"),
        ({"files_base64": {"a": "%%"}}, "files_base64.a", "not base64"),
        ({"files": {"a": "x"}, "files_base64": {"a": "YQ=="}}, "files_base64.a", "also named"),
        ({"files_base64": {"../x": "YQ=="}}, "files.../x", "relative path"),
        ({"stdin": "x" * 11}, "stdin", "above the configured bound 10"),
        ({"files_base64": {"a": base64.b64encode(b"y" * 11).decode()}}, "files", "11 bytes"),
        ({"limits": Limits(cpu_time_s=700)}, "limits.cpu_time_s", "above the configured bound"),
        ({"files": {"a": "x"}, "executables": ["b"]}, "executables.b", "names no file"),
    ],
)
def test_admission_names_the_bad_field(fields: dict[str, object], field: str, says: str) -> None:
    bounds = Bounds(max_stdin_bytes=10, max_files_bytes=10)
    with pytest.raises(InvalidSpec) as e:
        admit(_spec(["true"], **fields), bounds, Policy())
    assert e.value.field == field
    assert says in str(e.value)


async def test_a_child_killed_for_memory_fails_the_task_even_when_the_script_exits_0(
    node: Node,
) -> None:
    script = f"head -c 200000000 /dev/zero | sort >/dev/null; echo survived; {LINGER}"
    result = await _run(node, _spec(["sh", "-c", script], limits=Limits(memory_mb=32)))

    assert result.stdout == "survived\n"
    assert result.exit_code == 0
    assert result.error is not None
    assert (result.status, result.error.code) == ("failed", "OOM_KILLED")
    assert result.error.details["memory_oom_events"] >= 1


async def test_an_unexpected_error_inside_an_attempt_is_classified_at_once(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever escapes the layers below (here the workspace writer) ends the attempt as
    INTERNAL_ERROR, cleaned up, instead of leaving it open until a successor calls it lost."""

    def broken(*_: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("supervisor.execution.attempt.create_workspace", broken)
    result = await _run(node, _spec(["true"]))

    assert result.error is not None
    assert (result.status, result.error.type, result.error.code) == (
        "failed",
        "infrastructure",
        "INTERNAL_ERROR",
    )
    events = await stream_events(node.nats_url, f"sup.*.*.*.{result.task_id}")
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("AttemptFinished") == 1 and kinds.count("TaskFailed") == 1
