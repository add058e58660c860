"""The exchange's hardest state changes, driven without sockets.

The client and upstream sides are small recording doubles of keyproxy's own
internal Protocols (`ClientSide`, `UpstreamSide`, `Pool`, `Plan` in
`keyproxy.wire.exchange`): no real part is replaced, only the exchange's
neighbours, so each path (retry, back-pressure, timeouts, the response chain)
is exercised deterministically.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools
import pytest

from keyproxy.request import Deny, RequestContext
from keyproxy.response.chain import ResponseHead
from keyproxy.wire.exchange import UPSTREAM_BACKPRESSURE, Exchange
from tests.memory_transport import MemoryTransport


class Client:
    """Records what the exchange writes and asks of the client connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.closed = False
        self.max_body = 1 << 20
        self.to_flush: Exchange | None = None
        self.written = bytearray()
        self.paused: set[object] = set()
        self.pauses: list[object] = []
        self.aborted = False
        self.done: list[bool] = []

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.written += part

    def abort(self) -> None:
        self.aborted = self.closed = True

    def pause_reading(self, reason: object) -> None:
        self.paused.add(reason)
        self.pauses.append(reason)

    def resume_reading(self, reason: object) -> None:
        self.paused.discard(reason)

    def connection_header(self, ex: Exchange) -> bytes:
        return b"" if ex.keep_alive else b"Connection: close\r\n"

    def cors_headers(self, ex: Exchange) -> bytes:
        return b""

    def exchange_done(self, ex: Exchange, keep_alive: bool) -> None:
        self.done.append(keep_alive)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The answer written, parsed by llhttp as a client would."""
        parsed: dict[str, object] = {"headers": {}, "body": b""}

        class Sink:
            def on_header(self, name: bytes, value: bytes) -> None:
                parsed["headers"][name.decode().lower()] = value.decode()  # type: ignore[index]

            def on_body(self, body: bytes) -> None:
                parsed["body"] += body  # type: ignore[operator]

        parser = httptools.HttpResponseParser(Sink())
        parser.feed_data(bytes(self.written))
        return parser.get_status_code(), parsed["headers"], parsed["body"]  # type: ignore[return-value]


class Upstream:
    """One upstream connection: records the request bytes and read pauses."""

    def __init__(self, uses: int = 0) -> None:
        self.uses = uses
        self.got_response_bytes = False
        self.sent = bytearray()
        self.listener: Exchange | None = None
        self.reading_paused = False
        self.aborted = False

    def begin(self, listener: Exchange) -> None:
        self.listener = listener
        self.uses += 1

    def write(self, data: bytes) -> None:
        self.sent += data

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.sent += part

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def end_head_only(self) -> None:
        assert self.listener is not None
        self.listener.on_response_end(True)

    def abort(self) -> None:
        self.aborted = True

    def answer(self, status: int, lines: list[bytes], body: bytes) -> None:
        """The upstream's response, as `UpstreamConnection` reports it."""
        ex = self.listener
        assert ex is not None
        self.got_response_bytes = True
        ex.on_response_head(status, lines, str(len(body)).encode())
        if body and not ex.done:
            ex.on_response_body(body)
        ex.flush()
        if not ex.done:
            ex.on_response_end(True)


class Pool:
    def __init__(self, idle: list[Upstream], fresh: list[Upstream] | None = None) -> None:
        self.idle = idle
        self.fresh = fresh or []
        self.released: list[tuple[Upstream, bool]] = []
        self.acquire_error: BaseException | None = None

    def take_idle(self) -> Upstream | None:
        return self.idle.pop() if self.idle else None

    async def acquire(self) -> Upstream:
        if self.acquire_error is not None:
            raise self.acquire_error
        return self.take_idle() or self.fresh.pop()

    def release(self, conn: Upstream, reusable: bool) -> None:
        self.released.append((conn, reusable))


class Plan:
    max_body = 1 << 20
    timeout = 5.0

    def request_head(self, ctx: RequestContext, request: Exchange) -> bytes:
        return f"{ctx.method} /x HTTP/1.1\r\nHost: up\r\n\r\n".encode()


def exchange(loop: asyncio.AbstractEventLoop, method: str = "GET") -> tuple[Exchange, Client]:
    client = Client(loop)
    ex = Exchange(client, method, "/x", [(b"Host", b"p")], True, True, "rid1")  # type: ignore[arg-type]
    ex.body_complete = True
    ex.ctx = RequestContext(None, method, None, None, "127.0.0.1", 0.0, "rid1")  # type: ignore[arg-type]
    return ex, client


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def run_pending(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0.01))


