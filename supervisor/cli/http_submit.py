"""`supervisor submit` through the data dir's running daemon: the quick path.

A script that submits a task and waits for it pays for a new process each time; the full
CLI imports nats-py, docker-py and the contract before it does anything. When the data dir
names a daemon that answers (`<data-dir>/http.url`), `submit` goes through its HTTP API
(`POST /v1/tasks`, then `GET /v1/tasks/{id}?wait`) importing only the standard library,
and prints what the NATS path prints, with the same exit codes. Anything else (`--help`, a
usage error, `--nats`, `--config`, `--node-id`, no daemon answering) is left to the full
CLI (`supervisor.cli.main`): `quick_submit` answers None before reading the spec.

The result printer and the exit codes are defined here, once, for both paths."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.parse
from typing import Any

from supervisor.cli.args import add_submit_parser

EXIT_OK, EXIT_FAILED, EXIT_REJECTED, EXIT_INFRA = 0, 1, 2, 3
LONGEST_WAIT_S = 25.0
_CONNECT_S = 2.0


def exit_code_of(result: dict[str, Any]) -> int:
    """The design's exit code for a Result (as JSON): 0 succeeded, 1 failed, 2 rejected,
    3 an infrastructure error."""
    if result.get("status") == "succeeded":
        return EXIT_OK
    if result.get("status") == "rejected":
        return EXIT_REJECTED
    error = result.get("error") or {}
    return EXIT_INFRA if error.get("type") == "infrastructure" else EXIT_FAILED


def print_result(result: dict[str, Any], as_json: bool) -> None:
    """A Result (as JSON): the JSON itself, or the task's output and a summary on stderr."""
    if as_json:
        sys.stdout.write(json.dumps(result, separators=(",", ":"), ensure_ascii=False) + "\n")
        return
    for stream, text in ((sys.stdout, result.get("stdout")), (sys.stderr, result.get("stderr"))):
        if text:
            stream.write(text if text.endswith("\n") else text + "\n")
    line = (
        f"task {result['task_id']}: {result['status']} after {result.get('attempts', 0)} "
        f"attempt(s) in {result.get('duration_s') or 0.0:.2f}s"
    )
    if result.get("exit_code") is not None:
        line += f", exit code {result['exit_code']}"
    error = result.get("error")
    if error is not None:
        line += f"\n  error: {error['type']}/{error['code']}: {error['message']}"
    if result.get("stdout_truncated") or result.get("stderr_truncated"):
        line += "\n  output truncated at the task's output cap"
    sys.stderr.write(line + "\n")


class _Unparsed(Exception):
    pass


class _QuietParser(argparse.ArgumentParser):
    """Parses as the full CLI does, but leaves every error (and its message) to it."""

    def error(self, message: str) -> Any:
        raise _Unparsed(message)


class _Daemon:
    """One keep-alive connection to the daemon's HTTP API."""

    def __init__(self, url: str, token: str | None) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or u.hostname is None:
            raise OSError(f"not an http URL: {url}")
        self.conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=_CONNECT_S)
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        self.conn.request(method, path, body=body, headers=self.headers)
        resp = self.conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data) if data else None
        except ValueError:
            return resp.status, None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def quick_submit(argv: list[str]) -> int | None:
    """Run `supervisor submit ...` through the data dir's daemon and return the exit code;
    None (nothing read, nothing sent) when the full CLI must do it."""
    if not argv or argv[0] != "submit" or any(a in ("-h", "--help") for a in argv):
        return None
    parser = _QuietParser(prog="supervisor", add_help=False)
    add_submit_parser(parser.add_subparsers(dest="command", parser_class=_QuietParser))
    try:
        args = parser.parse_args(argv)
    except _Unparsed:
        return None
    if args.nats_url or args.config or args.node_id:
        return None
    data_dir = args.data_dir or os.environ.get("SUPERVISOR_DATA_DIR") or ".supervisor"
    url = _read(os.path.join(data_dir, "http.url"))
    if url is None:
        return None
    token = os.environ.get("SUPERVISOR_HTTP_TOKEN") or _read(os.path.join(data_dir, "http-token"))
    try:
        daemon = _Daemon(url, token)
        daemon.conn.connect()
        # Answers may take as long as a `?wait`: the short timeout was for connecting only.
        assert daemon.conn.sock is not None
        daemon.conn.sock.settimeout(LONGEST_WAIT_S + 30)
    except OSError:
        return None  # no daemon answers: the full CLI goes straight to NATS
    try:
        return _submit(daemon, args)
    except (OSError, http.client.HTTPException) as e:
        sys.stderr.write(f"supervisor: the daemon at {url} stopped answering: {e}\n")
        return EXIT_INFRA
    finally:
        daemon.conn.close()


