"""One request's trip upstream and back (SPEC §3 step 9).

An `Exchange` is created by the server when a request's head has been
parsed. If the pipeline allows it, `Exchange.proxy` sends a rewritten head
upstream and streams the body both ways: request body chunks are written to
the upstream socket as they arrive, response body chunks to the client as
they arrive, with flow control in both directions and nothing buffered beyond
the sockets' own limits.

What is rewritten, and why, is decided once per configuration snapshot in
`ForwardPlan`, so the per-request work is a loop over the headers.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import TYPE_CHECKING
from urllib.parse import quote

from keyproxy.checks.route import METHOD_OVERRIDE_HEADERS, URL_OVERRIDE_HEADERS
from keyproxy.config.model import Config, KeyType
from keyproxy.policy.clientip import peer_is_trusted
from keyproxy.policy.credentials import strip_query_param
from keyproxy.policy.permissions import key_roles
from keyproxy.ratelimit import LimitResult
from keyproxy.request import Deny, Reply, RequestContext
from keyproxy.response.cors import single_header, strip_upstream_cors
from keyproxy.responses import (
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    OriginRewriter,
    SecretScrubber,
    error_response,
    payload_too_large,
    reason,
)
from keyproxy.upstream import HOP_BY_HOP, UpstreamConnection, UpstreamPool, UpstreamUnavailable

if TYPE_CHECKING:
    from keyproxy.server import ClientConnection

#: Request headers that could speak for keyproxy or change what was authorised.
#: Every `X-Forwarded-*` is dropped too (see `FORWARDED_PREFIX`); names holding `_`
#: never get this far (see `ClientConnection.on_header`).
REQUEST_DROP = HOP_BY_HOP | {
    b"host",
    b"expect",
    b"x-api-key",
    b"authorization",
    b"forwarded",
    b"x-real-ip",
    b"x-client-ip",
    b"client-ip",
    b"true-client-ip",
    b"x-cluster-client-ip",
    b"cf-connecting-ip",
    b"fastly-client-ip",
    b"x-original-uri",
    b"x-request-id",
    *(name.encode() for name in URL_OVERRIDE_HEADERS),
}
#: X-Forwarded-For, -Proto, -Host, -Port, -Ssl, -Scheme, -Uri ...: frameworks trust
#: each of them for the client address, the scheme or the path.
FORWARDED_PREFIX = b"x-forwarded-"
METHOD_OVERRIDE = frozenset(name.encode() for name in METHOD_OVERRIDE_HEADERS)

NO_BODY, RAW, CHUNKED = 0, 1, 2
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Request body buffered while the decision runs; past it the client is paused.
BODY_BUFFER_LIMIT = 256 * 1024
#: A request body that completes within this many bytes is received whole before an
#: upstream connection is taken: a client trickling a small body holds only its own
#: connection (bounded by `body_timeout`), never one of the upstream pool's.
BODY_WAIT_LIMIT = 64 * 1024
ROUTE_BUSY = Deny(
    503,
    "ROUTE_BUSY",
    "too many requests to this route are in progress; retry shortly",
    (("Retry-After", "1"),),
)
#: Requests that may be sent again when a reused socket turns out to be dead.
REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
#: Why client reading may be paused: the upstream cannot take the request body faster.
UPSTREAM_BACKPRESSURE = object()


#: RFC 3986 host[:port] as a Host header may carry it: a reg-name restricted to the
#: characters DNS names and IPv4 addresses use (no sub-delims, no percent-escapes:
#: no resolvable name has them, and a `,` would read as a list downstream), or an
#: IPv6 literal in brackets; an optional port of digits.
_HOST_HEADER = re.compile(
    rb"(?:([A-Za-z0-9._~-]{1,253})|\[([0-9A-Fa-f:.]{2,45})\])(?::([0-9]{1,5}))?"
)


@functools.lru_cache(maxsize=1024)
def valid_host(value: bytes) -> bool:
    """Whether a client's Host is a plain host[:port], fit to pass on as X-Forwarded-Host.

    Upstream frameworks build absolute URLs (redirects, password-reset links)
    from X-Forwarded-Host, so anything else is dropped rather than passed on.
    """
    match = _HOST_HEADER.fullmatch(value)
    if match is None:
        return False
    name, v6, port = match.groups()
    if port is not None and int(port) > 65535:
        return False
    if name is not None:
        return not name.startswith(b".") and b".." not in name
    try:
        ipaddress.IPv6Address(v6.decode("ascii"))
    except ValueError:
        return False
    return True


class ForwardPlan:
    """Everything about forwarding that depends only on the configuration."""

    def __init__(self, config: Config) -> None:
        up = config.upstream
        self.base_path = up.base_path
        self.max_body = config.server.max_body
        self.timeout = up.timeout
        self.trusted_proxies = config.server.trusted_proxies
        self.query_param = config.server.query_param
        self.host_line = b"Host: " + up.host_header.encode("idna") + b"\r\n"
        injected = [f"{n}: {v}\r\n".encode() for n, v in up.inject_headers]
        if up.inject_basic is not None:
            import base64

            pair = f"{up.inject_basic[0]}:{up.inject_basic[1]}".encode()
            injected.append(b"Authorization: Basic " + base64.b64encode(pair) + b"\r\n")
        self.inject_block = b"".join(injected)
        self.request_drop = REQUEST_DROP | {n.lower().encode() for n, _ in up.inject_headers}
        # Identity headers are keyproxy's word: a client's copy is dropped in any case.
        self.identity_headers = up.identity_headers
        self.request_drop |= {n.lower().encode() for _, n in up.identity_headers}
        self.request_drop_no_override = self.request_drop | METHOD_OVERRIDE
        self.inject_query = "&".join(
            f"{quote(n, safe='')}={quote(v, safe='')}" for n, v in up.inject_query
        )
        self.inject_query_names = tuple(n for n, _ in up.inject_query)
        self.origin = OriginRewriter(up.scheme, up.host, up.port, up.base_path)
        self.scrubber = SecretScrubber(up.secrets, up.inject_basic, self.origin)

    def peer_is_trusted(self, peer: str) -> bool:
        """Whether this peer's X-Forwarded-For/-Proto are kept (the client address's rule)."""
        return peer_is_trusted(peer, self.trusted_proxies)

    def upstream_target(self, ctx: RequestContext) -> str:
        target = ctx.target
        assert target is not None
        query = target.query
        if query and ctx.credential_source == "query":
            query = strip_query_param(query, self.query_param)
        if ctx.owner_filter is not None:  # a self-only list: only the caller's records
            query = f"{query}&{ctx.owner_filter}" if query else ctx.owner_filter
        if self.inject_query:
            for name in self.inject_query_names:
                if query:
                    query = strip_query_param(query, name)
            query = f"{query}&{self.inject_query}" if query else self.inject_query
        path = self.base_path + target.path
        return f"{path}?{query}" if query else path

    def rewrite_location(self, value: bytes) -> bytes:
        """Redirects to the upstream's origin become relative ones through the proxy.

        Every spelling a browser reads as that origin (scheme-relative `//host`,
        `/\\host`, the default port written out ...), and never into `//host/...`
        or `/\\host/...`, which browsers read as another origin (see `OriginRewriter`).
        """
        return self.origin.rewrite_location(value)


def identity_block(ctx: RequestContext, names: tuple[tuple[str, str], ...]) -> bytes:
    """`upstream.identity_headers`: who calls, as keyproxy established it.

    A user id is printable but may be non-ASCII: it is sent percent-encoded (UTF-8)
    where needed, so a header value never carries bytes a backend could misread.
    """
    lines = []
    for kind, name in names:
        if kind == "key_id":
            value = ctx.key.id if ctx.key is not None else ""
        elif kind == "user":
            value = ctx.user or ""
            if not value.isascii() or "%" in value:
                value = quote(value, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
        else:
            roles = ctx.roles
            if not roles and ctx.key is not None:  # step 7 is off: the same rule, here
                roles = key_roles(ctx.key.roles, ctx.key.type is KeyType.ADMIN)
                roles = tuple(dict.fromkeys(roles + ctx.token_roles))
            value = ",".join(roles)
        if value:
            lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode()


def rate_limit_headers(limit: LimitResult | None) -> bytes:
    if limit is None:
        return b""
    out = b""
    if limit.limit is not None:
        out += (
            b"X-RateLimit-Limit: %d\r\nX-RateLimit-Remaining: %d\r\nX-RateLimit-Reset: %d\r\n"
        ) % (
            limit.limit,
            limit.remaining or 0,
            int(-(-(limit.reset or 0) // 1)),
        )
    if limit.quota is not None:
        out += b"X-Quota-Limit: %d\r\nX-Quota-Remaining: %d\r\n" % (
            limit.quota,
            limit.quota_remaining or 0,
        )
        if limit.quota_reset is not None:  # a quota that refills: when it does
            out += b"X-Quota-Reset: %d\r\n" % -(-limit.quota_reset // 1)
    return out


class Exchange:
    """One request/response pair on a client connection."""

    __slots__ = (
        "body_buffered",
        "body_chunks",
        "body_complete",
        "body_received",
        "body_wait",
        "chunked",
        "conn",
        "connection_tokens",
        "content_length",
        "ctx",
        "done",
        "early_deny",
        "expect_continue",
        "forwarding",
        "head_sent",
        "head_written",
        "headers",
        "http11",
        "keep_alive",
        "last_activity",
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
        "sent",
        "started",
        "status",
        "target",
        "too_large",
        "up_pending",
        "upstream",
        "upstream_started",
    )

    def __init__(
        self,
        conn: ClientConnection,
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
        self.body_chunks: list[bytes] = []
        self.body_buffered = 0
        self.body_received = 0
        self.body_complete = False
        self.too_large = False
        self.head_sent = False  # a response head was produced (maybe still in `out`)
        self.head_written = False  # ... and handed to the client's socket
        self.mode = NO_BODY
        #: Response bytes produced while handling one upstream read, written with one
        #: writev when that read is done: head and body of a small response cost one syscall.
        self.out: list[bytes] = []
        self.upstream: UpstreamConnection | None = None
        self.pool: UpstreamPool | None = None
        self.plan: ForwardPlan | None = None
        self.ctx: RequestContext | None = None
        self.request_head = b""
        self.forwarding = False  # the decision allowed it and forwarding has begun
        self.reused = False  # the upstream socket had served an earlier exchange
        self.retried = False
        self.done = False  # answered (or abandoned); the connection has been told
        self.last_activity = 0.0
        self.body_wait = False  # decided, waiting for a small body to complete
        self.up_pending: list[bytes] = []  # request body read this turn, for one upstream write
        self.route_slot: str | None = None  # counted against its route's max_concurrency
        # For the access log and the metrics (keyproxy.observe), reported once by `_finish`.
        self.started = conn.loop.time()
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
            upstream.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))  # type: ignore[union-attr]
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
        if self.forwarding and not self.done:
            if self.head_sent:
                self.conn.abort()
                self._finish(False)
            else:
                self.send_error(payload_too_large(max_body))

    # -- the decision said yes: go upstream ----------------------------------
    def forward(self, ctx: RequestContext, plan: ForwardPlan, pool: UpstreamPool) -> None:
        """Send the request upstream; the answer arrives through the listener callbacks.

        With an idle pooled connection at hand this runs to the write without
        suspending; only opening a connection (or waiting for a free one) needs
        a task.
        """
        self.ctx = ctx
        self.plan = plan
        self.pool = pool
        self.forwarding = True
        if self.too_large or (
            self.content_length is not None and self.content_length > plan.max_body
        ):
            self.send_error(payload_too_large(plan.max_body))
            return
        route = ctx.route
        if route is not None and route.max_concurrency is not None:
            inflight = self.conn.proxy.route_inflight
            busy = inflight.get(route.match, 0)
            if busy >= route.max_concurrency:
                self.conn.proxy.stats.route_busy += 1
                self.send_error(ROUTE_BUSY)
                return
            inflight[route.match] = busy + 1
            self.route_slot = route.match
        if self.expect_continue and not self.body_complete:
            self.conn.write(CONTINUE_100)
        self.request_head = self._request_head(ctx, plan)
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

    def _send(self, upstream: UpstreamConnection) -> None:
        self.upstream = upstream
        self.reused = upstream.uses > 0
        self.last_activity = self.upstream_started = self.conn.loop.time()
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
            upstream.transport.writelines(parts)  # type: ignore[union-attr]

    def _request_head(self, ctx: RequestContext, plan: ForwardPlan) -> bytes:
        route = ctx.route
        drop = (
            plan.request_drop
            if route is not None and route.allow_method_override
            else plan.request_drop_no_override
        )
        tokens = self.connection_tokens
        parts = [f"{ctx.method} {plan.upstream_target(ctx)} HTTP/1.1\r\n".encode(), plan.host_line]
        append = parts.append
        host = b""
        prior_xff: list[bytes] = []
        proto = b"http"
        trusted = plan.trusted_proxies is not None and plan.peer_is_trusted(ctx.peer_ip)
        for name, value in self.raw_headers:
            lname = name.lower()
            if lname in drop or lname in tokens or lname.startswith(FORWARDED_PREFIX):
                if lname == b"host":
                    host = value
                elif trusted:
                    if lname == b"x-forwarded-for":
                        prior_xff.append(value)
                    elif lname == b"x-forwarded-proto" and value.lower() in (b"http", b"https"):
                        proto = value.lower()
                continue
            append(name + b": " + value + b"\r\n")
        peer = ctx.peer_ip.encode()
        xff = b", ".join([*prior_xff, peer]) if prior_xff else peer
        append(b"X-Forwarded-For: " + xff + b"\r\nX-Forwarded-Proto: " + proto + b"\r\n")
        if host and valid_host(host):
            append(b"X-Forwarded-Host: " + host + b"\r\n")
        append(b"X-Request-Id: " + self.request_id.encode() + b"\r\n")
        if plan.identity_headers:
            append(identity_block(ctx, plan.identity_headers))
        append(plan.inject_block)
        if self.chunked:
            append(b"Transfer-Encoding: chunked\r\n\r\n")
        elif self.content_length is not None:
            append(b"Content-Length: %d\r\n\r\n" % self.content_length)
        else:
            append(b"\r\n")
        return b"".join(parts)

    # -- ResponseListener: events from the upstream connection ----------------
    def on_response_head(
        self, status: int, lines: list[bytes], length: bytes | None, location: bytes | None
    ) -> None:
        plan = self.plan
        assert plan is not None and self.ctx is not None
        cors = self.ctx.config.cors
        if cors is not None:
            lines = strip_upstream_cors(lines)
            lines.append(cors.response_headers(single_header(self.headers, "origin")))
        block = b"".join(lines)
        if location is not None:
            block += b"Location: " + plan.rewrite_location(location) + b"\r\n"
        if plan.scrubber.found_in(block):
            block = plan.scrubber.scrub(block)
        if self.method == "HEAD" or status == 204 or status == 304:
            mode = NO_BODY
            framing = b"Content-Length: " + length + b"\r\n" if length and status != 204 else b""
        elif length is not None:
            mode = RAW
            framing = b"Content-Length: " + length + b"\r\n"
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
        self.head_sent = True
        self.status = status
        self.out.append(
            b"HTTP/1.1 %d %s\r\n" % (status, reason(status))
            + block
            + b"X-Request-Id: "
            + self.request_id.encode()
            + b"\r\n"
            + rate_limit_headers(self.ctx.limit)
            + framing
            + self.conn.connection_header(self)
            + b"\r\n"
        )
        if mode is NO_BODY and self.method == "HEAD" and self.upstream is not None:
            self.upstream.end_head_only()

    def on_response_body(self, data: bytes) -> None:
        if self.mode == CHUNKED:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        elif self.mode == RAW:
            self.out.append(data)

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
            self.head_written = self.head_sent
            self.last_activity = self.conn.loop.time()

    def on_response_end(self, reusable: bool) -> None:
        if self.mode == CHUNKED:
            self.out.append(b"0\r\n\r\n")
        upstream, self.upstream = self.upstream, None
        if upstream is not None and self.pool is not None:
            self.pool.release(upstream, reusable and self.body_complete and not self.too_large)
        self._finish(self.keep_alive)

    def on_upstream_error(self, conn: UpstreamConnection, exc: BaseException) -> None:
        self.upstream = None
        if self.pool is not None:
            self.pool.release(conn, False)
        if self.done:
            return
        if self.head_sent and not self.head_written:
            # Broken before any of the answer left: the client can still get a clean 502.
            self.out = []
            self.head_sent = False
        if self.head_sent:
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
        if self.head_sent:
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
        cors = (ctx.config if ctx is not None else self.conn.proxy.serving.config).cors
        if cors is not None:
            extra += cors.response_headers(single_header(self.headers, "origin"))
        self.head_sent = True
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
        self.head_sent = True
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
        if self.head_sent:
            self.conn.abort()
            self._finish(False)
        else:
            self.send_error(deny)

    def _finish(self, keep_alive: bool) -> None:
        if self.done:
            return
        self.done = True
        if self.route_slot is not None:
            inflight = self.conn.proxy.route_inflight
            left = inflight[self.route_slot] - 1
            if left:
                inflight[self.route_slot] = left
            else:
                del inflight[self.route_slot]
            self.route_slot = None
        self.flush()  # before the connection may close or start the next exchange
        self.conn.resume_reading(UPSTREAM_BACKPRESSURE)
        self.conn.exchange_done(self, keep_alive)
        self.conn.proxy.observer.exchange_finished(self)  # the one place a request is counted