def turn(conn: Any, data: bytes) -> None:
    """One read, as `serve` meets it: the loop turn that handles it ends by sending
    what the connections wrote (keyproxy.wire.outbox)."""
    conn.data_received(data)
    conn.outbox.send()


def test_a_dead_reused_socket_is_retried_once_on_another(loop) -> None:
    stale, fresh = Upstream(uses=3), Upstream()
    pool = Pool([stale], [fresh])
    ex, client = exchange(loop)
    ex.forward(ex.ctx, Plan(), pool)  # type: ignore[arg-type]
    assert stale.sent.startswith(b"GET /x HTTP/1.1")
    ex.on_upstream_error(stale, ConnectionResetError())  # type: ignore[arg-type]
    assert (stale, False) in pool.released and not client.written
    run_pending(loop)
    assert fresh.sent.startswith(b"GET /x HTTP/1.1")
    fresh.answer(200, [b"Content-Type: text/plain\r\n"], b"hello")
    assert client.response()[::2] == (200, b"hello")
    assert client.done == [True]


def test_a_fresh_socket_failing_is_a_502_not_a_retry(loop) -> None:
    first = Upstream(uses=0)
    ex, client = exchange(loop)
    ex.forward(ex.ctx, Plan(), Pool([first], [Upstream()]))  # type: ignore[arg-type]
    ex.on_upstream_error(first, ConnectionResetError())  # type: ignore[arg-type]
    status, _, body = client.response()
    assert status == 502 and json.loads(body)["error"] == "UPSTREAM_UNAVAILABLE"


def test_back_pressure_pauses_and_resumes_both_ways(loop) -> None:
    up = Upstream()
    ex, client = exchange(loop)
    ex.forward(ex.ctx, Plan(), Pool([up]))  # type: ignore[arg-type]
    ex.pause_client_reading()  # the upstream cannot take the request body faster
    assert UPSTREAM_BACKPRESSURE in client.paused
    ex.resume_client_reading()
    assert UPSTREAM_BACKPRESSURE not in client.paused
    ex.pause_client_reading()
    up.answer(200, [], b"ok")
    assert UPSTREAM_BACKPRESSURE not in client.paused  # the end of the exchange resumes


def test_a_silent_upstream_after_the_head_cuts_the_connection(loop) -> None:
    up = Upstream()
    ex, client = exchange(loop)
    ex.forward(ex.ctx, Plan(), Pool([up]))  # type: ignore[arg-type]
    ex.on_response_head(200, [b"Content-Type: text/plain\r\n"], b"100")
    ex.on_response_body(b"partial")
    ex.flush()
    assert client.written.startswith(b"HTTP/1.1 200 OK")
    ex.check_timeout(loop.time() + 1.0)
    assert not client.aborted  # not yet
    ex.check_timeout(loop.time() + Plan.timeout + 1)
    assert client.aborted and up.aborted and client.done == [False]
    assert b"504" not in client.written  # the head had left: a truncated body looks truncated


def test_waiting_for_the_pool_too_long_is_a_504(loop) -> None:
    pool = Pool([])
    pool.acquire_error = TimeoutError()
    ex, client = exchange(loop)
    ex.forward(ex.ctx, Plan(), pool)  # type: ignore[arg-type]
    run_pending(loop)
    status, _, body = client.response()
    assert status == 504 and json.loads(body)["error"] == "UPSTREAM_TIMEOUT"


class Broken:
    def __call__(self, ctx: RequestContext) -> Broken:
        return self

    def on_head(self, head: ResponseHead) -> Deny | None:
        raise KeyError("a bug")

    def on_body(self, chunk: bytes) -> bytes:
        return chunk

    def on_end(self) -> bytes | Deny:
        return b""


def test_a_bug_in_a_link_costs_one_request(loop) -> None:
    up = Upstream()
    ex, client = exchange(loop)
    ex.chain = (Broken(),)
    ex.forward(ex.ctx, Plan(), Pool([up]))  # type: ignore[arg-type]
    up.answer(200, [], b"secret-free body")
    status, _, body = client.response()
    assert status == 500 and json.loads(body)["error"] == "INTERNAL_ERROR"
    assert up.aborted and client.done == [False]
    # The next request on another exchange is served normally.
    ex2, client2 = exchange(loop)
    up2 = Upstream()
    ex2.forward(ex2.ctx, Plan(), Pool([up2]))  # type: ignore[arg-type]
    up2.answer(200, [], b"fine")
    assert client2.response()[::2] == (200, b"fine")


