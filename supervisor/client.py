"""A Python client of the HTTP API (`supervisor serve`), typed with the contract's Structs.

```python
from schemas import TaskSpec
from supervisor.client import Client

with Client("http://127.0.0.1:8787", token=None) as c:
    result = c.run(TaskSpec(image="supervisor-sandbox:busybox", command=["echo", "hi"]))
    print(result.status, result.stdout)
```

`AsyncClient` has the same methods as coroutines (and `errors` as an async iterator);
`Client` runs an `AsyncClient` on a private event loop, so it cannot be used from inside a
running loop (use `AsyncClient` there). Every error answer is raised as
`schemas.errors.ApiError` (`status`, `type`, `code`, `message`, `details`), a connection
that fails as `ClientConnectionError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import aiohttp
import msgspec

from schemas import ErrorRaised, Result, TaskSpec
from schemas.errors import ApiError, SupervisorError
from schemas.events import decode_event
from schemas.http import (
    Cancelling,
    ErrorAnswer,
    QueryAnswer,
    Submitted,
    TaskPage,
    TaskRow,
    TaskView,
)

__all__ = ["AsyncClient", "Client", "ClientConnectionError"]

T = TypeVar("T")

OnAnswer = Callable[[str, str, int, bytes, str], None]
"""Called with (method, url, status, body, content type) for every answer: for logging, or
for checking answers against the OpenAPI document."""

LONGEST_WAIT_S = 25.0
"""The longest single `?wait=` a client asks for; `wait` repeats it up to its timeout."""


class ClientConnectionError(SupervisorError):
    """The daemon could not be reached (refused, reset, or no answer in time)."""

    tag = "client_connection_error"


class AsyncClient:
    """A client of one daemon's HTTP API (`supervisor serve`), typed with the contract's
    Structs. Every method is one request (or a poll of them: `wait`, `run`,
    `iter_tasks`), answers the decoded Struct, and raises `ApiError` for an answer the
    catalogue classifies (its `type`, `code`, `retryable`, `status`) and
    `ClientConnectionError` when the daemon cannot be reached. A refusal is never retried
    here: `ApiError.retryable` tells the caller whether sending again may succeed. One
    `aiohttp` session, opened on first use; close it with `close` or `async with`.
    `token` is the daemon's bearer token (`<data-dir>/http-token`, or `[http] token`)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = 60.0,
        on_answer: OnAnswer | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._on_answer = on_answer
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        return self._session

    async def _call(
        self,
        method: str,
        path: str,
        out: type[T],
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
    ) -> T:
        data = None if body is None else msgspec.json.encode(body)
        url = self.url + path
        try:
            async with self._http().request(
                method,
                url,
                data=data,
                params=params,
                headers={"Content-Type": "application/json"} if data is not None else None,
            ) as resp:
                status, answer = resp.status, await resp.read()
                ctype = resp.headers.get("Content-Type", "")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ClientConnectionError(f"{method} {url}: {type(e).__name__}: {e}") from e
        if self._on_answer is not None:
            self._on_answer(method, str(resp.url), status, answer, ctype)
        if status >= 400:
            raise _api_error(status, answer)
        return msgspec.json.decode(answer, type=out)

    async def submit(self, spec: TaskSpec) -> Submitted:
        """Queue one task: `status` is `queued`, or `known` for the same spec under a task
        id submitted before. ApiError 400/403/409/429/503/507 when it is not queued."""
        return await self._call("POST", "/v1/tasks", Submitted, body=spec)

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[Submitted | ApiError]:
        """Queue specs in one request (at most the daemon's `http.max_batch`); each is
        answered as `submit` would have been, the refusals as ApiError values."""
        doc = await self._call("POST", "/v1/tasks/batch", _Batch, body={"tasks": list(specs)})
        out: list[Submitted | ApiError] = []
        for item in doc.results:
            if item.status >= 400:
                out.append(_api_error(item.status, msgspec.json.encode(item.body)))
            else:
                out.append(msgspec.convert(item.body, Submitted))
        return out

    async def get(self, task_id: str, *, wait_s: float = 0.0) -> TaskView:
        """The task; with `wait_s`, once it has ended or after that many seconds (at most
        300). ApiError 404 TASK_NOT_FOUND when the daemon does not know it."""
        params = {"wait": f"{wait_s:g}"} if wait_s else None
        return await self._call("GET", f"/v1/tasks/{task_id}", TaskView, params=params)

    async def wait(self, task_id: str, *, timeout_s: float = 300.0) -> TaskView:
        """The task once it has ended (`result` set). A task just submitted that the
        projection does not know yet is waited for too. TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                view = await self.get(task_id, wait_s=max(0.0, min(left, LONGEST_WAIT_S)))
            except ApiError as e:
                if e.code != "TASK_NOT_FOUND" or left <= 0:
                    raise
                await asyncio.sleep(min(0.2, max(left, 0)))
                continue
            if view.result is not None or view.outcome is not None:
                return view
            if time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} has not ended after {timeout_s:g}s")

    async def run(self, spec: TaskSpec, *, timeout_s: float = 300.0) -> Result:
        """Submit, then wait for the task's Result."""
        sub = await self.submit(spec)
        view = await self.wait(sub.task_id, timeout_s=timeout_s)
        if view.result is None:  # ended, but the daemon serves no Result (no projection)
            raise ApiError(503, "infrastructure", "RESULT_UNAVAILABLE", "the task has no Result")
        return view.result

    async def list_tasks(self, *, cursor: str | None = None, **filters: str | int) -> TaskPage:
        """One page of tasks: filters `state`, `outcome`, `correlation_id`, `since`,
        `limit`; pass the page's `next_cursor` as `cursor` for the next."""
        params = {k: str(v) for k, v in filters.items()}
        if cursor is not None:
            params["cursor"] = cursor
        return await self._call("GET", "/v1/tasks", TaskPage, params=params)

    async def iter_tasks(self, **filters: str | int) -> AsyncIterator[TaskRow]:
        """Every task matching the filters, page after page."""
        cursor: str | None = None
        while True:
            page = await self.list_tasks(cursor=cursor, **filters)
            for row in page.tasks:
                yield row
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, task_id: str) -> Cancelling:
        """Cancel a task that has not ended. ApiError 404 TASK_NOT_FOUND, 409 TASK_ENDED."""
        return await self._call("DELETE", f"/v1/tasks/{task_id}", Cancelling)

    async def query(self, sql: str, **options: Any) -> QueryAnswer:
        """One read-only SQL statement over the projection (`max_rows`, `timeout_s`)."""
        return await self._call("POST", "/v1/query", QueryAnswer, body={"sql": sql, **options})

    async def errors(self, **filters: str | int) -> AsyncIterator[ErrorRaised]:
        """The error events as they are raised (filters `type`, `code`, `task`, `since`,
        `limit`), until `limit` events or the caller stops iterating."""
        params = {k: str(v) for k, v in filters.items()}
        url = self.url + "/v1/errors"
        try:
            async with self._http().get(
                url, params=params, timeout=aiohttp.ClientTimeout(total=None)
            ) as resp:
                if resp.status >= 400:
                    raise _api_error(resp.status, await resp.read())
                async for line in resp.content:
                    if line.strip():
                        event = decode_event(line)
                        if isinstance(event, ErrorRaised):
                            yield event
        except aiohttp.ClientError as e:
            raise ClientConnectionError(f"GET {url}: {type(e).__name__}: {e}") from e


