"""Attacks on the response side: ways a client might get the upstream's secret, or a
field its key excludes, out of an answer. Each test is one hole, found and closed."""

from __future__ import annotations

import re
import socket
import socketserver
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import raw_upstream, recv_head
from tests.proxy_process import KEYS, Keyproxy, base_config, start_keyproxy

SECRET = "attack-upstream-secret-27182818284"


class RangeEchoPage(socketserver.BaseRequestHandler):
    """A debug page quoting the request's headers (the injected secret among them) that
    honours `Range: bytes=a-b` as static-file servers and many frameworks do."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        data = b""
        while True:
            got = recv_head(sock, data)
            if got is None:
                return
            head, data = got
            lines = head.split(b"\r\n")[1:]
            quoted = [line for line in lines if not line.lower().startswith(b"range:")]
            body = b"<pre>" + b"\n".join(quoted) + b"</pre>"
            status = b"200 OK"
            extra = b""
            for line in lines:
                name, _, value = line.partition(b":")
                match = re.fullmatch(rb"\s*bytes=(\d+)-(\d+)\s*", value)
                if name.strip().lower() == b"range" and match:
                    first, last = int(match.group(1)), int(match.group(2))
                    extra = b"Content-Range: bytes %d-%d/%d\r\n" % (first, last, len(body))
                    body = body[first : last + 1]
                    status = b"206 Partial Content"
            sock.sendall(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: text/html\r\n" + extra
                + b"Content-Length: %d\r\n\r\n" % len(body) + body
            )  # fmt: skip


@pytest.fixture
def range_proxy(tmp_path: Path) -> Iterator[Keyproxy]:
    with raw_upstream(RangeEchoPage) as url:
        config: dict[str, Any] = base_config(url, {"headers": {"X-Upstream-Key": SECRET}})
        config["routes"] = [{"match": "GET /page", "acl": "get"}, *config["routes"]]
        proxy = start_keyproxy(tmp_path, config)
        try:
            yield proxy
        finally:
            proxy.stop()


def test_range_requests_cannot_split_the_secret_past_the_body_scan(range_proxy: Keyproxy) -> None:
    """The scan sees one answer at a time: two ranges that each hold half of the secret
    are each clean, and the client joins them. A scanned answer is asked for whole."""
    status, _, whole, _ = range_proxy.request("GET", "/page", key=KEYS["reader"])
    assert status == 200 and SECRET.encode() not in whole
    start = whole.lower().find(b"x-upstream-key: ") + len(b"x-upstream-key: ")
    half = start + len(SECRET) // 2
    pieces = []
    for first, last in ((0, half - 1), (half, len(whole) + 100)):
        status, _, body, _ = range_proxy.request(
            "GET", "/page", {"Range": f"bytes={first}-{last}"}, key=KEYS["reader"]
        )
        pieces.append(body)
    assert SECRET.encode() not in b"".join(pieces)
