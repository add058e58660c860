"""A small, fast HTTP/1.1 upstream for the benchmark when nginx is not installed.

The upstream must never be the bottleneck: if it were, every proxy would look
equally fast. nginx is preferred (`bench/run.py` uses it when installed); this
server is the fallback, so it does the least possible work per request: one
httptools parse, a dictionary lookup and one `write` of pre-built bytes, with
keep-alive, on uvloop when available.

Usage: python bench/upstream.py --port 8000 --route /v1/data/posts/42=small.json ...
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import httptools


def build_response(body: bytes, status: bytes = b"200 OK") -> tuple[bytes, bytes]:
    """Pre-encode keep-alive and close variants once, so serving costs no formatting."""
    head = (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Server: bench-upstream\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    )
    return head + b"\r\n" + body, head + b"Connection: close\r\n\r\n" + body


class UpstreamProtocol(asyncio.Protocol):
    """One connection: parse requests as they arrive and answer each from the table."""

    __slots__ = ("_not_found", "_parser", "_responses", "_transport", "_url")

    def __init__(
        self,
        responses: dict[bytes, tuple[bytes, bytes]],
        not_found: tuple[bytes, bytes],
    ) -> None:
        self._responses = responses
        self._not_found = not_found
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
        keep_alive, close = self._responses.get(path, self._not_found)
        transport = self._transport
        if transport is None:
            return
        if self._parser.should_keep_alive():
            transport.write(keep_alive)
        else:
            transport.write(close)
            transport.close()


async def serve(host: str, port: int, routes: dict[str, Path]) -> None:
    responses = {path.encode(): build_response(file.read_bytes()) for path, file in routes.items()}
    not_found = build_response(b'{"error":"not found"}', b"404 Not Found")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(responses, not_found), host, port, backlog=1024, reuse_address=True
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
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(serve(args.host, args.port, dict(args.route)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
