"""A task container's own engine calls made on the event loop (`supervisor.docker.aio`),
against a real dockerd: the same answers and the same error classes as through docker-py,
no worker thread, and nothing left open whatever loop made the calls."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from schemas.errors import ContainerVanished, DockerUnavailable, ImageNotFound
from supervisor.docker.internals import stdin_socket
from supervisor.docker.runtime import (
    ContainerRequest,
    DockerRuntime,
    Output,
    read_output,
    write_stdin,
)

pytestmark = pytest.mark.usefixtures("docker_client")

IMAGE = "supervisor-sandbox:busybox"


def _request(ws: Path, script: str, image: str = IMAGE, *, stdin: bool = False) -> ContainerRequest:
    return ContainerRequest(
        stdin=stdin,
        image=image,
        command=["sh", "-c", script],
        labels={"supervisor.test": "aio"},
        env={"GREETING": "hi"},
        workspace=str(ws),
        workspace_mount="/workspace",
        user="65534:65534",
        memory_mb=64,
        cpus=0.5,
        pids=32,
        tmpfs_size="4m",
    )


@pytest.mark.parametrize("pooled", [True, False])
async def test_a_container_s_calls_answer_as_docker_py_s_without_a_thread(
    tmp_dir: Path, pooled: bool
) -> None:
    runtime = DockerRuntime()
    try:
        async with contextlib.AsyncExitStack() as stack:
            if pooled:  # as the daemon's node: keep-alive connections, closed on exit
                await stack.enter_async_context(runtime.pooled())
            await _one_container(runtime, tmp_dir)
        # Every call went through the loop: no worker thread was started.
        assert runtime._pool._threads == set()
    finally:
        runtime.close()


async def _one_container(runtime: DockerRuntime, tmp_dir: Path) -> None:
    cid = await runtime.create(_request(tmp_dir, 'test "$GREETING" = hi && exit 7'))
    await runtime.start(cid)
    assert await runtime.wait(cid) == 7
    state = await runtime.inspect(cid)
    assert (state.exit_code, state.running, state.oom_killed) == (7, False, False)
    assert (await runtime.labels(cid))["supervisor.test"] == "aio"
    assert await runtime.kill(cid) is False  # not running: nothing to kill (409)
    assert await runtime.remove(cid, gvisor=False) is False
    assert await runtime.remove(cid, gvisor=False) is True  # gone already (404)
    with pytest.raises(ContainerVanished):
        await runtime.inspect(cid)
    with pytest.raises(ImageNotFound):
        await runtime.create(_request(tmp_dir, "true", image="supervisor-sandbox:nowhere"))


@pytest.mark.parametrize("pooled", [True, False])
async def test_an_attach_on_the_loop_carries_stdin_and_every_byte_of_output(
    tmp_dir: Path, pooled: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The attach stream is opened on the loop (the upgrade by hand): attached before the
    start (the cold path) or after it (an adoption: what the container printed before is
    not replayed, and nothing after it is lost to the answer's head), stdin written and
    ended through it, both streams read whole; a container that is not there is no such
    container."""
    runtime = DockerRuntime()
    try:
        async with contextlib.AsyncExitStack() as stack:
            if pooled:
                await stack.enter_async_context(runtime.pooled())
            assert runtime.calls is not None  # the loop's path, not docker-py's
            script = "echo early; read line; echo got:$line; echo err >&2; cat >/dev/null"
            for attach_first in (True, False):
                cid = await runtime.create(_request(tmp_dir, script, stdin=True))
                try:
                    if attach_first:
                        stream = await runtime.attach(cid, stdin=True)
                        await runtime.start(cid)
                    else:
                        await runtime.start(cid)
                        await asyncio.sleep(0.5)  # "early" is printed before the attach
                        stream = await runtime.attach(cid, stdin=True)
                    data = b"hello\n" + b"x" * 200_000
                    writer = runtime.run_blocking(write_stdin, stdin_socket(stream), data)
                    out = await runtime.run_blocking(read_output, stream, 1 << 20, Output(), list)
                    await writer
                    assert await runtime.wait(cid) == 0
                    early = b"early\n" if attach_first else b""
                    assert (bytes(out.stdout), bytes(out.stderr)) == (
                        early + b"got:hello\n",
                        b"err\n",
                    )
                finally:
                    await runtime.remove(cid, gvisor=False)
            with pytest.raises(ContainerVanished):
                await runtime.attach(cid)
    finally:
        runtime.close()
    # Nothing the loop had to report (a callback that failed, say).
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


async def test_a_container_started_at_once_after_its_attach_prints_each_line_once(
    tmp_dir: Path,
) -> None:
    """The cold path: attach, then start at once. With the engine's log replay asked for
    as well, a line printed while the replay read the log came twice (2 in 150 here)."""
    runtime = DockerRuntime()
    try:
        async with runtime.pooled():
            for _ in range(20):
                cid = await runtime.create(_request(tmp_dir, "echo no >&2; exit 3"))
                try:
                    stream = await runtime.attach(cid)
                    await runtime.start(cid)
                    out = await runtime.run_blocking(read_output, stream, 1 << 20, Output(), list)
                    assert await runtime.wait(cid) == 3
                    assert (bytes(out.stdout), bytes(out.stderr)) == (b"", b"no\n")
                finally:
                    await runtime.remove(cid, gvisor=False)
    finally:
        runtime.close()


def test_calls_from_one_loop_then_another_and_a_missing_socket_is_unavailable(
    tmp_dir: Path,
) -> None:
    runtime = DockerRuntime()
    try:
        for _ in range(2):  # two loops, one after the other

            async def run_one() -> int:
                cid = await runtime.create(_request(tmp_dir, "exit 3"))
                try:
                    await runtime.start(cid)
                    return await runtime.wait(cid)
                finally:
                    await runtime.remove(cid, gvisor=False)

            assert asyncio.run(run_one()) == 3
    finally:
        runtime.close()
    nowhere = DockerRuntime(f"unix://{tmp_dir}/no-dockerd.sock")

    async def refused() -> None:
        try:
            with pytest.raises(DockerUnavailable):
                await nowhere.create(_request(tmp_dir, "true"))
            with pytest.raises(DockerUnavailable):
                await nowhere.start("0123456789ab")
        finally:
            nowhere.close()

    asyncio.run(refused())


async def test_a_reference_that_is_no_container_reaches_no_other_endpoint(
    docker_client,  # type: ignore[no-untyped-def]
) -> None:
    """The engine's router resolves `..` in a path: `x/../../images/<image>` as a container
    (a forged cleanup command's resource, say) would be the image. No call is made for it:
    there is no such container, and the image is still there afterwards."""
    runtime = DockerRuntime()
    forged = f"x/../../images/{IMAGE}"
    try:
        for ref in (forged, "..", "."):
            with pytest.raises(ContainerVanished):
                await runtime.labels(ref)
            assert await runtime.kill(ref) is False
            assert await runtime.remove(ref, gvisor=False) is True  # nothing of that name
    finally:
        runtime.close()
    assert docker_client.images.get(IMAGE).tags  # the image was never touched
