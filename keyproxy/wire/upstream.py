"""Connections to the upstream: a bounded keep-alive pool and one protocol object per socket.

Why not aiohttp's `ClientSession`: in a pass-through proxy its per-request
objects (request, response, payload, timers, cookie jar) are ~40% of all CPU
time. Here each socket is an `asyncio.Protocol` whose responses are parsed by
httptools (llhttp, the parser Node.js uses): keyproxy writes request heads and
chunk sizes, never parses HTTP itself. Parsed events are handed to a
`ResponseListener` (the current `Exchange`), which streams them to the client
without buffering.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Protocol

import httptools

from keyproxy.config.model import Upstream
from keyproxy.observability import log_event
from keyproxy.policy.headers import RESPONSE_DROP
from keyproxy.wire.outbox import HeldWrites, Outbox

#: Response headers the parser leaves out: framing and hop-by-hop (keyproxy frames the
#: answer itself), X-Request-Id (keyproxy sets its own), the upstream's limit headers.
NOT_COPIED = RESPONSE_DROP

#: An idle connection older than this is closed rather than reused: many servers
#: close idle keep-alive sockets after 5–60 s and a reused dead socket costs a retry.
IDLE_REUSE_LIMIT = 4.0

#: At most one `upstream_tls_error` log line per pool this often: a distrusted
#: certificate fails every request, and the first line already says why.
TLS_ERROR_LOG_INTERVAL = 10.0


#: Most bytes an upstream may send before its response head ends (nginx answers 502
#: "upstream sent too big header" past its buffer); without a bound a broken or
#: hostile upstream grows keyproxy's memory until the upstream timeout.
MAX_RESPONSE_HEAD = 64 * 1024


class UpstreamUnavailable(Exception):
    """The upstream refused, reset or garbled the exchange (never shown to clients)."""


def tls_context(upstream: Upstream) -> ssl.SSLContext | None:
    """How an https upstream is verified; None for http.

    Certificate and hostname checks are always on: keyproxy sends the backend's
    secret on every request, so a peer that cannot prove it is the upstream must
    never receive it. With `ca_file` only that bundle is trusted (the system
    store is not loaded), which is what a private CA's backend needs.
    """
    if upstream.scheme != "https":
        return None
    return ssl.create_default_context(cafile=upstream.ca_file)


class ResponseListener(Protocol):
    def on_response_head(self, status: int, lines: list[bytes], length: bytes | None) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_end(self, reusable: bool) -> None: ...
    def on_upstream_error(self, conn: UpstreamConnection, exc: BaseException) -> None: ...
    def flush(self) -> None: ...
    def pause_client_reading(self) -> None: ...
    def resume_client_reading(self) -> None: ...


class UpstreamConnection(HeldWrites, asyncio.Protocol):
    __slots__ = (
        "_connection_tokens",
        "_counted_out",
        "_eof_delimited",
        "_head_budget",
        "_header_parts",
        "_headers_done",
        "_interim",
        "_length",
        "_parser",
        "closed",
        "got_response_bytes",
        "held",
        "idle_since",
        "in_response",
        "listener",
        "outbox",
        "pool",
        "reading_paused",
        "transport",
        "uses",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.outbox = pool.outbox
        self.held: list[bytes] = []  # written this turn, sent when it ends (keyproxy.wire.outbox)
        self.listener: ResponseListener | None = None
        self._parser = httptools.HttpResponseParser(self)
        # The response's end-to-end headers, already serialised (b"Name: value\r\n"); the
        # rare Connection-listed removal reads each name back up to its colon.
        self._header_parts: list[bytes] = []
        self._length: bytes | None = None
        self._connection_tokens: frozenset[bytes] = frozenset()
        self._interim = False
        self._eof_delimited = True
        self._headers_done = False
        self._head_budget = MAX_RESPONSE_HEAD
        self._counted_out = False
        self.closed = False
        self.reading_paused = False
        self.in_response = False
        self.got_response_bytes = False
        self.idle_since = 0.0
        self.uses = 0

    # -- used by the exchange (`write`, `writelines`: `HeldWrites`) -----------
    def begin(self, listener: ResponseListener) -> None:
        self.listener = listener
        if self.reading_paused:  # left paused by a slow client of the previous exchange
            self.resume_reading()
        self.in_response = True
        self.got_response_bytes = False
        self.uses += 1
        self._reset_head()

    def pause_reading(self) -> None:
        """The client reads slower than the upstream sends: stop reading the upstream."""
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def end_head_only(self) -> None:
        """A response to HEAD has no body whatever its Content-Length says.

        llhttp cannot be told so through httptools, so the message is finished
        here, and the socket (its parser still expecting a body) is not reused: some
        servers (aiohttp's streamed responses) send the body anyway, and on a reused
        socket those bytes would be read as the next request's answer.
        """
        self._finish(reusable=False)

    def abort(self) -> None:
        self.closed = True
        self.listener = None
        if self.transport is not None:
            self.transport.abort()

    def send_failed(self, exc: Exception) -> None:
        self._fail(exc)  # the exchange is told: it may try once more on another socket

    # -- asyncio callbacks -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.listener is None:
            # Bytes nobody asked for (on an idle socket, or after an aborted
            # exchange): the stream can no longer be trusted.
            self.abort()
            return
        listener = self.listener
        self.got_response_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
        else:
            if not self._headers_done and self.in_response:
                self._head_budget -= len(data)
                if self._head_budget < 0:
                    self._fail(UpstreamUnavailable("response head too large"))
        listener.flush()

    def eof_received(self) -> bool:
        listener = self.listener
        if listener is not None and self.in_response and self._headers_done and self._eof_delimited:
            self._finish(reusable=False)  # the body was delimited by the connection closing
            listener.flush()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.listener is not None and self.in_response:
            self._fail(exc or ConnectionResetError("upstream closed the connection"))

    def pause_writing(self) -> None:
        if self.listener is not None:
            self.listener.pause_client_reading()

    def resume_writing(self) -> None:
        if self.listener is not None:
            self.listener.resume_client_reading()

    # -- httptools callbacks -----------------------------------------------
    def on_message_begin(self) -> None:
        if not self.in_response:
            # More bytes in the read that ended the answer: the upstream's framing cannot
            # be trusted, and a message begun here would swallow (or be) the next answer.
            raise UpstreamUnavailable("data after the end of the response")
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # a chunked body's trailer: not forwarded
        lname = name.lower()
        if lname in NOT_COPIED:
            if lname == b"content-length":
                self._length = value
                self._eof_delimited = False
            elif lname == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    # A coding keyproxy would have to undo or declare; nginx refuses it too.
                    raise UpstreamUnavailable("unsupported Transfer-Encoding")
                self._eof_delimited = False
            elif lname == b"connection":
                tokens = value.lower()
                if tokens != b"keep-alive" and tokens != b"close":  # usual values name nothing
                    self._connection_tokens = self._connection_tokens | frozenset(
                        t.strip() for t in tokens.split(b",")
                    )
            return
        self._header_parts.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 100:
            raise UpstreamUnavailable("invalid status code")
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamUnavailable("unexpected protocol switch")
            self._interim = True  # 100 Continue, 103 Early Hints: wait for the real answer
            self._reset_head()
            return
        self._headers_done = True
        if status == 204 or status == 304:
            self._eof_delimited = False
        listener = self.listener
        if listener is not None:
            parts = self._header_parts
            if self._connection_tokens:
                parts = self._without_listed(parts)
            listener.on_response_head(status, parts, self._length)

    def _without_listed(self, parts: list[bytes]) -> list[bytes]:
        """Drop the headers the response's Connection header names (hop-by-hop by listing)."""
        listed = self._connection_tokens
        # Each part is `name: value` as `on_header` wrote it; names hold no colon.
        return [part for part in parts if part[: part.index(b":")].lower() not in listed]

    def _reset_head(self) -> None:
        self._header_parts = []
        self._length = None
        self._connection_tokens = frozenset()
        self._eof_delimited = True
        self._head_budget = MAX_RESPONSE_HEAD

    def on_body(self, body: bytes) -> None:
        listener = self.listener
        if listener is not None:
            listener.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.listener is not None and self.in_response:
            self._finish(reusable=self._parser.should_keep_alive())

    # -- internals -------------------------------------------------------------
    def _finish(self, reusable: bool) -> None:
        listener = self.listener
        self.in_response = False
        self.listener = None
        self._headers_done = False
        if listener is not None:
            listener.on_response_end(reusable)

    def _fail(self, exc: BaseException) -> None:
        listener = self.listener
        self.in_response = False
        self.listener = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
        if listener is not None:
            listener.on_upstream_error(self, exc)


class UpstreamPool:
    """Keep-alive connections to one upstream, at most `max_connections` at once.

    Callers beyond the limit wait in line for a released connection rather
    than opening more sockets than the upstream was sized for.
    """

    def __init__(
        self, upstream: Upstream, loop: asyncio.AbstractEventLoop, outbox: Outbox | None = None
    ) -> None:
        self.upstream = upstream
        self._loop = loop
        self.outbox = outbox if outbox is not None else Outbox(loop)
        self.endpoint = (upstream.scheme, upstream.host, upstream.port)
        self._idle: deque[UpstreamConnection] = deque()
        self._open = 0
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        # Built once per pool: loading a CA bundle costs milliseconds, a handshake reuses it.
        # The loader proved the bundle loads; should it vanish in the moment since, every
        # request is a 502 until the next good reload, rather than a failed reload half-applied.
        self._tls_error: str | None = None
        try:
            self._ssl = tls_context(upstream)
        except (OSError, ssl.SSLError) as exc:
            self._ssl, self._tls_error = None, f"ca_file unusable: {exc}"
        self._tls_logged_at = -TLS_ERROR_LOG_INTERVAL
        self._closed = False

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The context connections use (None for plain HTTP); readiness probes use it too."""
        return self._ssl

    @property
    def open_connections(self) -> int:
        return self._open

    def take_idle(self) -> UpstreamConnection | None:
        """A kept-alive connection ready for a request, without waiting; None if there is none."""
        now = self._loop.time()
        idle = self._idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if (
                not conn.closed
                and now - conn.idle_since < IDLE_REUSE_LIMIT
                and transport is not None
                and not transport.is_closing()  # the upstream closed it; `connection_lost` is due
            ):
                return conn
            self._discard(conn)
        return None

    async def acquire(self) -> UpstreamConnection:
        conn = self.take_idle()
        if conn is not None:
            return conn
        loop = self._loop
        if self._open >= self.upstream.max_connections:
            waiter: asyncio.Future[UpstreamConnection | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(self.upstream.timeout):  # TimeoutError: a 504
                    handed = await waiter
            except BaseException:
                # Timed out or cancelled in the same turn as a release handed this
                # waiter a connection (or a free slot): pass it on, or it is lost for good.
                if waiter.done() and not waiter.cancelled():
                    given = waiter.result()
                    if given is not None:
                        self.release(given, reusable=True)
                    else:
                        self._wake_one()
                raise
            if handed is not None:
                return handed
        return await self._connect(loop)

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> UpstreamConnection:
        if self._tls_error is not None:
            self._log_tls_error(self._tls_error)
            raise UpstreamUnavailable(self._tls_error)
        self._open += 1
        up = self.upstream
        try:
            async with asyncio.timeout(up.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self),
                    up.host,
                    up.port,
                    ssl=self._ssl,
                    server_hostname=up.host if self._ssl else None,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self._open -= 1
            self._wake_one()
            if isinstance(exc, ssl.SSLError):
                # Clients only see 502; the operator needs to know it is the certificate.
                self._log_tls_error(getattr(exc, "verify_message", None) or exc.reason or str(exc))
            raise UpstreamUnavailable(type(exc).__name__) from exc
        return conn

    def _log_tls_error(self, error: str) -> None:
        now = self._loop.time()
        if now - self._tls_logged_at >= TLS_ERROR_LOG_INTERVAL:
            self._tls_logged_at = now
            log_event(
                "upstream_tls_error",
                upstream=self.upstream.url,
                ca_file=self.upstream.ca_file,
                error=error,
            )

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        if not reusable or conn.closed or self._closed:
            self._discard(conn)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self._loop.time()
        self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """Called when a socket closes; one in use is discarded by its exchange instead."""
        try:
            self._idle.remove(conn)
        except ValueError:
            return
        self._discard(conn)

    def _discard(self, conn: UpstreamConnection) -> None:
        if not conn._counted_out:
            conn._counted_out = True
            self._open -= 1
        if not conn.closed:
            conn.abort()
        self._wake_one()

    def _wake_one(self) -> None:
        # A slot opened: let one waiter connect anew.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._discard(self._idle.pop())
