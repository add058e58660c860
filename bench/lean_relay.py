"""The floor under keyproxy: the least a Python proxy on the same libraries can do.

An `asyncio.Protocol` per client connection on uvloop, httptools parsing both
directions, one keep-alive upstream connection per client connection, the API
key compared and replaced by the secret, and the upstream's answer relayed with
its own framing. No policy, timeouts, limits, pipelining, logs or metrics: it
is a measuring stick, not a proxy to deploy. What keyproxy spends above it per
request is the price of what keyproxy does; what it spends is the price of
Python, uvloop and the kernel.

Usage: BENCH_SECRET=... python bench/lean_relay.py --port 8002 --upstream http://127.0.0.1:8000
       --key pk_...
"""

from __future__ import annotations

import argparse
import asyncio
import os
from urllib.parse import urlsplit

import httptools
import uvloop

#: Request headers not passed on: hop-by-hop ones, the client's Host and its API key.
DROPPED = frozenset({b"connection", b"keep-alive", b"host", b"x-api-key", b"transfer-encoding"})
#: Response headers the relay writes itself (it frames every answer with Content-Length).
RESPONSE_DROPPED = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}
)


class _Parsed(asyncio.Protocol):
    """A connection whose bytes go to its httptools parser; a parse error is `broken`."""

    parser: httptools.HttpRequestParser | httptools.HttpResponseParser
    transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.broken()

    def broken(self) -> None:
        raise NotImplementedError


class Upstream(_Parsed):
    """The client connection's own upstream connection; answers go back to `client`."""

    parser: httptools.HttpResponseParser

    def __init__(self, client: Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.lines: list[bytes] = []
        self.body: list[bytes] = []

    def broken(self) -> None:
        self.client.fail()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream = None

    def on_message_begin(self) -> None:
        self.lines = []
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in RESPONSE_DROPPED:
            self.lines.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        status = self.parser.get_status_code()
        head = b"HTTP/1.1 %d OK\r\n%sContent-Length: %d\r\n\r\n" % (
            status, b"".join(self.lines), len(body),
        )  # fmt: skip
        self.client.answer(head + body)


class Client(_Parsed):
    parser: httptools.HttpRequestParser

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.parser = httptools.HttpRequestParser(self)
        self.upstream: Upstream | None = None
        self.url = b""
        self.headers: list[bytes] = []
        self.authorised = False

    def broken(self) -> None:
        self.fail()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.authorised = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"x-api-key":
            self.authorised = value == self.relay.key
        elif lname not in DROPPED:
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if not self.authorised:
            self.transport.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
            return
        relay = self.relay
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n" % (
            self.parser.get_method(), self.url, relay.host, b"".join(self.headers), relay.secret,
        )  # fmt: skip
        if self.upstream is None:
            asyncio.get_running_loop().create_task(self._connect(head))
        else:
            assert self.upstream.transport is not None
            self.upstream.transport.write(head)

    async def _connect(self, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(
                lambda: Upstream(self), self.relay.upstream_host, self.relay.upstream_port
            )
        except OSError:
            self.fail()
            return
        self.upstream = upstream
        assert upstream.transport is not None
        upstream.transport.write(head)

    def answer(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def fail(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()


class Relay:
    def __init__(self, upstream: str, key: str, secret: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.host = parts.netloc.encode()
        self.key = key.encode()
        self.secret = b"X-API-Key: %s\r\n" % secret.encode()


async def serve(port: int, relay: Relay) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(relay), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--key", required=True)
    args = p.parse_args()
    relay = Relay(args.upstream, args.key, os.environ["BENCH_SECRET"])
    uvloop.run(serve(args.port, relay))


if __name__ == "__main__":
    main()