class Upper:
    """Holds the whole body, then answers it upper-cased (or refuses a marked one)."""

    def __init__(self) -> None:
        self.body = b""

    def on_head(self, head: ResponseHead) -> Deny | None:
        head.hold = True
        head.set(b"X-Upper", b"1")
        return None

    def on_body(self, chunk: bytes) -> bytes:
        self.body += chunk
        return b""

    def on_end(self) -> bytes | Deny:
        if b"refuse" in self.body:
            return Deny(502, "FILTER_FAILED", "the answer could not be filtered")
        return self.body.upper() + b"!"


def test_a_holding_link_gets_the_whole_body_and_a_computed_length(loop) -> None:
    up = Upstream()
    ex, client = exchange(loop)
    ex.chain = (lambda ctx: Upper(),)
    ex.forward(ex.ctx, Plan(), Pool([up]))  # type: ignore[arg-type]
    up.answer(200, [b"Content-Type: text/plain\r\n"], b"hello")
    status, headers, body = client.response()
    assert (status, body) == (200, b"HELLO!")
    assert (headers["content-length"], headers["x-upper"]) == ("6", "1")


def test_a_holding_link_refusing_at_the_end_replaces_the_answer(loop) -> None:
    up = Upstream()
    ex, client = exchange(loop)
    ex.chain = (lambda ctx: Upper(),)
    ex.forward(ex.ctx, Plan(), Pool([up]))  # type: ignore[arg-type]
    up.answer(200, [], b"please refuse")
    status, _, body = client.response()
    assert status == 502 and json.loads(body)["error"] == "FILTER_FAILED"
    assert b"please" not in client.written


class Shorter:
    """Streams the body minus its first byte: the length is no longer known."""

    def on_head(self, head: ResponseHead) -> Deny | None:
        head.length = None
        return None

    def on_body(self, chunk: bytes) -> bytes:
        return chunk[1:]

    def on_end(self) -> bytes | Deny:
        return b"."


def test_an_unknown_length_is_chunked_for_http11(loop) -> None:
    up = Upstream()
    ex, client = exchange(loop)
    ex.chain = (lambda ctx: Shorter(),)
    ex.forward(ex.ctx, Plan(), Pool([up]))  # type: ignore[arg-type]
    up.answer(200, [], b"xabc")
    status, headers, body = client.response()
    assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    assert (status, body) == (200, b"abc.")


class Tee:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, ctx: RequestContext) -> Tee:
        self.calls += 1
        return self

    def on_head(self, head: ResponseHead) -> Deny | None:
        return None

    def on_body(self, chunk: bytes) -> bytes:
        return chunk

    def on_end(self) -> bytes | Deny:
        return b""


def test_a_stored_answer_runs_the_links_after_start_and_never_the_pool(loop) -> None:
    tee = Tee()
    ex, client = exchange(loop)
    ex.chain = (tee, lambda ctx: Upper())
    ex.serve_stored(200, [b"Content-Type: text/plain\r\n"], b"cached", 1)
    status, headers, body = client.response()
    assert (status, body, headers["content-length"]) == (200, b"CACHED!", "7")
    assert tee.calls == 0 and ex.upstream is None and ex.pool is None
    assert client.done == [True]
    assert ex.allowed  # logged and counted as allowed, as replay reads it


def test_a_stored_answer_to_head_has_the_length_and_no_body(loop) -> None:
    ex, client = exchange(loop, "HEAD")
    ex.serve_stored(200, [], b"cached", 0)
    assert client.written.endswith(b"\r\n\r\n") and b"Content-Length: 6\r\n" in client.written


