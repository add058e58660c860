"""A small, fast HTTP/1.1 upstream for the benchmark when nginx is not installed.

The upstream must never be the bottleneck: if it were, every proxy would look
equally fast. nginx is preferred (`bench/run.py` uses it when installed); this
server is the fallback, so it does the least possible work per request: one
httptools parse, a dictionary lookup and one `write` of pre-built bytes, with
keep-alive, on uvloop when available.

A route given with `--vary-route` answers different bytes every time: the file
must hold `VARY_MARK` once, and each response carries a 16-digit counter in its
place (same length, so `Content-Length` and the body's size stay what the report
says). It is what a memo of answers can never serve from memory: the benchmark's
honest miss path.

Usage: python bench/upstream.py --port 8000 --route /v1/data/posts/42=small.json ...
       [--vary-route /v1/data/events/2025=array.json]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import httptools

#: Where a varying body carries its per-response counter (16 bytes, as wide as the counter).
VARY_MARK = b"~" * 16


def build_heads(length: int, status: bytes = b"200 OK") -> tuple[bytes, bytes]:
    """The keep-alive and close heads of an answer of `length` bytes, blank line included."""
    head = (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Server: bench-upstream\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n"
    )
    return head + b"\r\n", head + b"Connection: close\r\n\r\n"


def build_response(body: bytes, status: bytes = b"200 OK") -> tuple[bytes, bytes]:
    """Pre-encode keep-alive and close variants once, so serving costs no formatting."""
    keep_alive, close = build_heads(len(body), status)
    return keep_alive + body, close + body


class VaryingBody:
    """A body served with a new counter each time; the rest pre-built like the others."""

    __slots__ = ("close", "count", "keep_alive", "suffix")

    def __init__(self, body: bytes) -> None:
        at = body.find(VARY_MARK)
        if at < 0 or body.find(VARY_MARK, at + 1) >= 0:
            raise ValueError("a varying body holds VARY_MARK exactly once")
        keep_alive, close = build_heads(len(body))
        self.keep_alive = keep_alive + body[:at]
        self.close = close + body[:at]
        self.suffix = body[at + len(VARY_MARK) :]
        self.count = 0

    def response(self, keep_alive: bool) -> bytes:
        self.count += 1
        prefix = self.keep_alive if keep_alive else self.close
        return b"".join((prefix, b"%016d" % self.count, self.suffix))


class UpstreamProtocol(asyncio.Protocol):
    """One connection: parse requests as they arrive and answer each from the table."""

    __slots__ = ("_not_found", "_parser", "_responses", "_transport", "_url", "_varying")

    def __init__(
        self,
        responses: dict[bytes, tuple[bytes, bytes]],
        not_found: tuple[bytes, bytes],
        varying: dict[bytes, VaryingBody] | None = None,
    ) -> None:
        self._responses = responses
        self._not_found = not_found
        self._varying = varying or {}
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_message_complete(self) -> None:
        path = self._url.split(b"?", 1)[0]
        transport = self._transport
        if transport is None:
            return
        found = self._responses.get(path)
        if found is None:
            varying = self._varying.get(path)
            if varying is not None:
                alive = self._parser.should_keep_alive()
                transport.write(varying.response(alive))
                if not alive:
                    transport.close()
                return
        keep_alive, close = found or self._not_found
        if self._parser.should_keep_alive():
            transport.write(keep_alive)
        else:
            transport.write(close)
            transport.close()


async def serve(
    host: str, port: int, routes: dict[str, Path], vary_routes: dict[str, Path] | None = None
) -> None:
    responses = {path.encode(): build_response(file.read_bytes()) for path, file in routes.items()}
    varying = {
        path.encode(): VaryingBody(file.read_bytes()) for path, file in (vary_routes or {}).items()
    }
    not_found = build_response(b'{"error":"not found"}', b"404 Not Found")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(responses, not_found, varying),
        host,
        port,
        backlog=1024,
        reuse_address=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench upstream listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def parse_route(text: str) -> tuple[str, Path]:
    path, sep, file = text.partition("=")
    if not sep or not path.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected /path=FILE, got {text!r}")
    return path, Path(file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--route", type=parse_route, action="append", default=[], help="/path=FILE (repeatable)"
    )
    parser.add_argument(
        "--vary-route",
        type=parse_route,
        action="append",
        default=[],
        help="/path=FILE holding VARY_MARK once: a new counter in its place per response",
    )
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(serve(args.host, args.port, dict(args.route), dict(args.vary_route)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
