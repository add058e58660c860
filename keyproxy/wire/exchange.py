"""One request's trip upstream and back.

An `Exchange` is created by the client connection when a request's head has
been parsed. If the decision allows it, `Exchange.forward` sends the head the
`ForwardPlan` wrote upstream and streams the body both ways: request body chunks
are written to the upstream socket as they arrive, response body chunks to the
client as they arrive, with flow control in both directions and nothing buffered
beyond the sockets' own limits — unless a link of the response chain asks to
hold the body (`ResponseHead.hold`).

The exchange sees the client and the upstream only through the small Protocols
below (`ClientSide`, `UpstreamSide`, `Pool`), so it can be driven without sockets
and imports neither the client connection nor the forwarding plan.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import Any, Protocol, TypeVar

from keyproxy.observability import log_event
from keyproxy.policy.refusals import (
    INTERNAL_ERROR,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    payload_too_large,
)
from keyproxy.request import Deny, Reply, RequestContext
from keyproxy.response.chain import Chain, Link, RefuseAnswer, ResponseHead
from keyproxy.response.errors import error_response, reason
from keyproxy.response.links import HeaderLink, rate_limit_headers
from keyproxy.wire.upstream import UpstreamUnavailable

NO_BODY, RAW, CHUNKED = 0, 1, 2
NOT_STARTED, HEAD_QUEUED, HEAD_WRITTEN = 0, 1, 2
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Request body buffered while the decision runs; past it the client is paused.
BODY_BUFFER_LIMIT = 256 * 1024
#: A request body that completes within this many bytes is received whole before an
#: upstream connection is taken: a client trickling a small body holds only its own
#: connection (bounded by `body_timeout`), never one of the upstream pool's.
BODY_WAIT_LIMIT = 64 * 1024
#: Requests that may be sent again when a reused socket turns out to be dead.
REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
#: Why client reading may be paused: the upstream cannot take the request body faster.
UPSTREAM_BACKPRESSURE = object()


class ClientSide(Protocol):
    """What an exchange uses of the client connection it answers on."""

    loop: asyncio.AbstractEventLoop
    closed: bool
    peer_ip: str  # for the access log
    max_body: int
    to_flush: Exchange | None

    def write(self, data: bytes) -> None: ...
    def writelines(self, parts: list[bytes]) -> None: ...
    def abort(self) -> None: ...
    def pause_reading(self, reason: object) -> None: ...
    def resume_reading(self, reason: object) -> None: ...
    def connection_header(self, ex: Exchange) -> bytes: ...
    def cors_headers(self, ex: Exchange) -> bytes: ...
    def exchange_done(self, ex: Exchange, keep_alive: bool) -> None: ...


class UpstreamSide(Protocol):
    """What an exchange uses of one upstream connection."""

    uses: int
    got_response_bytes: bool

    def begin(self, listener: Exchange) -> None: ...
    def write(self, data: bytes) -> None: ...
    def writelines(self, parts: list[bytes]) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def end_head_only(self) -> None: ...
    def abort(self) -> None: ...


U = TypeVar("U", bound=UpstreamSide)


class Pool(Protocol[U]):
    """Where upstream connections come from and go back to."""

    def take_idle(self) -> U | None: ...
    async def acquire(self) -> U: ...
    def release(self, conn: U, reusable: bool) -> None: ...


class Plan(Protocol):
    """What an exchange needs of the forwarding plan (`keyproxy.forward.plan.ForwardPlan`)."""

    max_body: int
    timeout: float

    def request_head(self, ctx: RequestContext, request: Exchange) -> bytes: ...


class RouteSlots(Protocol):
    """A route's `max_concurrency` count, given back when the exchange finishes."""

    def release(self, match: str) -> None: ...