def test_an_upstream_sending_into_a_holding_link_is_not_silent(loop) -> None:
    up = Upstream()
    ex, client = exchange(loop)
    ex.chain = (lambda ctx: Upper(),)
    ex.forward(ex.ctx, Plan(), Pool([up]))  # type: ignore[arg-type]
    ex.on_response_head(200, [], b"10")
    start = ex.last_activity
    loop.run_until_complete(asyncio.sleep(0.02))
    ex.on_response_body(b"12345")
    ex.flush()  # nothing to write yet: the link holds it
    assert not client.written and ex.last_activity > start
    ex.check_timeout(ex.last_activity + Plan.timeout - 0.01)
    assert not client.aborted and not up.aborted
    ex.on_response_body(b"67890")
    ex.on_response_end(True)
    assert client.response()[::2] == (200, b"1234567890!")


def test_a_bug_in_a_check_costs_one_request(loop, tmp_path) -> None:
    import yaml

    from keyproxy.app import ProxyServer
    from keyproxy.checks import Check, Pipeline
    from keyproxy.config import parse_config
    from keyproxy.config.reload import ConfigHolder
    from keyproxy.wire.client import ClientConnection
    from tests.proxy_process import base_config

    text = yaml.safe_dump(base_config("http://127.0.0.1:9", {"headers": {"K": "v" * 24}}))
    proxy = ProxyServer(ConfigHolder(parse_config(text, "t.yaml", {})), loop)
    real = proxy.pipeline

    def explode(ctx: RequestContext) -> None:
        if ctx.raw_target == "/boom":
            raise ZeroDivisionError("a bug")

    proxy.pipeline = Pipeline((Check("bug", explode, lambda ctx: ""), *real.checks))
    broken, transport = ClientConnection(proxy), MemoryTransport()
    broken.connection_made(transport)
    turn(broken, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.data.startswith(b"HTTP/1.1 500 ")
    assert json.loads(transport.data.split(b"\r\n\r\n", 1)[1])["error"] == "INTERNAL_ERROR"
    assert transport.closing  # that connection's stream state is not trusted further
    # The process goes on: the next connection is decided as usual.
    fine, transport2 = ClientConnection(proxy), MemoryTransport()
    fine.connection_made(transport2)
    turn(fine, b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport2.data.startswith(b"HTTP/1.1 401 ") and not transport2.closing
    for conn in (broken, fine):
        conn.connection_lost(None)


@pytest.mark.parametrize(
    "piece", [7, 100, 1 << 20], ids=["7-byte reads", "100-byte reads", "one read"]
)
def test_the_head_limit_counts_the_head_exactly_however_it_is_read(loop, piece: int) -> None:
    """`max_header_size` counts the URL and each `name: value` line (ignored underscore
    headers too), whether the head comes in one read, in many, or followed by a body."""
    import yaml

    from keyproxy.app import ProxyServer
    from keyproxy.config import parse_config
    from keyproxy.config.reload import ConfigHolder
    from keyproxy.wire.client import ClientConnection
    from tests.proxy_process import base_config

    config = base_config("http://127.0.0.1:9", {"headers": {"K": "v" * 24}})
    config["server"]["max_header_size"] = "1KiB"
    proxy = ProxyServer(ConfigHolder(parse_config(yaml.safe_dump(config), "t.yaml", {})), loop)
    url = b"/v1/data/posts"

    def answer(pad: int, underscore: int = 0, body: bytes = b"") -> bytes:
        # The URL, then each line's name and value + 4: "Host" (4 + 1), "X-Pad" (5 + pad),
        # "X_U" (3 + underscore), "Content-Length" (14 + its digits).
        head = b"POST %s HTTP/1.1\r\nHost: x\r\nX-Pad: %s\r\n" % (url, b"a" * pad)
        if underscore:
            head += b"X_U: %s\r\n" % (b"u" * underscore)
        data = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        conn, transport = ClientConnection(proxy), MemoryTransport()
        conn.connection_made(transport)
        for at in range(0, len(data), piece):
            turn(conn, data[at : at + piece])
        conn.connection_lost(None)
        return bytes(transport.data[:12])

    at_limit = 1024 - (len(url) + (4 + 1 + 4) + (5 + 4) + (14 + 1 + 4))  # the pad that fills it
    assert answer(at_limit) == b"HTTP/1.1 401"  # decided (no key): the head was accepted
    assert answer(at_limit + 1) == b"HTTP/1.1 431"
    assert answer(at_limit - 20, underscore=13) == b"HTTP/1.1 401"
    assert answer(at_limit - 20, underscore=14) == b"HTTP/1.1 431"  # ignored, still counted
    body = b"b" * 5000  # a read far longer than the limit, yet only its head counts
    assert answer(at_limit - 3, body=body) == b"HTTP/1.1 401"


def test_a_head_begun_after_a_long_body_in_the_same_read_is_not_charged_for_it(loop) -> None:
    """Pipelined: a read holding a request's whole body and the start of the next head
    counts only that start toward the next head's limit."""
    import yaml

    from keyproxy.app import ProxyServer
    from keyproxy.config import parse_config
    from keyproxy.config.reload import ConfigHolder
    from keyproxy.wire.client import ClientConnection
    from tests.proxy_process import base_config

    config = base_config("http://127.0.0.1:9", {"headers": {"K": "v" * 24}})
    config["server"]["max_header_size"] = "1KiB"
    proxy = ProxyServer(ConfigHolder(parse_config(yaml.safe_dump(config), "t.yaml", {})), loop)
    conn, transport = ClientConnection(proxy), MemoryTransport()
    conn.connection_made(transport)
    body = b"b" * 5000
    first = b"POST /v1/data/posts HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + body
    second = b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 500 + b"\r\n\r\n"
    turn(conn, first + second[:60])
    turn(conn, second[60:])
    conn.connection_lost(None)
    assert transport.data.count(b"HTTP/1.1 401 ") == 2, transport.data


def _small_head_proxy(loop: asyncio.AbstractEventLoop):  # type: ignore[no-untyped-def]
    """A proxy whose heads may count 1 KiB, and a function feeding it reads on a fresh
    connection that returns what was written back and whether it closed."""
    import yaml

    from keyproxy.app import ProxyServer
    from keyproxy.config import parse_config
    from keyproxy.config.reload import ConfigHolder
    from keyproxy.wire.client import ClientConnection
    from tests.proxy_process import base_config

    config = base_config("http://127.0.0.1:9", {"headers": {"K": "v" * 24}})
    config["server"]["max_header_size"] = "1KiB"
    proxy = ProxyServer(ConfigHolder(parse_config(yaml.safe_dump(config), "t.yaml", {})), loop)

    def feed(*reads: bytes, headers_seen: list[bytes] | None = None) -> tuple[bytes, bool]:
        conn, transport = ClientConnection(proxy), MemoryTransport()
        if headers_seen is not None:
            conn.parser = httptools.HttpRequestParser(_CountingHeaders(conn, headers_seen))
        conn.connection_made(transport)
        for data in reads:
            turn(conn, data)
        closing = transport.closing
        conn.connection_lost(None)
        return bytes(transport.data), closing

    return feed


def test_a_head_read_whole_is_counted_when_its_lines_are_shorter_than_counted(loop) -> None:
    """Lines without the space after the colon, or ignored underscore ones, take fewer
    bytes on the wire than the limit counts for them: a head that fits in the bytes
    read may still count more than `max_header_size`, and is refused all the same."""
    feed = _small_head_proxy(loop)
    url = b"/v1/data/posts"
    start = b"GET %s HTTP/1.1\r\nHost:x\r\n" % url
    counted = len(url) + (4 + 1 + 4)
    lines = []
    while counted < 1024 + 40:  # 40 bytes over the limit as counted
        lines.append(b"A%02d:%s\r\n" % (len(lines), b"v" * 4))
        counted += 3 + 4 + 4
    head = start + b"".join(lines) + b"\r\n"
    assert len(head) <= 1024, len(head)  # within the limit on the wire, in one read
    answer, closed = feed(head)
    assert answer.startswith(b"HTTP/1.1 431 ") and closed, answer[:80]
    # The same shape within the limit as counted is decided (401: no key).
    assert feed(start + b"".join(lines[:-8]) + b"\r\n")[0].startswith(b"HTTP/1.1 401 ")

    # Underscore lines `_:` (4 bytes, counted 5) mixed with ordinary ones.
    mixed = start + b"_:\r\n" * 150 + b"X-Pad: " + b"p" * 300 + b"\r\n\r\n"
    assert len(mixed) <= 1024 and len(url) + 9 + 150 * 5 + 5 + 300 + 4 > 1024
    assert feed(mixed)[0].startswith(b"HTTP/1.1 431 ")


def test_a_long_header_line_in_the_first_read_counts_toward_the_head_at_once(loop) -> None:
    """httptools holds a header line until it ends: one far over the limit in the read
    its head began in is refused after that read, not after another limit's worth of
    reads (each of which copies all of it again), also after a pipelined request."""
    feed = _small_head_proxy(loop)
    start = b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000
    answer, closed = feed(start)
    assert answer.startswith(b"HTTP/1.1 431 ") and closed, answer[:80]
    answer, closed = feed(start, *[b"a"] * 500)
    assert answer.startswith(b"HTTP/1.1 431 ") and closed
    first = b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\n\r\n"
    answer, closed = feed(first + start, *[b"a"] * 500)
    assert answer.startswith(b"HTTP/1.1 401 ") and b"HTTP/1.1 431 " in answer and closed
    # A body before the head in the same read is still not charged to it.
    body = b"POST /v1/data/posts HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"b" * 5000
    answer, closed = feed(body + first[:20], first[20:])
    assert answer.count(b"HTTP/1.1 401 ") == 2 and not closed


class _CountingHeaders:
    """A client connection's parser callbacks, each header's name also noted in `seen`.
    Wrapped rather than subclassed: compiled (`setup.py`), the connection class cannot be
    subclassed from Python."""

    def __init__(self, conn: object, seen: list[bytes]) -> None:
        self.conn, self.seen = conn, seen

    def on_header(self, name: bytes, value: bytes) -> None:
        self.seen.append(name)
        self.conn.on_header(name, value)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)


def test_ignored_underscore_headers_are_bounded_as_they_come(loop) -> None:
    """Underscore headers are not among the 100 kept: their bytes are added up as each
    arrives, so one read of thousands stops at the limit instead of running them all."""
    feed = _small_head_proxy(loop)
    calls: list[bytes] = []

    head = b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\n" + b"_:\r\n" * 60_000
    answer, closed = feed(head, headers_seen=calls)
    assert answer.startswith(b"HTTP/1.1 431 ") and closed
    assert 1 < len(calls) <= 1024 // 5 + 2, len(calls)  # not 60,000 callbacks


def test_a_lowered_head_limit_applies_to_connections_open_before_the_reload(loop) -> None:
    """`max_header_size` is read from the snapshot each request is decided under, so a
    reload that lowers it binds a kept-alive connection's next head, read whole or not."""
    import yaml

    from keyproxy.app import ProxyServer
    from keyproxy.config import parse_config
    from keyproxy.config.reload import ConfigHolder
    from keyproxy.wire.client import ClientConnection
    from tests.proxy_process import base_config

    def config(limit: str):
        text = base_config("http://127.0.0.1:9", {"headers": {"K": "v" * 24}})
        text["server"]["max_header_size"] = limit
        return parse_config(yaml.safe_dump(text), "t.yaml", {})

    proxy = ProxyServer(ConfigHolder(config("8KiB")), loop)
    conn, transport = ClientConnection(proxy), MemoryTransport()
    conn.connection_made(transport)
    turn(conn, b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\n\r\n")  # under 8 KiB
    assert transport.data.count(b"HTTP/1.1 401 ") == 1
    proxy._on_config(config("1KiB"))
    turn(conn, b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1100 + b"\r\n\r\n")
    conn.connection_lost(None)
    assert b"HTTP/1.1 431 " in transport.data, transport.data


def test_pipelined_heads_before_a_partial_one_are_not_charged_to_it(loop) -> None:
    """Many small requests pipelined in one read, then the start of another: the bytes of
    the complete heads are the requests' own, not the partial head's."""
    feed = _small_head_proxy(loop)
    one = b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 40 + b"\r\n\r\n"
    pipelined = one * 40  # 3,600 bytes, the limit 1 KiB
    answer, closed = feed(pipelined + one[:50], one[50:])
    assert answer.count(b"HTTP/1.1 401 ") == 41 and not closed, answer[-200:]
    # A partial head over the limit after them is refused all the same, also when the
    # heads before it take fewer bytes than usual (`name:value`, no space).
    big = b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1200
    answer, closed = feed(pipelined + big)
    assert answer.count(b"HTTP/1.1 401 ") == 40 and b"HTTP/1.1 431 " in answer and closed
    tight = one.replace(b": ", b":")
    answer, closed = feed(tight * 40 + big)
    assert answer.count(b"HTTP/1.1 401 ") == 40 and b"HTTP/1.1 431 " in answer and closed


def test_complete_pipelined_heads_are_not_charged_to_the_partial_one_after_them(loop) -> None:
    """Many small heads and the start of another in one read: each head is held to the
    limit on its own bytes (not the read's), and one over it still gets its 431."""
    feed = _small_head_proxy(loop)
    one = b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\n\r\n"
    answer, closed = feed(one * 40 + one[:20], one[20:])
    assert answer.count(b"HTTP/1.1 401 ") == 41 and not closed
    big = b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1200
    answer, closed = feed(one * 40 + big)
    assert answer.count(b"HTTP/1.1 401 ") == 40 and answer.endswith(b"}") and closed
    assert b"HTTP/1.1 431 " in answer


def test_a_trailer_begun_in_the_read_of_the_last_body_bytes_is_counted(loop) -> None:
    feed = _small_head_proxy(loop)
    head = b"POST /v1/data/posts HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    # (The connection then lingers: the body never ended, the client may still be sending.)
    answer, _ = feed(head + b"5\r\nhello\r\n0\r\nX-T: " + b"t" * 2000)
    assert answer.startswith(b"HTTP/1.1 431 ") and answer.count(b"HTTP/") == 1, answer[:80]
    lines = b"".join(b"X-T%02d: %s\r\n" % (i, b"t" * 40) for i in range(30))
    answer, _ = feed(head + b"5\r\nhello\r\n0\r\n" + lines)  # ends with a line held
    assert answer.startswith(b"HTTP/1.1 431 ") and answer.count(b"HTTP/") == 1, answer[:80]
    # Reads ending after a chunk-size line, or with a small trailer, are not refused.
    answer, _ = feed(head + b"5\r\nhello\r\n" + b"400\r\n", b"\r\n" * 512 + b"\r\n0\r\nX: t")
    assert answer.startswith(b"HTTP/1.1 401 ") and b" 431 " not in answer, answer[:80]


def test_trailer_lines_are_bounded_as_they_come(loop) -> None:
    """Like ignored underscore headers, trailer lines are added up as each ends: one read
    of thousands stops at the limit instead of running a callback for every one."""
    feed = _small_head_proxy(loop)
    calls: list[bytes] = []

    head = b"POST /v1/data/posts HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer, _ = feed(head + b"3\r\nabc\r\n0\r\n" + b"t:\r\n" * 60_000 + b"\r\n", headers_seen=calls)
    assert answer.startswith(b"HTTP/1.1 431 ") and answer.count(b"HTTP/") == 1, answer[:80]
    assert 2 < len(calls) <= 2 + 1024 // 5 + 2, len(calls)  # not 60,000 callbacks


WIDE = "\ufeff{'key': 'upstream-secret-0123456789'}".encode("utf-16-le")


def scanning_exchange(loop: asyncio.AbstractEventLoop) -> tuple[Exchange, Client, Upstream]:
    from keyproxy.response.body_links import BodyScrubFactory
    from keyproxy.response.body_scrub import BodyScrubber

    scrubber = BodyScrubber(("upstream-secret-0123456789",), None, same_length=True)
    up = Upstream()
    ex, client = exchange(loop)
    ex.chain = (BodyScrubFactory(scrubber, 1 << 20),)
    ex.forward(ex.ctx, Plan(), Pool([up]))  # type: ignore[arg-type]
    return ex, client, up


def test_a_body_refused_by_its_first_bytes_is_a_502_while_the_head_is_queued(loop) -> None:
    """A UTF-16 body is known by its first bytes, after the head passed the links: the
    head and those bytes nearly always come in one read, and the client gets the 502."""
    _, client, up = scanning_exchange(loop)
    up.answer(200, [b"Content-Type: text/plain\r\n"], WIDE)
    status, _, body = client.response()
    assert status == 502 and json.loads(body)["error"] == "BODY_NOT_SCANNED"
    assert up.aborted and not client.aborted and b"s\x00e\x00c" not in client.written


def test_a_body_refused_after_its_head_left_cuts_the_connection(loop) -> None:
    ex, client, up = scanning_exchange(loop)
    ex.on_response_head(200, [b"Content-Type: text/plain\r\n"], None)
    ex.flush()  # the head left in its own read
    assert client.written.startswith(b"HTTP/1.1 200")
    for byte in range(len(WIDE)):  # a BOM split over reads is still read whole
        ex.on_response_body(WIDE[byte : byte + 1])
        ex.flush()
        if ex.done:
            break
    assert client.aborted and up.aborted and client.done == [False]
    assert client.written.endswith(b"\r\n\r\n")  # nothing of the body left
