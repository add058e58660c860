"""Bodies are streamed, not buffered: slow readers and writers on either side (README,
What keyproxy does to a forwarded request)."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import socketserver
import threading
import time

from tests.procs import raw_upstream, recv_head
from tests.proxy_process import KEYS, Keyproxy, base_config, start_keyproxy


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def read_response(sock: socket.socket, pace: float = 0.0) -> tuple[bytes, bytes]:
    """Head and body of one Content-Length response, reading in small slow steps."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    digest = hashlib.sha256(body)
    received = len(body)
    while received < length:
        chunk = sock.recv(min(65536, length - received))
        assert chunk, "connection closed early"
        digest.update(chunk)
        received += len(chunk)
        if pace:
            time.sleep(pace)
    return head, digest.hexdigest().encode()


def test_a_slow_client_is_served_without_buffering_the_body(proxy: Keyproxy):
    size = 40_000_000
    before = rss_kib(proxy.process.pid)
    with socket.create_connection((proxy.host, proxy.port), timeout=20) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        request = f"GET /big/{size} HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS['reader']}\r\n\r\n"
        sock.sendall(request.encode())
        time.sleep(
            1.0
        )  # the upstream could have sent everything by now; the proxy must not take it
        grown = rss_kib(proxy.process.pid) - before
        head, digest = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200 ")
        expected = next(
            line.split(b": ")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"x-body-sha256")
        )
        assert digest == expected
        assert grown < 16_000, f"proxy grew by {grown} KiB while the client was not reading"
        # the same connection, and the pooled upstream connection, keep working afterwards
        sock.sendall(
            f"GET /big/1000 HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS['reader']}\r\n\r\n".encode()
        )
        head, _ = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200 ")
    for _ in range(5):
        assert proxy.request("GET", "/big/100000", key=KEYS["reader"])[0] == 200


def test_a_large_upload_streams_with_bounded_memory(proxy: Keyproxy):
    size = 900_000  # under max_body (1 MiB in the test config)
    body = bytes(range(256)) * (size // 256)
    with socket.create_connection((proxy.host, proxy.port), timeout=20) as sock:
        head = (
            f"PUT /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS['admin']}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
        )
        sock.sendall(head.encode())
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        for offset in range(0, len(body), 100_000):
            sock.sendall(body[offset : offset + 100_000])
            time.sleep(0.01)
        response = b""
        while b'"body_sha256"' not in response:
            chunk = sock.recv(65536)
            assert chunk
            response += chunk
    assert hashlib.sha256(body).hexdigest().encode() in response


def test_expect_continue_refused_request_gets_no_100(proxy: Keyproxy):
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        sock.sendall(
            b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n"
        )
        response = sock.recv(4096)
    assert response.startswith(b"HTTP/1.1 401 ")


def test_requests_wait_for_a_free_upstream_connection(tmp_path, upstream):
    """With max_connections: 1, concurrent requests queue for the one socket instead of failing."""
    import threading

    from tests.proxy_process import base_config, start_keyproxy

    config = base_config(upstream.url, upstream.inject())
    config["upstream"]["max_connections"] = 1
    kp = start_keyproxy(tmp_path, config)
    try:
        upstream.reset()
        statuses: list[int] = []

        def one() -> None:
            statuses.append(kp.request("GET", "/slow/300", key=KEYS["reader"])[0])

        threads = [threading.Thread(target=one) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert statuses == [200, 200, 200, 200]
        peers = {record["peer"] for record in upstream.records()}
        assert len(peers) == 1, peers  # one upstream socket served them all, in turn
    finally:
        kp.stop()


#: Bytes each of the fast upstreams and clients below offers at once: far more than
#: socket buffers and keyproxy's own limits take, so only flow control stops them.
FLOOD = 64 * 1024 * 1024
#: Connections flooding at once: writes made while others were written in the same loop
#: turn are the ones keyproxy holds until the turn ends.
FLOODERS = 8


class _FloodingUpstream(socketserver.BaseRequestHandler):
    """Answers each request with FLOOD bytes as fast as the socket takes them."""

    def handle(self) -> None:
        if recv_head(self.request, b"") is None:
            return
        chunk = b"x" * (1 << 20)
        with contextlib.suppress(OSError):
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % FLOOD)
            for _ in range(FLOOD // len(chunk)):
                self.request.sendall(chunk)


class _StalledUpstream(socketserver.BaseRequestHandler):
    """Reads a request's head, then nothing more of it for a while."""

    def handle(self) -> None:
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        recv_head(self.request, b"")
        time.sleep(4)


def _peak_growth_kib(pid: int, before: int, seconds: float = 1.5) -> int:
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
        peak = max(peak, rss_kib(pid) - before)
    return peak


def test_slow_clients_of_a_fast_upstream_cost_little_memory_each(tmp_path):
    """Each upstream read the client cannot take yet reaches the client socket's buffer
    at once, so its limit stops the upstream reads: keyproxy holds about that buffer per
    client, not every read the loop made before its turn ended."""
    with raw_upstream(_FloodingUpstream) as url:
        kp = start_keyproxy(tmp_path, base_config(url, {}))
        try:
            get = f"GET /big/1 HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS['reader']}\r\n\r\n"
            with socket.create_connection((kp.host, kp.port), timeout=5) as warm:
                warm.sendall(get.encode())
                assert warm.recv(4096).startswith(b"HTTP/1.1 200 ")
            before = rss_kib(kp.process.pid)
            clients = []
            try:
                for _ in range(FLOODERS):
                    sock = socket.create_connection((kp.host, kp.port), timeout=5)
                    clients.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                    sock.sendall(get.encode())  # and never read the answer
                grown = _peak_growth_kib(kp.process.pid, before)
            finally:
                for sock in clients:
                    sock.close()
            assert grown < 2_000 * FLOODERS, f"{FLOODERS} slow clients cost {grown} KiB"
        finally:
            kp.stop()


def test_fast_uploads_to_a_stalled_upstream_cost_little_memory_each(tmp_path):
    """The same the other way: a request body read faster than the upstream takes it."""
    with raw_upstream(_StalledUpstream) as url:
        config = base_config(url, {})
        config["server"]["max_body"] = "256MiB"
        kp = start_keyproxy(tmp_path, config)
        try:
            head = (
                f"PUT /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS['admin']}\r\n"
                f"Content-Length: {FLOOD}\r\n\r\n"
            ).encode()
            chunk = b"y" * (1 << 20)

            def upload(sock: socket.socket) -> None:
                with contextlib.suppress(OSError):
                    sock.sendall(head)
                    for _ in range(FLOOD // len(chunk)):
                        sock.sendall(chunk)

            before = rss_kib(kp.process.pid)
            clients = []
            try:
                for _ in range(FLOODERS):
                    sock = socket.create_connection((kp.host, kp.port), timeout=5)
                    clients.append(sock)
                    threading.Thread(target=upload, args=(sock,), daemon=True).start()
                grown = _peak_growth_kib(kp.process.pid, before)
            finally:
                for sock in clients:
                    sock.close()
            assert grown < 2_000 * FLOODERS, f"{FLOODERS} fast uploads cost {grown} KiB"
        finally:
            kp.stop()
