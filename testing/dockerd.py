"""A private Docker engine for tests and benchmarks that stop and restart dockerd.

Stopping the machine's own dockerd would stop every other test's containers; a second
engine with its own data root, exec root, pid file and socket is a real dockerd that one
test may stop at will. It gets the sandbox image from the main engine (`docker save` into
`docker load`), so nothing is pulled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import docker

from testing.daemon import SANDBOX_IMAGE


class PrivateDockerd:
    def __init__(self, root: Path) -> None:
        # Unix socket paths are limited to 108 bytes: keep the socket short.
        self.root = root
        self.sock = root / "d.sock"
        self.url = f"unix://{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> PrivateDockerd:
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "dockerd.log").open("ab")
        self.proc = subprocess.Popen(
            [
                "dockerd",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--data-root",
                str(self.root / "data"),
                "--exec-root",
                str(self.root / "exec"),
                "--pidfile",
                str(self.root / "docker.pid"),
                "-H",
                self.url,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"private dockerd exited: {self.log()[-2000:]}")
            if self._answers_ping():
                return self
            time.sleep(0.1)
        raise AssertionError(f"private dockerd not ready: {self.log()[-2000:]}")

    def _answers_ping(self) -> bool:
        # A raw request: docker-py leaks its socket when the connect itself fails.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(self.sock))
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                head = s.recv(64)
        except OSError:
            return False
        return head.startswith(b"HTTP/1.") and b" 200 " in head

    def load_sandbox_image(self) -> None:
        save = subprocess.Popen(["docker", "save", SANDBOX_IMAGE], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "-H", self.url, "load", "-q"],
            stdin=save.stdout,
            check=True,
            capture_output=True,
            timeout=120,
        )
        assert save.stdout is not None
        save.stdout.close()
        assert save.wait(60) == 0

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (dockerd stops its containers first), then wait for the process."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def destroy(self) -> None:
        """Remove every container it holds, stop it and delete its directories."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                client = docker.DockerClient(base_url=self.url, timeout=30)
                for c in client.containers.list(all=True):
                    c.remove(force=True, v=True)
                client.close()
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "dockerd.log"
        return path.read_text(errors="replace") if path.exists() else ""
