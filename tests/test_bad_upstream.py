"""An upstream that speaks broken HTTP gets the client a 502, never a hang or a traceback."""

from __future__ import annotations

import contextlib
import socket
import socketserver
from collections.abc import Iterator

import pytest

from tests.procs import raw_upstream
from tests.proxy_process import KEYS, Keyproxy, base_config, start_keyproxy

BROKEN_ANSWERS = {
    "garbage": b"this is not http\r\n\r\n",
    "bad-length": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "length-and-chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "switching": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    "silent-close": b"",
    "status-099": b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nhi",
    "gzip-coding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00",
    # 100,000 header lines, never finished: refused at 64 KiB, not buffered until the timeout.
    "endless-head": b"HTTP/1.1 200 OK\r\n" + (b"X-Filler: " + b"a" * 90 + b"\r\n") * 100_000,
}
#: Answers after which the upstream keeps the connection open, so only keyproxy's own
#: limits can end the exchange before the upstream timeout.
KEPT_OPEN = frozenset({"endless-head"})
#: Odd but valid answers, passed on without what must not cross the proxy.
ODD_ANSWERS = {
    "trailers": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Upstream-Trailer: v\r\n\r\n"
    ),
    "early-hints": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    ),
}


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        path = data.split(b" ", 2)[1].decode()
        name = path.strip("/").split("/")[-1]
        self.request.sendall(BROKEN_ANSWERS.get(name) or ODD_ANSWERS[name])
        if name in KEPT_OPEN:
            with contextlib.suppress(OSError):
                self.request.recv(1)  # until keyproxy gives up on it
        self.request.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module")
def broken_upstream() -> Iterator[str]:
    with raw_upstream(_Handler) as url:
        yield url


@pytest.fixture(scope="module")
def proxy_to_it(broken_upstream, tmp_path_factory) -> Iterator[Keyproxy]:
    config = base_config(broken_upstream, {"headers": {"X-K": "v" * 20}})
    kp = start_keyproxy(tmp_path_factory.mktemp("proxy"), config)
    yield kp
    kp.stop()


@pytest.mark.parametrize("answer", sorted(BROKEN_ANSWERS))
def test_broken_upstream_answers_become_502(proxy_to_it: Keyproxy, answer):
    status, headers, body, _ = proxy_to_it.request("GET", f"/echo/{answer}", key=KEYS["reader"])
    assert status == 502, body
    assert headers["content-type"] == "application/json"
    assert b"UPSTREAM_UNAVAILABLE" in body
    assert "Traceback" not in proxy_to_it.process.stderr
    assert "internal_error" not in proxy_to_it.process.stderr


@pytest.mark.parametrize("answer", sorted(ODD_ANSWERS))
def test_odd_but_valid_answers_pass_cleanly(proxy_to_it: Keyproxy, answer):
    status, headers, body, _ = proxy_to_it.request("GET", f"/echo/{answer}", key=KEYS["reader"])
    assert (status, body) == (200, b"hello")
    assert "x-upstream-trailer" not in headers  # trailers never cross the proxy
    assert "link" not in headers  # nor do interim (1xx) responses