class Exchange:
    """One request/response pair on a client connection."""

    __slots__ = (
        "allowed",
        "answer",
        "body_buffered",
        "body_chunks",
        "body_complete",
        "body_links",
        "body_received",
        "body_wait",
        "chain",
        "chunked",
        "conn",
        "connection_tokens",
        "content_length",
        "ctx",
        "done",
        "early_deny",
        "expect_continue",
        "headers",
        "held",
        "held_head",
        "http11",
        "keep_alive",
        "last_activity",
        "links",
        "memo_key",
        "method",
        "mode",
        "out",
        "plan",
        "pool",
        "raw_headers",
        "reason",
        "request_head",
        "request_id",
        "retried",
        "reused",
        "route_slot",
        "route_slots",
        "sent",
        "started",
        "status",
        "target",
        "too_large",
        "up_pending",
        "upstream",
        "upstream_started",
        "varying",
    )

    def __init__(
        self,
        conn: ClientSide,
        method: str,
        target: str,
        raw_headers: list[tuple[bytes, bytes]],
        http11: bool,
        keep_alive: bool,
        request_id: str,
    ) -> None:
        self.conn = conn
        self.method = method
        self.target = target
        self.raw_headers = raw_headers  # as received, for forwarding
        self.headers: list[tuple[str, str]] = []  # lower-case names, decoded: for the checks
        self.http11 = http11
        self.keep_alive = keep_alive
        self.request_id = request_id
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.early_deny: Deny | None = None  # a head the server refuses before any check
        self.connection_tokens: frozenset[bytes] = frozenset()
        self.varying = False  # see `keyproxy.checks.memo.memo_key`
        self.memo_key: tuple[object, ...] | None = None  # set by the server with the decision
        self.body_chunks: list[bytes] = []
        self.body_buffered = 0
        self.body_received = 0
        self.body_complete = False
        self.too_large = False
        #: How far the answer has got: NOT_STARTED → HEAD_QUEUED (produced, still in
        #: `out`: it can yet be replaced by an error) → HEAD_WRITTEN (the client may have
        #: it: a failure from here on can only cut the connection).
        self.answer = NOT_STARTED
        self.mode = NO_BODY
        #: Response bytes produced while handling one upstream read, written with one
        #: writev when that read is done: head and body of a small response cost one syscall.
        self.out: list[bytes] = []
        self.upstream: UpstreamSide | None = None
        self.pool: Pool[Any] | None = None
        self.plan: Plan | None = None
        self.ctx: RequestContext | None = None
        self.request_head = b""
        #: The decision allowed it: forwarding has begun, a stored answer is served, or
        #: keyproxy answered a CORS preflight (the metrics and the access log count it
        #: as allowed).
        self.allowed = False
        self.reused = False  # the upstream socket had served an earlier exchange
        self.retried = False
        self.done = False  # answered (or abandoned); the connection has been told
        self.last_activity = 0.0
        self.body_wait = False  # decided, waiting for a small body to complete
        self.up_pending: list[bytes] = []  # request body read this turn, for one upstream write
        self.route_slot: str | None = None  # counted against its route's max_concurrency
        self.route_slots: RouteSlots | None = None  # ... here, until `_finish`
        #: The response chain of the request's snapshot and route (set on allow) and
        #: this response's links, made from it when the upstream's head arrives.
        self.chain: Chain = ()
        self.links: list[Link] | None = None
        self.body_links: list[Link] | None = None  # those that see the body
        self.held: list[bytes] | None = None  # the links' output while a link holds the body
        self.held_head: ResponseHead | None = None
        # For the access log and the metrics (keyproxy.observe), reported once by `_finish`.
        # perf_counter, not the loop's clock: uvloop's ticks per millisecond, which wrote a
        # loopback answer's 0.3 ms as 0 or 1 ms.
        self.started = perf_counter()
        self.status = 0  # the status answered; 0 until a head is produced
        self.reason: str | None = None  # the code of an answer keyproxy gave itself
        self.sent = 0  # bytes written to the client
        self.upstream_started = 0.0

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    # -- request body, fed by the server's parser callbacks ------------------
    def feed_body(self, chunk: bytes) -> None:
        self.body_received += len(chunk)
        plan = self.plan
        max_body = plan.max_body if plan is not None else self.conn.max_body
        if self.body_received > max_body:
            if not self.too_large:
                self.too_large = True
                self._body_too_large(max_body)
            return
        if self.upstream is not None:
            # Written once the whole read is parsed (`flush_body`): a read holding
            # thousands of chunks costs one upstream write, not thousands.
            if not self.up_pending:
                self.conn.to_flush = self
            self.up_pending.append(chunk)
        elif self.done:
            return  # already answered: the rest of the body is discarded
        else:
            self.body_chunks.append(chunk)
            self.body_buffered += len(chunk)
            if self.body_wait and self.body_buffered > BODY_WAIT_LIMIT:
                self._go_upstream()  # too large to wait for: stream the rest
            elif self.body_buffered > BODY_BUFFER_LIMIT:
                self.conn.pause_reading(self)

    def flush_body(self) -> None:
        pending, self.up_pending = self.up_pending, []
        upstream = self.upstream
        if upstream is None or not pending:
            return
        self.last_activity = self.conn.loop.time()
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        if self.chunked:
            upstream.writelines([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            upstream.write(data)

    def end_body(self) -> None:
        self.body_complete = True
        if self.body_wait:
            self._go_upstream()
            return
        upstream = self.upstream
        if upstream is not None and not self.too_large:
            if self.up_pending:
                self.flush_body()
            if self.chunked:
                upstream.write(b"0\r\n\r\n")

    def _body_too_large(self, max_body: int) -> None:
        self.keep_alive = False
        self.body_chunks = []
        self.up_pending = []
        self.body_wait = False
        if self.upstream is not None:
            self._drop_upstream()
        if self.allowed and not self.done:
            if self.answer != NOT_STARTED:
                self.conn.abort()
                self._finish(False)
            else:
                self.send_error(payload_too_large(max_body))

    # -- the decision said yes: go upstream ----------------------------------
    def forward(self, ctx: RequestContext, plan: Plan, pool: Pool[Any]) -> None:
        """Send the request upstream; the answer arrives through the listener callbacks.

        With an idle pooled connection at hand this runs to the write without
        suspending; only opening a connection (or waiting for a free one) needs
        a task.
        """
        self.ctx = ctx
        self.plan = plan
        self.pool = pool
        self.allowed = True
        if self.too_large or (
            self.content_length is not None and self.content_length > plan.max_body
        ):
            self.send_error(payload_too_large(plan.max_body))
            return
        if self.expect_continue and not self.body_complete:
            self.conn.write(CONTINUE_100)
        self.request_head = plan.request_head(ctx, self)
        if (
            not self.body_complete
            and (self.content_length is None or self.content_length <= BODY_WAIT_LIMIT)
            and self.body_buffered <= BODY_WAIT_LIMIT
        ):
            self.body_wait = True  # `end_body` or a full wait buffer goes on
            return
        self._go_upstream()

    def _go_upstream(self) -> None:
        self.body_wait = False
        pool = self.pool
        assert pool is not None
        upstream = pool.take_idle()
        if upstream is None:
            self.conn.loop.create_task(self._connect())
        else:
            self._send(upstream)

    async def _connect(self) -> None:
        pool = self.pool
        assert pool is not None
        try:
            upstream = await pool.acquire()
        except UpstreamUnavailable:
            self.send_error(UPSTREAM_UNAVAILABLE)
            return
        except TimeoutError:
            self.send_error(UPSTREAM_TIMEOUT)
            return
        if self.done or self.conn.closed:
            pool.release(upstream, True)
            return
        self._send(upstream)

    def _send(self, upstream: UpstreamSide) -> None:
        self.upstream = upstream
        self.reused = upstream.uses > 0
        self.last_activity = self.conn.loop.time()
        self.upstream_started = perf_counter()
        upstream.begin(self)
        parts = [self.request_head]
        if self.body_chunks:
            chunks, self.body_chunks, self.body_buffered = self.body_chunks, [], 0
            if self.chunked:  # what was buffered goes as one chunk, however it came
                data = b"".join(chunks)
                parts += (b"%x\r\n" % len(data), data, b"\r\n")
            else:
                parts += chunks
            self.conn.resume_reading(self)
        if self.body_complete and self.chunked:
            parts.append(b"0\r\n\r\n")
        if len(parts) == 1:
            upstream.write(parts[0])
        else:
            upstream.writelines(parts)

    # -- ResponseListener: events from the upstream connection ----------------
    def on_response_head(self, status: int, lines: list[bytes], length: bytes | None) -> None:
        declared = int(length) if length is not None else None
        chain = self.chain
        if chain:  # an empty chain (no response work configured) costs this one `if`
            # Each link is made and shown the head in chain order, in one loop: this runs
            # for every forwarded answer, so it is written out rather than split up.
            ctx = self.ctx
            assert ctx is not None  # set by the decision before forwarding
            head = ResponseHead(status, lines, declared, self.method)
            links: list[Link] = []
            body_links: list[Link] = []
            try:
                for make in chain:
                    link = make(ctx)
                    if link is None:
                        continue
                    links.append(link)
                    if not isinstance(link, HeaderLink):
                        body_links.append(link)
                    deny = link.on_head(head)
                    if deny is not None:
                        self._replace_answer(deny)
                        return
            except Exception as exc:  # a bug in a link costs this request only
                self.fail_internally(exc)
                return
            self.links = links
            if body_links:
                self.body_links = body_links
            if head.hold:
                self.held_head = head
                self.held = []
            else:
                self._write_head(head.status, head.lines, head.length)
        else:
            self._write_head(status, lines, declared)
        if self.method == "HEAD" and self.upstream is not None:
            self.upstream.end_head_only()  # no body follows, whatever the length says

    def _make_links(self, chain: Chain, start: int) -> list[Link]:
        """This response's links from `chain[start:]`; the ones that see the body apart."""
        ctx = self.ctx
        assert ctx is not None
        links = []
        body_links = []
        for make in chain[start:]:
            link = make(ctx)
            if link is not None:
                links.append(link)
                if not isinstance(link, HeaderLink):
                    body_links.append(link)
        self.links = links
        self.body_links = body_links or None
        return links

    @staticmethod
    def _run_heads(links: list[Link], head: ResponseHead) -> Deny | None:
        for link in links:
            deny = link.on_head(head)
            if deny is not None:
                return deny
        return None

    def _write_head(self, status: int, lines: list[bytes], length: int | None) -> None:
        """Queue the response head with keyproxy's own framing; choose the body's framing."""
        if self.method == "HEAD" or status == 204 or status == 304:
            mode = NO_BODY
            framing = b""
            if length is not None and status != 204:
                framing = b"Content-Length: %d\r\n" % length
        elif length is not None:
            mode = RAW
            framing = b"Content-Length: %d\r\n" % length
        elif self.http11:
            mode = CHUNKED
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            mode = RAW
            framing = b""
            self.keep_alive = False  # the body ends when the connection does
        if not self.body_complete:
            self.keep_alive = False  # the upstream answered before the client finished sending
        self.mode = mode
        self.answer = HEAD_QUEUED
        self.status = status
        self.out.append(
            b"HTTP/1.1 %d %s\r\n%sX-Request-Id: %s\r\n%s%s\r\n"
            % (
                status,
                reason(status),
                b"".join(lines),
                self.request_id.encode(),
                framing,
                self.conn.connection_header(self),
            )
        )

    def on_response_body(self, data: bytes) -> None:
        body_links = self.body_links
        if body_links is not None:
            try:
                for link in body_links:
                    data = link.on_body(data)
                    if not data:
                        return
            except Exception as exc:
                self.fail_internally(exc)
                return
            held = self.held
            if held is not None:
                held.append(data)
                return
        elif self.held is not None:
            self.held.append(data)
            return
        if self.mode == CHUNKED:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        elif self.mode == RAW:
            self.out.append(data)

    def _frame(self, data: bytes) -> None:
        if self.mode == CHUNKED:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        elif self.mode == RAW:
            self.out.append(data)

    def _end_links(self) -> bytes | Deny:
        """The links' last bytes: each link's rest passes through the links after it."""
        rest = b""
        body_links = self.body_links
        if body_links is None:
            return rest
        for link in body_links:
            if rest:
                rest = link.on_body(rest)
            end = link.on_end()
            if end.__class__ is Deny:
                return end
            rest += end  # type: ignore[operator]
        return rest

    def flush(self) -> None:
        """Called after each upstream read: pass on what it produced, in one write."""
        out = self.out
        if out:
            # A small response is joined (copying a few hundred bytes is cheaper than
            # a scatter write); a large one goes out as it is.
            if len(out) == 1:
                self.sent += len(out[0])
                self.conn.write(out[0])
            else:
                size = sum(map(len, out))
                self.sent += size
                if len(out) <= 4 and size <= 16384:
                    self.conn.write(b"".join(out))
                else:
                    self.conn.writelines(out)
            self.out = []
            if self.answer == HEAD_QUEUED:
                self.answer = HEAD_WRITTEN
            self.last_activity = self.conn.loop.time()
        elif self.body_links is not None or self.held is not None:
            # A link is buffering what this read brought: the upstream is not silent.
            self.last_activity = self.conn.loop.time()

    def on_response_end(self, reusable: bool) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None and self.pool is not None:
            self.pool.release(upstream, reusable and self.body_complete and not self.too_large)
        if self.body_links is not None or self.held_head is not None:
            if self.done:
                return
            try:
                rest = self._end_links()
            except Exception as exc:
                self.fail_internally(exc)
                return
            head = self.held_head
            if head is not None:
                held = self.held
                self.held_head = self.held = None
                if rest.__class__ is Deny:
                    self.send_error(rest)
                    return
                assert held is not None
                held.append(rest)  # type: ignore[arg-type]
                self._send_whole(head, b"".join(held))
                return
            if rest.__class__ is Deny:  # a Deny without hold: too late to answer it
                self.conn.abort()
                self._finish(False)
                return
            if rest:
                self._frame(rest)  # type: ignore[arg-type]  # bytes: the Deny case returned
        if self.mode == CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self._finish(self.keep_alive)

    def _send_whole(self, head: ResponseHead, body: bytes) -> None:
        """Head and body at once, with the body's real length (a held or stored answer)."""
        no_body = self.method == "HEAD" or head.status == 204 or head.status == 304
        self._write_head(head.status, head.lines, None if head.status == 204 else len(body))
        if not no_body:
            self.out.append(body)
        self._finish(self.keep_alive)

    def serve_stored(self, status: int, lines: list[bytes], body: bytes, start: int) -> None:
        """Answer from a stored response (a cache hit) through the links from `chain[start]`
        on, exactly as if the upstream had sent it; the upstream and its pool are untouched."""
        if self.done:
            return
        self.allowed = True
        try:
            links = self._make_links(self.chain, start) if self.chain else []
            head = ResponseHead(status, list(lines), len(body), self.method)
            if links:
                deny = self._run_heads(links, head)
                if deny is not None:
                    self.send_error(deny)
                    return
                if body and self.body_links is not None:
                    for link in self.body_links:
                        body = link.on_body(body)
                        if not body:
                            break
                rest = self._end_links()
                if rest.__class__ is Deny:
                    self.send_error(rest)
                    return
                body += rest  # type: ignore[operator]
        except Exception as exc:
            self.fail_internally(exc)
            return
        self._send_whole(head, body)

    def _replace_answer(self, deny: Deny) -> None:
        """A link refused the upstream's answer before any of it left: drop the upstream
        (its body will not be read) and answer `deny` instead."""
        self._drop_upstream()
        self.send_error(deny)

    def fail_internally(self, exc: BaseException) -> None:
        """A bug (in a check or a link) costs this request only: 500 if nothing of the
        answer has left, else a cut connection; the process and other requests go on.
        A link's `RefuseAnswer` takes the same way out with its own Deny (every place a
        link runs already leads here, so refusing costs the data path nothing)."""
        refused = exc.deny if isinstance(exc, RefuseAnswer) else None
        if refused is None:
            log_event("internal_error", request_id=self.request_id, error=type(exc).__name__)
        if self.done:
            return
        if self.upstream is not None:
            self._drop_upstream()
        self.held_head = self.held = None
        if self.answer == HEAD_QUEUED:
            self.out = []
            self.answer = NOT_STARTED
        if self.answer != NOT_STARTED:
            self.conn.abort()
            self._finish(False)
        elif refused is not None:
            self.send_error(refused)
        else:
            self.keep_alive = False
            self.send_error(INTERNAL_ERROR)

    def on_upstream_error(self, conn: UpstreamSide, exc: BaseException) -> None:
        self.upstream = None
        if self.pool is not None:
            self.pool.release(conn, False)
        if self.done:
            return
        if self.answer == HEAD_QUEUED:
            # Broken before any of the answer left: the client can still get a clean 502.
            self.out = []
            self.answer = NOT_STARTED
        if self.answer != NOT_STARTED:
            self.conn.abort()  # the client saw a head; a truncated body must look truncated
            self._finish(False)
        elif (
            self.reused
            and not self.retried
            and not conn.got_response_bytes
            and not self.has_body
            and self.method in REPLAYABLE
        ):
            # A kept-alive socket the upstream had already closed: once more, on another.
            self.retried = True
            self.conn.loop.create_task(self._connect())
        else:
            self.send_error(UPSTREAM_UNAVAILABLE)

    def pause_client_reading(self) -> None:
        self.conn.pause_reading(UPSTREAM_BACKPRESSURE)

    def resume_client_reading(self) -> None:
        self.conn.resume_reading(UPSTREAM_BACKPRESSURE)

    # -- timeouts, driven by the connection's periodic tick --------------------
    def check_timeout(self, now: float) -> None:
        plan = self.plan
        if self.upstream is None or plan is None or now - self.last_activity < plan.timeout:
            return
        self._drop_upstream()
        if self.answer != NOT_STARTED:
            self.conn.abort()
            self._finish(False)
        else:
            self.send_error(UPSTREAM_TIMEOUT)

    def client_lost(self) -> None:
        if self.upstream is not None:
            self._drop_upstream()
        self._finish(False)

    # -- answers keyproxy gives itself -------------------------------------------
    def send_error(self, deny: Deny) -> None:
        if self.done:
            return
        if not self.body_complete:
            self.keep_alive = False  # unread body bytes would be taken for the next request
        ctx = self.ctx
        limit = ctx.limit if ctx is not None else None
        extra = rate_limit_headers(limit)
        extra += self.conn.cors_headers(self)
        self.answer = HEAD_WRITTEN
        self.status = deny.status
        self.reason = deny.code
        answer = error_response(
            deny,
            self.request_id,
            extra + self.conn.connection_header(self),
            head_only=self.method == "HEAD",
        )
        self.sent += len(answer)
        self.conn.write(answer)
        self._finish(self.keep_alive)

    def send_reply(self, reply: Reply) -> None:
        """An answer keyproxy gives itself (a CORS preflight): no body, no upstream."""
        if self.done:
            return
        if not self.body_complete:
            self.keep_alive = False
        self.answer = HEAD_WRITTEN
        self.status = reply.status
        answer = (
            b"HTTP/1.1 %d %s\r\n" % (reply.status, reason(reply.status))
            + reply.headers
            + b"X-Request-Id: "
            + self.request_id.encode()
            + b"\r\n"
            + self.conn.connection_header(self)
            + b"\r\n"
        )
        self.sent += len(answer)
        self.conn.write(answer)
        self._finish(self.keep_alive)

    def _drop_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()
            if self.pool is not None:
                self.pool.release(upstream, False)

    def abandon(self, deny: Deny) -> None:
        """The request cannot complete (its stream broke or stalled): answer `deny` if
        nothing was answered yet, else cut the connection so the answer looks truncated."""
        if self.done:
            return
        self.keep_alive = False
        self.body_wait = False
        if self.upstream is not None:
            self._drop_upstream()
        if self.answer != NOT_STARTED:
            self.conn.abort()
            self._finish(False)
        else:
            self.send_error(deny)

    def _finish(self, keep_alive: bool) -> None:
        if self.done:
            return
        self.done = True
        if self.route_slot is not None and self.route_slots is not None:
            self.route_slots.release(self.route_slot)
            self.route_slot = None
        self.flush()  # before the connection may close or start the next exchange
        self.conn.resume_reading(UPSTREAM_BACKPRESSURE)
        self.conn.exchange_done(self, keep_alive)  # also where the request is counted
