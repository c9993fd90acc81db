"""Debian's ``redis-server``, started by a test on an address it owns (loopback, or
the lab's rendezvous host), stopped by its PID. Missing: skipped, but under
``CI=true`` the test fails (./dev.sh installs it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from tests.prerequisites import require

REDIS_SERVER = "redis-server"


def _missing(path: str | None) -> str | None:
    if path is None:
        return "Debian's redis-server is missing (apt-get install redis-server; ./dev.sh does)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis Python package is missing (pip install -e '.[test]')"
    return None


def require_redis_server() -> str:
    """The path of Debian's ``redis-server`` (the test skips without it or the redis
    Python package; under CI=true it fails)."""
    path = shutil.which(REDIS_SERVER)
    require(_missing(path), "redis unavailable")
    assert path is not None  # else require() skipped or failed the test
    return path


@dataclass
class RedisServer:
    """One redis-server process: no persistence, no config file, its own directory."""

    host: str
    port: int
    popen: Callable[[list[str]], subprocess.Popen[bytes]] = field(
        default=lambda argv: subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE))
    # Where its address is reachable from (a lab host's Host.enter): for the PING.
    inside: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    proc: subprocess.Popen[bytes] | None = None
    _dir: str = ""

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        path = require_redis_server()
        self._dir = self._dir or tempfile.mkdtemp(prefix="nopf-redis-")
        self.proc = self.popen([path, "--bind", self.host, "--port", str(self.port),
                                "--save", "", "--appendonly", "no", "--dir", self._dir,
                                "--protected-mode", "no", "--daemonize", "no"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"redis-server exited at start: {err}")
            if self.ping():
                return self
            time.sleep(0.05)
        raise AssertionError(f"redis-server on {self.host}:{self.port} did not answer "
                             f"within {timeout} s")

    def ping(self) -> bool:
        """A PING answered (from this process' network namespace)."""
        try:
            with self.inside(), socket.create_connection((self.host, self.port),
                                                         timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGKILL by PID: the outage as nodes see it (nothing saved, nothing said)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
