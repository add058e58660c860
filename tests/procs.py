"""Real processes for integration tests: spawn, wait until ready, stop, collect output.

Integration tests run the proxy and its upstream as separate processes on real
ports, so what they prove holds for the deployed binary, not for an in-process
shortcut. Every wait here is bounded and every failure carries the process's
own output, because a test that hangs or says only "timed out" costs far more
than it saves.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Self

UPSTREAM_SCRIPT = Path(__file__).with_name("upstream_server.py")
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

Stream = Literal["stdout", "stderr", "any"]

_live: set[Process] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago.

    Another process can take it before the caller binds it; prefer `--port 0`
    plus a READY line where the program supports it, and use this only for
    ports that must be written into a config file up front.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ProcessError(RuntimeError):
    """A process failed to start or become ready; the message carries its output."""


class Process:
    """One child process whose output is collected continuously.

    Reader threads drain both pipes from the start, so a chatty child never
    blocks on a full pipe, and lines are available to `wait_for_line` as they
    arrive.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        self._lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._cond = threading.Condition()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self._readers = [
            threading.Thread(target=self._drain, args=(stream,), daemon=True)
            for stream in ("stdout", "stderr")
        ]
        for reader in self._readers:
            reader.start()
        _live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def stdout(self) -> str:
        with self._cond:
            return "".join(self._lines["stdout"])

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self._lines["stderr"])

    def _drain(self, stream: str) -> None:
        with getattr(self.popen, stream) as pipe:
            for line in pipe:
                with self._cond:
                    self._lines[stream].append(line)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def describe(self, tail: int = 4000) -> str:
        """The command, exit status and output tails: what a failing test should show."""
        return (
            f"{self.name} (pid {self.pid}, exit {self.returncode}): {' '.join(self.argv)}\n"
            f"--- stdout ---\n{self.stdout[-tail:]}\n--- stderr ---\n{self.stderr[-tail:]}"
        )

    def wait_for_line(
        self,
        pattern: str | re.Pattern[str],
        timeout: float = READY_TIMEOUT,
        stream: Stream = "stdout",
    ) -> re.Match[str]:
        """The first output line matching `pattern` (searched, not anchored).

        Fails fast if the process exits first, and after `timeout` seconds
        otherwise, in both cases with the output so far.
        """
        regex = re.compile(pattern)
        streams = ("stdout", "stderr") if stream == "any" else (stream,)
        seen = dict.fromkeys(streams, 0)
        deadline = time.monotonic() + timeout
        exited_at: float | None = None
        with self._cond:
            while True:
                for name in streams:
                    lines = self._lines[name]
                    for line in lines[seen[name] :]:
                        if match := regex.search(line):
                            return match
                    seen[name] = len(lines)
                if exited_at is None and self.popen.poll() is not None:
                    exited_at = time.monotonic()
                # After the exit, the readers get a moment for the last lines; a grandchild
                # still holding the pipes open must not stretch that to the full timeout.
                if exited_at is not None and (
                    not any(r.is_alive() for r in self._readers)
                    or time.monotonic() - exited_at > 0.5
                ):
                    raise ProcessError(
                        f"exited before printing {regex.pattern!r}\n{self.describe()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProcessError(
                        f"no line matching {regex.pattern!r} within {timeout}s\n{self.describe()}"
                    )
                self._cond.wait(min(remaining, 0.1))

    def wait_for_port(
        self, port: int, host: str = "127.0.0.1", timeout: float = READY_TIMEOUT
    ) -> None:
        """Block until `host:port` accepts TCP connections, for programs without a READY line."""
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise ProcessError(f"exited before listening on {host}:{port}\n{self.describe()}")
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise ProcessError(
                    f"{host}:{port} not listening within {timeout}s\n{self.describe()}"
                )
            time.sleep(0.05)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit code of a process expected to finish by itself (e.g. `keyproxy check`)."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ProcessError(f"still running after {timeout}s\n{self.describe()}") from None
        for reader in self._readers:
            reader.join(timeout)
        _live.discard(self)
        return code

    def send_signal(self, sig: int) -> None:
        """For SIGHUP-reload and SIGTERM-drain tests; a no-op once the process is gone."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL after `timeout` seconds; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        _live.discard(self)
        return self.popen.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn(
    argv: Sequence[str],
    *,
    ready: str | re.Pattern[str] | None = None,
    ready_stream: Stream = "stdout",
    port: int | None = None,
    host: str = "127.0.0.1",
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    name: str | None = None,
    timeout: float = READY_TIMEOUT,
) -> tuple[Process, re.Match[str] | None]:
    """Start a server process and return once it is ready, or stop it and raise.

    Ready means a line matching `ready` was printed and/or `host:port` accepts
    connections; the match is returned so callers can read e.g. a bound port.
    """
    process = Process(argv, env=env, cwd=cwd, name=name)
    try:
        match = process.wait_for_line(ready, timeout, ready_stream) if ready is not None else None
        if port is not None:
            process.wait_for_port(port, host, timeout)
    except BaseException:
        process.stop()
        raise
    return process, match


@atexit.register
def _kill_leftovers() -> None:
    """A test that forgot to stop its process must not leave it running after pytest exits."""
    for proc in list(_live):
        if proc.popen.poll() is None:
            proc.popen.kill()


class UpstreamServer:
    """A running `upstream_server.py`: its address, its secret and its request log."""

    def __init__(
        self,
        process: Process,
        host: str,
        port: int,
        header_secrets: Mapping[str, str],
        basic: tuple[str, str] | None,
        query_secrets: Mapping[str, str],
        tls: bool = False,
    ) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.header_secrets = dict(header_secrets)
        self.basic = basic
        self.query_secrets = dict(query_secrets)
        url_host = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if tls else 'http'}://{url_host}:{port}"
        # The harness talks to its own child over loopback: trusting the test certificate
        # here is not what is under test (the proxy's verification is).
        self._control_tls = _unverified_tls() if tls else None

    @property
    def secrets(self) -> list[str]:
        """Every secret value, for asserting that none of them reached a client."""
        values = [*self.header_secrets.values(), *self.query_secrets.values()]
        if self.basic:
            values.append(self.basic[1])
        return values

    def inject(self) -> dict[str, Any]:
        """The `upstream.inject` section that makes keyproxy satisfy this upstream."""
        section: dict[str, Any] = {}
        if self.header_secrets:
            section["headers"] = dict(self.header_secrets)
        if self.basic:
            section["basic"] = {"username": self.basic[0], "password": self.basic[1]}
        if self.query_secrets:
            section["query"] = dict(self.query_secrets)
        return section

    def _control(self, method: str, name: str) -> Any:
        request = urllib.request.Request(f"{self.url}/__control/{name}", method=method)
        with urllib.request.urlopen(request, timeout=5, context=self._control_tls) as response:
            return json.load(response)

    def records(self) -> list[dict[str, Any]]:
        """Requests received since the last reset, oldest first.

        Each has `seq`, `method`, `raw_path`, `version`, `headers` ([name, value]
        pairs as on the wire), `body_len`, `body_sha256`, `body` (text, or None
        above 64 KiB), `peer`, `authorized`, `status` (None until answered, or when
        aborted), `aborted` and `client_gone`.
        """
        return list(self._control("GET", "records"))

    def reset(self) -> None:
        self._control("POST", "reset")

    def stop(self) -> int:
        return self.process.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_upstream(
    *,
    header_secrets: Mapping[str, str] | None = None,
    basic: tuple[str, str] | None = None,
    query_secrets: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    env: Mapping[str, str] | None = None,
    timeout: float = READY_TIMEOUT,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
) -> UpstreamServer:
    """Launch the recording upstream and return once it is listening.

    With no secrets at all it accepts every request, which suits tests that
    only care about forwarding. With `tls_cert` and `tls_key` (PEM files) it
    serves HTTPS and its `url` starts with `https://`.
    """
    argv = [sys.executable, str(UPSTREAM_SCRIPT), "--host", host, "--port", str(port)]
    for name, value in (header_secrets or {}).items():
        argv += ["--header-secret", f"{name}={value}"]
    if basic:
        argv += ["--basic", f"{basic[0]}:{basic[1]}"]
    for name, value in (query_secrets or {}).items():
        argv += ["--query-secret", f"{name}={value}"]
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together")
    if tls_cert is not None and tls_key is not None:
        argv += ["--tls-cert", os.fspath(tls_cert), "--tls-key", os.fspath(tls_key)]
    process, ready = spawn(argv, ready=r"^READY (\d+)$", env=env, name="upstream", timeout=timeout)
    assert ready is not None
    return UpstreamServer(
        process,
        host,
        int(ready.group(1)),
        header_secrets or {},
        basic,
        query_secrets or {},
        tls=tls_cert is not None,
    )


def _unverified_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@contextmanager
def start_demo(port: int) -> Iterator[Process]:
    """`keyproxy demo` on `port`, as a user starts it; yields it once it says it is ready."""
    process, _ = spawn(
        [sys.executable, "-m", "keyproxy", "demo", "--port", str(port)],
        ready=r"Press Ctrl-C",
        name="demo",
        timeout=20,
    )
    try:
        yield process
    finally:
        process.stop()


@contextmanager
def start_demo_backend(secret: str) -> Iterator[int]:
    """The real demo REST backend (records with an owner field) on a free port; yields it."""
    process, match = spawn(
        [sys.executable, str(Path(__file__).with_name("demo_upstream.py")), secret],
        ready=r"READY (\d+)",
        name="demo-backend",
    )
    assert match is not None
    try:
        yield int(match.group(1))
    finally:
        process.stop()


@contextmanager
def raw_upstream(handler: type[socketserver.BaseRequestHandler]) -> Iterator[str]:
    """A hand-made upstream on a free loopback port (its URL), one thread per connection:
    for answers no HTTP library will write (broken framing, stray bytes)."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def recv_head(sock: socket.socket, data: bytes) -> tuple[bytes, bytes] | None:
    """Read until `data` holds a whole request head: (the head, the bytes after it), or None
    when the peer closes first."""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


class HeadAnswerer(socketserver.BaseRequestHandler):
    """A hand-made keep-alive upstream for `raw_upstream`: `answer` turns each request
    head (request line and header lines, no body) into the whole response's bytes."""

    def answer(self, head: bytes) -> bytes:
        raise NotImplementedError

    def handle(self) -> None:
        sock: socket.socket = self.request
        data = b""
        while (got := recv_head(sock, data)) is not None:
            head, data = got
            sock.sendall(self.answer(head))


def header_values(head: bytes, name: bytes) -> list[bytes]:
    """The values of the request head's `name` header (lower-case), stripped, in order."""
    return [
        value.strip()
        for line in head.split(b"\r\n")[1:]
        for found, _, value in [line.partition(b":")]
        if found.strip().lower() == name
    ]
