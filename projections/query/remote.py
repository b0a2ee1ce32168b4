"""`supervisor sql` against a running daemon: one `POST /v1/query` to its HTTP endpoint.

The daemon writes its base URL into `<data_dir>/http.url` while it runs
(`supervisor.daemon.http_server.http_url_file`); without that file the configured `http.listen` is
used (a wildcard host such as `0.0.0.0` is reached on loopback). The bearer token is
`$SUPERVISOR_HTTP_TOKEN`, else the configured `http.token`.

The standard library's `urllib` makes the request: one blocking call needs no event loop,
and proxies are bypassed (the daemon is reached directly, never through `$http_proxy`).
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from projections.errors import DaemonRefused, DaemonUnreachable
from projections.query.query import QueryResult
from projections.query.render import result_from_doc
from schemas.config import HttpConfig, inline_or_file

HTTP_URL_FILE = "http.url"
TOKEN_ENV = "SUPERVISOR_HTTP_TOKEN"
_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
_SLACK_S = 10.0
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def daemon_url(data_dir: Path, listen: str) -> str:
    """The daemon's base URL: what it wrote into `<data_dir>/http.url`, else `listen`
    (`HOST:PORT`, `[v6]:PORT`)."""
    try:
        written = (data_dir / HTTP_URL_FILE).read_text().strip()
    except OSError:
        written = ""
    if written:
        return written.rstrip("/")
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    host = _WILDCARD.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


TOKEN_FILE = "http-token"
"""Where a daemon keeps the token it made at its first start (`supervisor.daemon.datadir`)."""


def daemon_token(http: HttpConfig, data_dir: Path | None = None) -> str | None:
    """`$SUPERVISOR_HTTP_TOKEN`, else the configured `http.token` or `http.token_file`
    (as the daemon reads them), else the token the data dir's daemon made. Raises
    ConfigError for a token file that cannot be read."""
    configured = os.environ.get(TOKEN_ENV) or inline_or_file(
        http.token, http.token_file, "http.token"
    )
    if configured or data_dir is None:
        return configured
    with contextlib.suppress(OSError):
        return (data_dir / TOKEN_FILE).read_text().strip() or None
    return None


def query_daemon(
    url: str, sql: str, *, max_rows: int, timeout_s: float, token: str | None = None
) -> QueryResult:
    """Run `sql` through the daemon at `url`. Raises DaemonUnreachable (nothing answered,
    or not in time) and DaemonRefused (an error answer: its status, code and message)."""
    body = json.dumps({"sql": sql, "max_rows": max_rows, "timeout_s": timeout_s}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{url}/v1/query", data=body, headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=timeout_s + _SLACK_S) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        raise _refusal(e.code, e.read(), e.reason) from e
    except urllib.error.URLError as e:
        raise DaemonUnreachable(url, str(e.reason)) from e
    except (OSError, TimeoutError) as e:
        raise DaemonUnreachable(url, repr(e)) from e
    try:
        return result_from_doc(json.loads(raw))
    except ValueError as e:
        raise DaemonRefused(200, "BAD_ANSWER", f"{url} answered with no query result: {e}") from e


def _refusal(status: int, raw: bytes, reason: str) -> DaemonRefused:
    """The error of an answer in the catalogue's shape `{"error": {"code", "message"}}`,
    or of whatever else came back."""
    error: Any = None
    with contextlib.suppress(ValueError, AttributeError):
        error = json.loads(raw).get("error")
    if isinstance(error, dict) and "code" in error:
        return DaemonRefused(status, str(error["code"]), str(error.get("message") or reason))
    text = raw.decode(errors="replace").strip()[:200]
    return DaemonRefused(status, f"HTTP_{status}", f"HTTP {status} {reason}: {text}".rstrip(": "))
