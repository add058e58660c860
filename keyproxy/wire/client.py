"""Client connections: bytes in, parsed requests, answers out in order.

Each client socket is an `asyncio.Protocol` whose bytes are parsed by
httptools (llhttp). A request becomes an `Exchange` as soon as its head is
parsed; exchanges are started in order (HTTP/1.1 pipelining answers in order)
by `ProxyServer.start` (keyproxy.app), which decides and then answers or forwards.

Timeouts (slow headers, slow bodies, idle keep-alive, a silent upstream) are
checked by one periodic tick per connection instead of arming and cancelling
timers on every request. The head timeout runs from accept: a connection that
never sends a byte is closed after `header_timeout`, not `keepalive_timeout`.

Connections are capped in total and per peer address (see `keyproxy.app`); the
excess gets a short 503 and is closed at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

import httptools

from keyproxy.config.model import ServerSettings
from keyproxy.policy.headers import MEMO_IGNORED_HEADER_BYTES
from keyproxy.policy.refusals import (
    BAD_REQUEST,
    CHUNKS_TOO_SMALL,
    EXPECTATION_FAILED,
    HEADERS_TOO_LARGE,
    HOST_REQUIRED,
    REQUEST_TIMEOUT,
    TOO_MANY_CONNECTIONS,
    TRANSFER_CODING_REFUSED,
    UPGRADE_NOT_ALLOWED,
)
from keyproxy.request import Deny
from keyproxy.response.cors import single_header
from keyproxy.response.errors import error_response
from keyproxy.wire.exchange import Exchange
from keyproxy.wire.outbox import HeldWrites

if TYPE_CHECKING:
    from keyproxy.app import ProxyServer

MAX_HEADERS = 100
#: After refusing a request whose body is still arriving, keep reading (and discarding)
#: this long before closing, so the client can finish sending and read the refusal
#: instead of seeing a reset (nginx's lingering close).
LINGER_SECONDS = 2.0
#: Pipelined requests parsed ahead of the one being answered before reading pauses.
MAX_QUEUED = 8
#: Why reading may be paused: too many pipelined requests wait for their answers.
PIPELINE_FULL = object()
#: Why reading stops for good: the request stream broke (parse error, body timeout).
INPUT_DONE = object()
#: A chunked body may be cut into this many pieces freely; past it the pieces must
#: average at least MIN_AVERAGE_CHUNK bytes, so one read never costs more than a
#: few thousand parser callbacks (1,000,000 one-byte chunks would hold the loop for seconds).
FREE_CHUNKS = 1024
MIN_AVERAGE_CHUNK = 32
#: Bytes per second a request body must average, over each `body_timeout` window,
#: while it holds an upstream connection (Apache's mod_reqtimeout uses 500): one byte
#: every few seconds would otherwise keep a pool slot for as long as `max_body` lasts.
MIN_BODY_RATE = 500
#: Bytes a head's request line and line ends add to what `max_header_size` counts (the
#: URL and each `name: value` line + 4): a head still arriving is bounded by the bytes
#: received, a complete one by its counted size.
HEAD_FRAMING = 64
#: Request headers the parser itself acts on (framing, Host, Expect, Connection) or
#: notes for the decision memo.
PARSER_READS = (
    frozenset({b"content-length", b"transfer-encoding", b"host", b"expect", b"connection"})
    | MEMO_IGNORED_HEADER_BYTES
)


class ClientConnection(HeldWrites, asyncio.Protocol):
    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.outbox = proxy.outbox
        self.held: list[bytes] = []  # written this turn, sent when it ends (keyproxy.wire.outbox)
        self.peer_ip = ""
        self.closed = False
        self.lingering = False
        self.counted = False  # holds a slot of the connection limits
        self.ignore_input = False  # lingering, refused or broken: bytes read are dropped
        #: An error to send once every request before it is answered (a malformed
        #: request after valid pipelined ones), then close.
        self.pending_error: Deny | None = None
        self.awaiting_first = True  # no byte of any request yet
        self.last_read = 0.0
        self.body_pieces = 0  # on_body calls for the request body being parsed
        self.rate_since = 0.0  # start of the current body-rate window
        self.rate_bytes = 0  # body bytes received when it started
        self.to_flush: Exchange | None = None  # has request body to pass upstream after this read
        self.peer_done = False  # the client half-closed: answer what it asked, then close
        self.queue: deque[Exchange] = deque()
        self.active: Exchange | None = None
        self.parsing: Exchange | None = None
        self.dispatching = False
        self.tick: asyncio.TimerHandle | None = None
        self.read_pausers: set[object] = set()
        # The head being parsed.
        self.in_head = True
        self.head_begun = False  # a first byte of the next request has arrived
        self.head_started = 0.0
        #: Bytes of the reads during which the head was incomplete: at least its size.
        self.head_bytes = 0
        self.head_seen = 0  # at most its size so far: what limits a head still arriving
        self.read_size = 0  # bytes of the read being parsed
        self.read_body = 0  # of them, request body bytes (of the requests before a head)
        self.trailer_seen = 0  # bytes of a chunked body's reads that brought no body byte
        self.trailer_lines = 0  # counted size of the trailer lines parsed so far
        self.chunk_mark = -1  # chunked body pieces received when the last chunk header ended
        self.dropped_bytes = 0  # of header lines ignored for an underscore in the name
        self.url_parts: list[bytes] = []
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.lowered: list[tuple[str, str]] = []  # the same headers, as the checks read them
        self.content_length: int | None = None
        self.chunked = False
        self.expect: bytes | None = None
        self.hosts = 0
        self.connection_tokens: frozenset[bytes] = frozenset()
        self.varying = False  # a header the decision memo leaves out of its key was sent
        self.idle_since = 0.0
        self.max_body = proxy.serving.config.server.max_body
        self.max_header_size = proxy.serving.config.server.max_header_size

    # -- asyncio callbacks ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        proxy = self.proxy
        per_ip = proxy.per_ip
        held = per_ip.get(self.peer_ip, 0)
        if len(proxy.connections) >= proxy.max_connections or held >= proxy.max_per_ip:
            self.closed = self.ignore_input = True
            proxy.connection_refused(self.peer_ip, held)
            transport.write(  # type: ignore[attr-defined]
                error_response(
                    TOO_MANY_CONNECTIONS, proxy.request_ids.next(), b"Connection: close\r\n"
                )
            )
            transport.close()
            return
        per_ip[self.peer_ip] = held + 1
        self.counted = True
        # The first head's timeout starts now: silence from accept on is a slow head.
        self.head_begun = True
        self.head_started = self.idle_since = self.last_read = self.loop.time()
        transport.set_write_buffer_limits(high=256 * 1024)  # type: ignore[attr-defined]
        proxy.connections.add(self)
        self.tick = self.loop.call_later(proxy.tick_interval, self._on_tick)

    def data_received(self, data: bytes) -> None:
        if self.ignore_input:
            return
        self.last_read = self.loop.time()
        self.read_size = len(data)
        self.read_body = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The upgrading request was just queued: it is the one refused.
            self._parse_failed(UPGRADE_NOT_ALLOWED, self.queue[-1] if self.queue else None)
            return
        except httptools.HttpParserError as exc:
            # httptools wraps an exception raised in a callback; ours says why.
            cause = exc.__context__
            deny = cause.deny if isinstance(cause, _HeadRefused) else BAD_REQUEST
            self._parse_failed(deny, self.parsing)
            return
        ex = self.to_flush
        if ex is not None:
            self.to_flush = None
            ex.flush_body()  # all request body bytes of this read in one upstream write
        if self.in_head and self.head_begun:
            # A head still incomplete after this chunk: bound what llhttp and httptools
            # may be accumulating for it. Of the read it began in, every byte but the
            # bodies and heads of the requests before it (httptools holds a header line
            # until it ends, so what the callbacks have seen would miss a long one in
            # progress); of each later read, every byte.
            if self.head_bytes:
                self.head_seen += len(data)
            else:
                seen = len(data) - self.read_body
                if seen > self.max_header_size + HEAD_FRAMING:
                    # Pipelined heads (and chunked bodies) before it in this read end in a
                    # blank line; a head in progress holds none (llhttp refuses bare LF and
                    # folded lines), so it began after the last one.
                    end = data.rfind(b"\r\n\r\n")
                    if end >= 0:
                        seen = min(seen, len(data) - end - 4)
                self.head_seen = seen
            self.head_bytes += len(data)
            if self.head_seen > self.max_header_size + HEAD_FRAMING:
                self._parse_failed(HEADERS_TOO_LARGE, None)
                return
        elif self.chunked and self.parsing is not None:
            # A chunked body's trailer fields are held by httptools like a head's (and
            # then ignored): the reads that bring no body byte are bounded as a head is.
            if self.read_body:
                if self.chunk_mark == self.body_pieces:
                    # A chunk header came after the last body bytes: it may be the last
                    # chunk's, its trailer begun in this read. Its complete lines are
                    # counted as they end; the line httptools still holds is at most the
                    # bytes after the line end before the read's last byte.
                    held = len(data) - data.rfind(b"\n", 0, len(data) - 1) - 1
                    self.trailer_seen = self.trailer_lines + held
                    if self.trailer_seen > self.max_header_size + HEAD_FRAMING:
                        self._parse_failed(HEADERS_TOO_LARGE, self.parsing)
                        return
                else:
                    self.trailer_seen = 0
            else:
                self.trailer_seen += len(data)
                if self.trailer_seen > self.max_header_size + HEAD_FRAMING:
                    self._parse_failed(HEADERS_TOO_LARGE, self.parsing)
                    return
        if self.active is None and self.queue:
            # After the whole read is parsed, so a refused request whose body came
            # in the same packet is known to be complete and the connection can stay.
            self._dispatch()

    def eof_received(self) -> bool:
        """The client will send nothing more. Complete requests still get their answers
        (HTTP/1.1 clients may half-close, as `nc -N` does); a request cut short cannot."""
        if self.active is None and not self.queue:
            return False  # nothing (complete) to answer: let the transport close
        self.peer_done = True
        cut = self.parsing
        if cut is not None:  # its body will never be complete: the requests before it still are
            self._stop_input()
            self.parsing = None  # nothing more can arrive: no lingering
            self._fail_request(cut, BAD_REQUEST)
            if self.active is None and self.queue:
                self._dispatch()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.counted:
            self.counted = False
            per_ip = self.proxy.per_ip
            left = per_ip[self.peer_ip] - 1
            if left:
                per_ip[self.peer_ip] = left
            else:
                del per_ip[self.peer_ip]
        self.proxy.connections.discard(self)
        if self.tick is not None:
            self.tick.cancel()
        if self.active is not None:
            self.active.client_lost()

    def pause_writing(self) -> None:
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()

    def resume_writing(self) -> None:
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()

    # -- httptools callbacks -------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_head = True
        if self.awaiting_first:
            self.awaiting_first = False  # the head's time has run since accept
        else:
            self.head_started = self.loop.time()
        self.head_begun = True
        # The limit of the snapshot being served as the head begins: after a reload that
        # lowered it, a kept-alive connection's next head is held to the new one.
        self.max_header_size = self.proxy.serving.config.server.max_header_size
        self.head_bytes = 0
        self.dropped_bytes = 0
        self.trailer_seen = 0
        self.url_parts = []
        self.raw_headers = []
        self.lowered = []
        self.content_length = None
        self.chunked = False
        self.expect = None
        self.hosts = 0
        self.connection_tokens = frozenset()
        self.varying = False

    def on_url(self, url: bytes) -> None:
        self.url_parts.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            # A chunked body's trailer: never read, never forwarded, only counted, and
            # bounded as it comes (a read of tiny lines stops here, as in a head).
            self.trailer_lines += len(name) + len(value) + 4
            if self.trailer_lines > self.max_header_size:
                raise _HeadRefused(HEADERS_TOO_LARGE)
            return
        headers = self.raw_headers
        if len(headers) >= MAX_HEADERS:  # per header: a read of tiny ones stops here
            raise _HeadRefused(HEADERS_TOO_LARGE)
        if b"_" in name:
            # CGI, WSGI, Rack and Puma read `X-API_Key` or `X-Forwarded_For` as the
            # hyphenated header, so no list of names to drop could cover every mix of
            # the two. Such headers are ignored altogether, neither decided on nor
            # forwarded, as nginx does by default (`underscores_in_headers off`).
            self.dropped_bytes += len(name) + len(value) + 4
            if self.dropped_bytes > self.max_header_size:  # a read of tiny ones stops here
                raise _HeadRefused(HEADERS_TOO_LARGE)
            return
        headers.append((name, value))
        lname = name.lower()
        self.lowered.append((lname.decode("latin-1"), value.decode("latin-1")))
        if lname in PARSER_READS:  # most headers are none of these: one set probe for them
            self._read_header(lname, value)

    def _read_header(self, lname: bytes, value: bytes) -> None:
        if lname == b"content-length":
            self.content_length = int(value)  # llhttp has validated it
        elif lname == b"transfer-encoding":
            if self.chunked or value.strip().lower() != b"chunked":
                # gzip and friends would be forwarded undeclared once the chunking is
                # undone; only plain chunked framing crosses the proxy (as nginx asks).
                raise _HeadRefused(TRANSFER_CODING_REFUSED)
            self.chunked = True
            self.trailer_lines = 0
            self.chunk_mark = -1
        elif lname == b"host":
            self.hosts += 1
        elif lname == b"expect":
            self.expect = value.lower()
        elif lname == b"connection":
            self.connection_tokens = self.connection_tokens | frozenset(
                t.strip() for t in value.lower().split(b",")
            )
        if lname in MEMO_IGNORED_HEADER_BYTES:
            self.varying = True  # the decision memo's key leaves it out

    def on_headers_complete(self) -> None:
        # The head came within the bytes read since it began: only when those could
        # exceed the limit is its size added up (per header, this cost ~3% of a request).
        # What those reads may hold before the size is added up: each line may count a
        # byte more than it takes (`a:` and CRLF are 4 bytes, counted 5), the 100 kept and
        # the ignored underscore ones (5 bytes counted at least). From the limit of this
        # request's snapshot: a reload may have lowered it.
        limit = self.max_header_size
        if (
            self.head_bytes + self.read_size > limit - MAX_HEADERS - limit // 5
            and self._head_size() > limit
        ):
            raise _HeadRefused(HEADERS_TOO_LARGE)
        self.in_head = False
        self.head_begun = False
        parser = self.parser
        http11 = parser.get_http_version() == "1.1"
        if not http11 and (self.chunked or parser.get_http_version() != "1.0"):
            # llhttp also reads `HTTP/2.0` text and versionless (0.9) lines followed by
            # headers, and chunked framing in HTTP/1.0, which has none: a front proxy may
            # frame any of them otherwise, so none is served (nginx refuses them too).
            raise _HeadRefused(BAD_REQUEST)
        ex = Exchange(
            self,
            parser.get_method().decode("ascii"),
            b"".join(self.url_parts).decode("latin-1"),
            self.raw_headers,
            http11,
            parser.should_keep_alive(),
            self.proxy.request_ids.next(),
        )
        ex.headers = self.lowered
        ex.content_length = None if self.chunked else self.content_length
        ex.chunked = self.chunked
        ex.connection_tokens = self.connection_tokens
        ex.varying = self.varying
        if self.expect is not None:
            if self.expect == b"100-continue":
                # An HTTP/1.0 client cannot read a 1xx answer: the expectation is ignored.
                ex.expect_continue = http11
            else:
                ex.early_deny = EXPECTATION_FAILED
        if self.hosts > 1 or (http11 and self.hosts == 0):
            ex.early_deny = HOST_REQUIRED
        if not ex.has_body:
            ex.body_complete = True
        self.parsing = ex
        self.body_pieces = 0
        self.rate_since, self.rate_bytes = self.last_read, 0
        self.queue.append(ex)
        if len(self.queue) > MAX_QUEUED:
            self.pause_reading(PIPELINE_FULL)

    def _head_size(self) -> int:
        """The head's bytes as the limit counts them: the URL and each `name: value` line."""
        size = self.dropped_bytes + sum(map(len, self.url_parts))
        for name, value in self.raw_headers:
            size += len(name) + len(value) + 4
        return size

    def on_body(self, body: bytes) -> None:
        self.read_body += len(body)
        ex = self.parsing
        if ex is not None:
            if ex.chunked:
                pieces = self.body_pieces = self.body_pieces + 1
                if pieces > FREE_CHUNKS and ex.body_received < pieces * MIN_AVERAGE_CHUNK:
                    raise _HeadRefused(CHUNKS_TOO_SMALL)
            ex.feed_body(body)

    def on_chunk_header(self) -> None:
        # Where the trailer may begin: no body piece since the last chunk header.
        self.chunk_mark = self.body_pieces

    def on_message_complete(self) -> None:
        if self.parsing is not None:
            self.parsing.end_body()
            self.parsing = None

    # -- one exchange at a time, in order ---------------------------------------
    def _dispatch(self) -> None:
        """Start queued exchanges until one is in flight (HTTP/1.1 answers in order)."""
        if self.dispatching:
            return  # an exchange finished while starting: the loop below goes on
        self.dispatching = True
        try:
            queue = self.queue
            while self.active is None and queue and not self.closed:
                ex = queue.popleft()
                if self.read_pausers and len(queue) <= MAX_QUEUED:
                    self.resume_reading(PIPELINE_FULL)
                self.active = ex
                try:
                    self.proxy.start(self, ex)
                except Exception as exc:  # a bug must cost one request, never the process
                    self.internal_error(ex, exc)
        finally:
            self.dispatching = False

    def internal_error(self, ex: Exchange, exc: BaseException) -> None:
        ex.fail_internally(exc)

    def exchange_done(self, ex: Exchange, keep_alive: bool) -> None:
        """`ex` is answered: go on with the next request (or close), then count it."""
        try:
            if self.active is ex:
                self.active = None
            if self.closed:
                return
            if not keep_alive or self.proxy.draining:
                self.close()
                return
            if not self.queue:
                if self.pending_error is not None:  # everything before the bad one is answered
                    self._refuse_now(self.pending_error)
                    return
                if self.peer_done:
                    self.close()
                    return
            self.idle_since = self.loop.time()
            if self.queue:
                self._dispatch()
        finally:
            self.proxy.observer.exchange_finished(ex)  # the one place a request is counted

    def cors_headers(self, ex: Exchange) -> bytes:
        """CORS lines for an answer keyproxy gives itself, under the request's snapshot."""
        ctx = ex.ctx
        cors = (ctx.config if ctx is not None else self.proxy.serving.config).cors
        if cors is None:
            return b""
        return cors.response_headers(single_header(ex.headers, "origin"))

    def _parse_failed(self, deny: Deny, culprit: Exchange | None) -> None:
        """The request stream broke. Requests before the break are answered in order;
        `culprit` (a request whose body or upgrade broke it), or else a separate error
        after them, carries `deny`; then the connection closes."""
        self._stop_input()
        if culprit is not None:
            self._fail_request(culprit, deny)
        elif self.active is None and not self.queue:
            self._refuse_now(deny)
            return
        else:
            self.pending_error = deny
        if self.active is None and self.queue:
            self._dispatch()

    def _body_too_slow(self, body: Exchange, now: float, settings: ServerSettings) -> bool:
        if now - self.last_read > settings.body_timeout:
            return True
        window = now - self.rate_since
        if window < settings.body_timeout:
            return False
        if (
            body.upstream is not None
            and body.body_received - self.rate_bytes < MIN_BODY_RATE * window
        ):
            return True  # trickling while holding an upstream connection
        self.rate_since, self.rate_bytes = now, body.body_received
        return False

    def _stop_input(self) -> None:
        # `parsing` stays set when a body was arriving: closing then lingers, so a
        # client still sending can read its answer instead of a reset.
        self.ignore_input = True
        self.to_flush = None
        self.pause_reading(INPUT_DONE)

    def _fail_request(self, ex: Exchange, deny: Deny) -> None:
        """`ex` cannot be completed: answer it with `deny` in its turn (or cut it if its
        answer has begun); the connection closes after it."""
        ex.keep_alive = False
        if ex is self.active:
            ex.abandon(deny)
        elif not ex.done:
            ex.early_deny = deny

    def _on_tick(self) -> None:
        if self.closed or self.lingering:
            return
        now = self.loop.time()
        settings = self.proxy.serving.config.server
        body = self.parsing
        # A request body arriving too slowly (unless keyproxy is the one holding it up).
        if body is not None and not self.read_pausers and self._body_too_slow(body, now, settings):
            self._stop_input()
            self._fail_request(body, REQUEST_TIMEOUT)
            if self.active is None and self.queue:
                self._dispatch()
            if self.closed:
                return
        if self.active is not None:
            self.active.check_timeout(now)
        elif not self.queue:
            if self.head_begun:  # a request has started but its head is not complete
                if now - self.head_started > settings.header_timeout:
                    if self.awaiting_first and not self.head_bytes:
                        self.close()  # never said a word: nobody to answer
                    else:
                        self._refuse_now(REQUEST_TIMEOUT)
                    return
            elif now - self.idle_since > settings.keepalive_timeout:
                self.close()  # idle between requests
                return
        self.tick = self.loop.call_later(self.proxy.tick_interval, self._on_tick)

    # -- writing: `write`, `writelines` and `send_held` come from `HeldWrites` ---
    def connection_header(self, ex: Exchange) -> bytes:
        if not ex.keep_alive or self.proxy.draining:
            ex.keep_alive = False
            return b"Connection: close\r\n"
        return b"" if ex.http11 else b"Connection: keep-alive\r\n"

    def pause_reading(self, reason: object) -> None:
        """Stop reading the client for `reason`; reading resumes once no reason is left."""
        if not self.read_pausers and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.read_pausers.add(reason)

    def resume_reading(self, reason: object) -> None:
        if reason not in self.read_pausers:
            return
        self.read_pausers.discard(reason)
        if not self.read_pausers and self.transport is not None and not self.closed:
            # The body timeout and rate window count from now again.
            self.last_read = self.rate_since = self.loop.time()
            if self.parsing is not None:
                self.rate_bytes = self.parsing.body_received
            self.transport.resume_reading()

    def close(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.lingering:
            return
        if self.parsing is not None and not self.closed:
            # A request body is still arriving: finish writing, stop answering, drain a while.
            self.lingering = self.ignore_input = True
            self.read_pausers.clear()
            transport.resume_reading()
            self.send_held()
            transport.write_eof()
            self.closed = True  # nothing may be written after the EOF (uvloop raises)
            self.loop.call_later(LINGER_SECONDS, self.abort)
            return
        self.send_held()
        transport.close()

    def abort(self) -> None:
        """Cut the connection. What this turn wrote goes first: an answer cut after its
        head must reach the client as a head and then a cut (a truncated answer), not a
        bare reset, which a browser may take as leave to send the request again."""
        self.send_held()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def send_failed(self, exc: Exception) -> None:
        self.abort()  # the exchange learns it from `connection_lost`

    def _refuse_now(self, deny: Deny) -> None:
        """A request that cannot even be parsed: answer if nothing else is under way, then close."""
        if self.active is None and not self.closed:
            rid = self.proxy.request_ids.next()
            answer = error_response(deny, rid, b"Connection: close\r\n")
            self.write(answer)
            self._count_refusal(deny, rid, len(answer))
        self.queue.clear()
        self.send_held()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _count_refusal(self, deny: Deny, request_id: str, sent: int) -> None:
        """A request refused before it could be parsed is still a request: it is counted
        in the metrics and the access log like any other refusal."""
        method = target = "-"
        if self.in_head and self.head_begun and self.url_parts:  # the method and URL were read
            method = self.parser.get_method().decode("ascii", "replace")
            target = b"".join(self.url_parts).decode("latin-1")
        ex = Exchange(self, method, target, [], False, False, request_id)
        if self.head_begun or self.head_bytes:
            ex.started -= self.loop.time() - self.head_started  # the head's time counts
        ex.status, ex.reason, ex.sent = deny.status, deny.code, sent
        ex.done = True
        self.proxy.observer.exchange_finished(ex)


class _HeadRefused(Exception):
    """Raised inside a parser callback to stop parsing a head keyproxy will not accept."""

    def __init__(self, deny: Deny) -> None:
        self.deny = deny