class _Item(msgspec.Struct):
    status: int
    body: dict[str, Any]


class _Batch(msgspec.Struct):
    results: list[_Item]


def _api_error(status: int, body: bytes) -> ApiError:
    try:
        err = msgspec.json.decode(body, type=ErrorAnswer).error
    except msgspec.MsgspecError:
        text = body[:200].decode(errors="replace")
        return ApiError(status, "infrastructure", f"HTTP_{status}", text or "no body")
    extra = {
        k: v
        for k, v in msgspec.structs.asdict(err).items()
        if k not in ("type", "code", "message") and v is not None
    }
    return ApiError(status, err.type, err.code, err.message, **extra)


class Client:
    """`AsyncClient`'s methods, blocking (on a private event loop of its own)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = 60.0,
        on_answer: OnAnswer | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._async = AsyncClient(url, token=token, timeout_s=timeout_s, on_answer=on_answer)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._async.close())
            self._loop.close()

    def _run(self, aw: Awaitable[T]) -> T:
        return self._loop.run_until_complete(aw)

    def submit(self, spec: TaskSpec) -> Submitted:
        return self._run(self._async.submit(spec))

    def submit_many(self, specs: Sequence[TaskSpec]) -> list[Submitted | ApiError]:
        return self._run(self._async.submit_many(specs))

    def get(self, task_id: str, *, wait_s: float = 0.0) -> TaskView:
        return self._run(self._async.get(task_id, wait_s=wait_s))

    def wait(self, task_id: str, *, timeout_s: float = 300.0) -> TaskView:
        return self._run(self._async.wait(task_id, timeout_s=timeout_s))

    def run(self, spec: TaskSpec, *, timeout_s: float = 300.0) -> Result:
        return self._run(self._async.run(spec, timeout_s=timeout_s))

    def list_tasks(self, *, cursor: str | None = None, **filters: str | int) -> TaskPage:
        return self._run(self._async.list_tasks(cursor=cursor, **filters))

    def iter_tasks(self, **filters: str | int) -> Iterator[TaskRow]:
        return self._iterate(self._async.iter_tasks(**filters))

    def cancel(self, task_id: str) -> Cancelling:
        return self._run(self._async.cancel(task_id))

    def query(self, sql: str, **options: Any) -> QueryAnswer:
        return self._run(self._async.query(sql, **options))

    def errors(self, **filters: str | int) -> Iterator[ErrorRaised]:
        return self._iterate(self._async.errors(**filters))

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())  # type: ignore[attr-defined]