def _spec_body(args: argparse.Namespace) -> bytes:
    if args.spec == "-":
        raw = sys.stdin.buffer.read()
    else:
        with open(args.spec, "rb") as f:
            raw = f.read()
    overrides = {"priority": args.priority, "correlation_id": args.correlation_id}
    if not any(overrides.values()):
        return raw
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw  # the daemon says what is wrong with it
    if isinstance(doc, dict):
        doc.update({k: v for k, v in overrides.items() if v})
        return json.dumps(doc).encode()
    return raw


def _submit(daemon: _Daemon, args: argparse.Namespace) -> int:
    try:
        body = _spec_body(args)
    except OSError as e:
        sys.stderr.write(f"supervisor: invalid spec: spec: cannot read {args.spec}: {e.strerror}\n")
        return EXIT_REJECTED
    status, answer = daemon.request("POST", "/v1/tasks", body)
    if status >= 400:
        return _refused(status, answer, args.json)
    if not args.wait:
        if args.json:
            sys.stdout.write(json.dumps(answer, separators=(",", ":")) + "\n")
        else:
            sys.stdout.write(answer["task_id"] + "\n")
        return EXIT_OK
    task_id = answer["task_id"]
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while True:
        left = LONGEST_WAIT_S if deadline is None else deadline - time.monotonic()
        wait = max(0.0, min(left, LONGEST_WAIT_S))
        status, view = daemon.request("GET", f"/v1/tasks/{task_id}?wait={wait:g}")
        if status == 200 and view.get("result") is not None:
            print_result(view["result"], args.json)
            return exit_code_of(view["result"])
        if status == 200 and view.get("outcome") is not None:
            sys.stderr.write(f"task {task_id}: ended, but the daemon serves no Result\n")
            return EXIT_INFRA
        if status not in (200, 404):
            return _refused(status, view, args.json)
        if deadline is not None and time.monotonic() >= deadline:
            sys.stderr.write(
                f"task {task_id}: no result within {args.timeout}s "
                "(it is still queued or running)\n"
            )
            return EXIT_INFRA
        if status == 404:
            time.sleep(0.05)  # submitted, not yet known to the read side


def _refused(status: int, answer: Any, as_json: bool) -> int:
    """An error answer: a task refused (a rejected Result, exit 2), or the daemon unable to
    take it (NATS, the disk: exit 3), as the NATS path reports them."""
    error = (answer or {}).get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict):
        sys.stderr.write(f"supervisor: the daemon answered HTTP {status}\n")
        return EXIT_INFRA
    if error.get("type") == "infrastructure":
        sys.stderr.write(f"supervisor: {error.get('message')}\n")
        return EXIT_INFRA
    task_id = error.get("task_id")
    if task_id is None and not as_json:
        sys.stderr.write(f"supervisor: {error.get('message')}\n")
        return EXIT_REJECTED
    result = {
        "task_id": task_id or f"t-{os.urandom(8).hex()}",
        "status": "rejected",
        "attempts": 0,
        "exit_code": None,
        "stdout": "",
        "stderr": "",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "duration_s": 0.0,
        "error": {
            "type": error.get("type"),
            "code": error.get("code"),
            "message": error.get("message"),
            "retryable": bool(error.get("retryable")),
            "details": error.get("details") or {},
            "task_id": task_id,
            "container_id": None,
            "timestamp": None,
        },
        "cpu_time_s": None,
        "peak_memory_bytes": None,
    }
    print_result(result, as_json)
    return EXIT_REJECTED
