"""The public listener: client connections, the request loop and the process lifecycle.

Each client socket is an `asyncio.Protocol` whose bytes are parsed by
httptools (llhttp). A request becomes an `Exchange` as soon as its head is
parsed; one coroutine per connection takes exchanges in order (HTTP/1.1
pipelining answers in order), runs the pipeline against the configuration
snapshot current at that moment, and either answers with a JSON error or
hands the exchange to the forwarder.

Timeouts (slow headers, slow bodies, idle keep-alive, a silent upstream) are
checked by one periodic tick per connection instead of arming and cancelling
timers on every request. The head timeout runs from accept: a connection that
never sends a byte is closed after `header_timeout`, not `keepalive_timeout`.

Connections are capped in total and per peer address, below the process's
file-descriptor limit so that upstream sockets and the admin listener always
find descriptors; the excess gets a short 503 and is closed at once.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import resource
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass

import httptools

from keyproxy.checks import Pipeline, build_checks
from keyproxy.checks.limits import RateLimitCheck
from keyproxy.checks.permissions import OwnershipCheck
from keyproxy.config import Config, ConfigError
from keyproxy.config.model import ServerSettings, Upstream
from keyproxy.config.reload import ConfigHolder
from keyproxy.forward import Exchange, ForwardPlan
from keyproxy.jwks import JwksCache
from keyproxy.observability import log_event
from keyproxy.observe import Observer
from keyproxy.ratelimit import open_limiter
from keyproxy.request import Deny, Headers, Reply, RequestContext
from keyproxy.responses import (
    BAD_REQUEST,
    HEADERS_TOO_LARGE,
    REQUEST_TIMEOUT,
    UPGRADE_NOT_ALLOWED,
    error_response,
)
from keyproxy.upstream import UpstreamPool

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
#: Descriptors kept out of the client connection budget beyond the upstream pool:
#: the admin listener and its probes, Redis, DNS, config and log files.
FD_RESERVE = 64
#: At most one log line about refused connections (or failed accepts) this often.
REFUSAL_LOG_INTERVAL = 5.0
INTERNAL_ERROR = Deny(500, "INTERNAL_ERROR", "keyproxy failed on this request")
EXPECTATION_FAILED = Deny(417, "EXPECTATION_FAILED", "only 'Expect: 100-continue' is supported")
HOST_REQUIRED = Deny(400, "BAD_REQUEST", "HTTP/1.1 requests need exactly one Host header")
TOO_MANY_CONNECTIONS = Deny(
    503, "TOO_MANY_CONNECTIONS", "keyproxy has too many open connections; retry shortly"
)
CHUNKS_TOO_SMALL = Deny(
    400, "CHUNKS_TOO_SMALL", "the chunked request body is cut into too many tiny chunks"
)


def connection_limits(server: ServerSettings, upstream: Upstream, fd_limit: int) -> tuple[int, int]:
    """(total, per peer address) client connections for a process allowed `fd_limit` descriptors.

    Unset limits are sized so that, with every client slot taken, the upstream
    pool and FD_RESERVE still have descriptors: 80% of the limit, or less when
    the pool is large. One address gets a tenth of the total (at least 32).
    """
    auto = max(16, min(fd_limit * 8 // 10, fd_limit - upstream.max_connections - FD_RESERVE))
    total = server.max_connections or auto
    per_ip = server.max_connections_per_ip or max(32, total // 10)
    return total, min(per_ip, total)


def fd_soft_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY and soft > 0 else 1 << 20


class ServerStats:
    """Counters for refusals the server makes on its own (read by the metrics endpoint)."""

    __slots__ = ("accept_errors", "connections_refused", "drain_aborted", "route_busy")

    def __init__(self) -> None:
        self.connections_refused = 0  # over max_connections or max_connections_per_ip
        self.accept_errors = 0  # accept() failed, e.g. out of file descriptors
        self.route_busy = 0  # 503 ROUTE_BUSY: a route's max_concurrency was reached
        self.drain_aborted = 0  # requests cut at drain_timeout


class RequestIds:
    """Unique, cheap request ids: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):08x}"


@dataclass(frozen=True, slots=True)
class Serving:
    """The configuration snapshot and what is derived from it for forwarding."""

    config: Config
    plan: ForwardPlan
    pool: UpstreamPool


class ClientConnection(asyncio.Protocol):
    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
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
        self.head_bytes = 0  # bytes received while the head was incomplete
        self.url_parts: list[bytes] = []
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.lowered: list[tuple[str, str]] = []  # the same headers, as the checks read them
        self.content_length: int | None = None
        self.chunked = False
        self.expect: bytes | None = None
        self.hosts = 0
        self.connection_tokens: frozenset[bytes] = frozenset()
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
            # A head still incomplete after this chunk: bound what llhttp and
            # httptools may be accumulating for it.
            self.head_bytes += len(data)
            if self.head_bytes > self.max_header_size:
                self._parse_failed(HEADERS_TOO_LARGE, None)
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
        self.head_bytes = 0
        self.url_parts = []
        self.raw_headers = []
        self.lowered = []
        self.content_length = None
        self.chunked = False
        self.expect = None
        self.hosts = 0
        self.connection_tokens = frozenset()

    def on_url(self, url: bytes) -> None:
        self.url_parts.append(url)
        self.head_bytes += len(url)
        if self.head_bytes > self.max_header_size:
            raise _HeadRefused(HEADERS_TOO_LARGE)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a chunked body's trailer: never read, never forwarded
        headers = self.raw_headers
        if len(headers) >= MAX_HEADERS:
            raise _HeadRefused(HEADERS_TOO_LARGE)
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.max_header_size:
            raise _HeadRefused(HEADERS_TOO_LARGE)
        if b"_" in name:
            # CGI, WSGI, Rack and Puma read `X-API_Key` or `X-Forwarded_For` as the
            # hyphenated header, so no list of names to drop could cover every mix of
            # the two. Such headers are ignored altogether, neither decided on nor
            # forwarded, as nginx does by default (`underscores_in_headers off`).
            return
        headers.append((name, value))
        lname = name.lower()
        self.lowered.append((lname.decode("latin-1"), value.decode("latin-1")))
        if lname == b"content-length":
            self.content_length = int(value)  # llhttp has validated it
        elif lname == b"transfer-encoding":
            if self.chunked or value.strip().lower() != b"chunked":
                # gzip and friends would be forwarded undeclared once the chunking is
                # undone; only plain chunked framing crosses the proxy (as nginx asks).
                raise _HeadRefused(BAD_REQUEST)
            self.chunked = True
        elif lname == b"host":
            self.hosts += 1
        elif lname == b"expect":
            self.expect = value.lower()
        elif lname == b"connection":
            self.connection_tokens = self.connection_tokens | frozenset(
                t.strip() for t in value.lower().split(b",")
            )

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_begun = False
        parser = self.parser
        http11 = parser.get_http_version() == "1.1"
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
        if self.expect is not None:
            ex.expect_continue = self.expect == b"100-continue"
            if not ex.expect_continue:
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

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            if ex.chunked:
                pieces = self.body_pieces = self.body_pieces + 1
                if pieces > FREE_CHUNKS and ex.body_received < pieces * MIN_AVERAGE_CHUNK:
                    raise _HeadRefused(CHUNKS_TOO_SMALL)
            ex.feed_body(body)

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
        log_event("internal_error", request_id=ex.request_id, error=type(exc).__name__)
        if ex.head_sent:
            self.abort()
        else:
            ex.keep_alive = False
            ex.send_error(INTERNAL_ERROR)

    def exchange_done(self, ex: Exchange, keep_alive: bool) -> None:
        if self.active is ex:
            self.active = None
        if self.closed:
            return
        if not keep_alive or self.proxy.draining:
            self.close()
            return
        if not self.queue:
            if self.pending_error is not None:  # everything before the bad request is answered
                self._refuse_now(self.pending_error)
                return
            if self.peer_done:
                self.close()
                return
        self.idle_since = self.loop.time()
        if self.queue:
            self._dispatch()

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

    # -- writing ----------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        if not self.closed:
            self.transport.writelines(parts)  # type: ignore[union-attr]

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
            transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.abort)
            return
        transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _refuse_now(self, deny: Deny) -> None:
        """A request that cannot even be parsed: answer if nothing else is under way, then close."""
        if self.active is None and not self.closed:
            rid = self.proxy.request_ids.next()
            self.write(error_response(deny, rid, b"Connection: close\r\n"))
        self.queue.clear()
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _HeadRefused(Exception):
    """Raised inside a parser callback to stop parsing a head keyproxy will not accept."""

    def __init__(self, deny: Deny) -> None:
        self.deny = deny


class ProxyServer:
    """State shared by every connection of one process."""

    def __init__(self, holder: ConfigHolder, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.holder = holder
        self.connections: set[ClientConnection] = set()
        self.per_ip: dict[str, int] = {}  # open connections by peer address
        #: Requests in flight upstream per route with `max_concurrency`, by route text.
        self.route_inflight: dict[str, int] = {}
        self.stats = ServerStats()
        self.request_ids = RequestIds()
        self.draining = False
        self._refusals_logged = 0
        self._accept_errors_logged = 0
        self._refusal_log_at = self._accept_log_at = -REFUSAL_LOG_INTERVAL
        config = holder.config
        self.max_connections, self.max_per_ip = connection_limits(
            config.server, config.upstream, fd_soft_limit()
        )
        self._default_exception_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._on_loop_exception)
        self._warn_if_over_fd_limit(config)
        self.owners = OwnershipCheck()
        self._jwks: JwksCache | None = None
        self.checks = build_checks(open_limiter(config.rate_limits), self.owners)
        self.pipeline = Pipeline(self.checks)
        #: The rate-limit step; its limiter is swapped when `rate_limits` changes.
        self.limits: RateLimitCheck = next(
            c.run for c in self.checks if isinstance(c.run, RateLimitCheck)
        )
        self.serving = Serving(config, ForwardPlan(config), UpstreamPool(config.upstream, loop))
        self.tick_interval = self._tick_interval(config)
        self._start_jwks(config)
        self.observer = Observer(config, loop)
        self.observer.metrics.reloads = holder.reloads
        holder.subscribe(self._on_config)

    def _start_jwks(self, config: Config) -> None:
        """Keep the identity provider's keys fresh in the background, off the request path;
        a reload that drops or changes `jwks_url` stops fetching the old one."""
        users = config.users
        jwks = users.jwks if users is not None else None
        previous = self._jwks
        if previous is not None and previous is not jwks:
            previous.stop()
        self._jwks = jwks
        if jwks is not None:
            assert users is not None
            jwks.start(self.loop, users.settings.jwks_refresh)

    @staticmethod
    def _tick_interval(config: Config) -> float:
        s = config.server
        return max(0.05, min(1.0, config.upstream.timeout / 4, s.header_timeout / 4))

    def _on_config(self, config: Config) -> None:
        freeze_long_lived()
        old = self.serving
        pool = old.pool
        up = config.upstream
        # A ca_file is re-read on every reload (the pool's TLS context holds the old
        # bundle): after rotating the CA file in place, SIGHUP is enough.
        if (
            (up.scheme, up.host, up.port) != pool.endpoint
            or up.max_connections != pool.upstream.max_connections
            or (up.ca_file or pool.upstream.ca_file) is not None
        ):
            pool.close()
            pool = UpstreamPool(up, self.loop)
        new_limits, old_limits = config.rate_limits, old.config.rate_limits
        if (new_limits.store, new_limits.max_buckets, new_limits.timeout) != (
            old_limits.store,
            old_limits.max_buckets,
            old_limits.timeout,
        ):  # a new store; `on_store_error` alone is read per request and keeps the counters
            previous = self.limits.limiter
            self.limits.limiter = open_limiter(config.rate_limits)
            self.loop.create_task(previous.aclose())
        self.serving = Serving(config, ForwardPlan(config), pool)
        self.tick_interval = self._tick_interval(config)
        self.max_connections, self.max_per_ip = connection_limits(
            config.server, config.upstream, fd_soft_limit()
        )
        self._start_jwks(config)
        self.observer.on_config(config)

    def _warn_if_over_fd_limit(self, config: Config) -> None:
        """A `max_connections` set above what the descriptor limit allows would end in
        failed accepts rather than clean 503s: say so when serving starts."""
        fd_limit = fd_soft_limit()
        needed = self.max_connections + config.upstream.max_connections + FD_RESERVE
        if needed > fd_limit:
            log_event(
                "warning",
                message=f"server.max_connections ({self.max_connections}) + "
                f"upstream.max_connections ({config.upstream.max_connections}) + "
                f"{FD_RESERVE} reserved need {needed} file descriptors but the limit is "
                f"{fd_limit}: raise the limit (ulimit -n, LimitNOFILE=) or lower max_connections",
            )

    def connection_refused(self, peer_ip: str, held: int) -> None:
        """Count a connection refused at a limit; say so at most every few seconds."""
        self.stats.connections_refused += 1
        now = self.loop.time()
        if now - self._refusal_log_at >= REFUSAL_LOG_INTERVAL:
            refused = self.stats.connections_refused
            log_event(
                "connections_refused",
                refused=refused - self._refusals_logged,
                total_refused=refused,
                open=len(self.connections),
                max_connections=self.max_connections,
                max_connections_per_ip=self.max_per_ip,
                last_peer=peer_ip,
                last_peer_open=held,
            )
            self._refusal_log_at = now
            self._refusals_logged = refused

    def _on_loop_exception(
        self, loop: asyncio.AbstractEventLoop, context: dict[str, object]
    ) -> None:
        """Failed accepts (out of descriptors) are counted and logged at most every few
        seconds instead of once per attempt; anything else goes to the usual handler."""
        message = str(context.get("message", ""))
        if "accept" in message:
            self.stats.accept_errors += 1
            now = self.loop.time()
            if now - self._accept_log_at >= REFUSAL_LOG_INTERVAL:
                errors = self.stats.accept_errors
                exc = context.get("exception")
                log_event(
                    "accept_failed",
                    failures=errors - self._accept_errors_logged,
                    total_failures=errors,
                    error=type(exc).__name__ if exc is not None else message,
                    open=len(self.connections),
                    fd_limit=fd_soft_limit(),
                )
                self._accept_log_at = now
                self._accept_errors_logged = errors
            return
        if self._default_exception_handler is not None:
            self._default_exception_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    def start(self, conn: ClientConnection, ex: Exchange) -> None:
        """Decide, then answer or forward. Runs without suspending unless a check must wait."""
        if ex.early_deny is not None:
            ex.send_error(ex.early_deny)
            return
        serving = self.serving  # one snapshot for the whole request
        config = serving.config
        conn.max_body = config.server.max_body
        conn.max_header_size = config.server.max_header_size
        ctx = RequestContext(
            config,
            ex.method,
            ex.target,
            Headers.from_lowered(ex.headers),
            conn.peer_ip,
            time.time(),
            ex.request_id,
        )
        ex.ctx = ctx
        outcome = self.pipeline.decide(ctx)
        if outcome is None:
            ex.forward(ctx, serving.plan, serving.pool)
        elif outcome.__class__ is Deny:
            ex.send_error(outcome)  # type: ignore[arg-type]
        elif outcome.__class__ is Reply:
            ex.send_reply(outcome)  # type: ignore[arg-type]
        else:
            self.loop.create_task(self._decide_later(conn, ex, serving, outcome))  # type: ignore[arg-type]

    async def _decide_later(
        self,
        conn: ClientConnection,
        ex: Exchange,
        serving: Serving,
        pending: Awaitable[Deny | None],
    ) -> None:
        try:
            outcome = await pending
            if ex.done:
                return  # the client went away meanwhile
            assert ex.ctx is not None
            if outcome is None:
                ex.forward(ex.ctx, serving.plan, serving.pool)
            else:
                ex.send_error(outcome)
        except Exception as exc:
            conn.internal_error(ex, exc)

    async def drain(self, timeout: float) -> None:
        """Finish in-flight requests, close idle connections, give up after `timeout`."""
        self.draining = True
        for conn in list(self.connections):
            if conn.active is None and not conn.queue:
                conn.close()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.connections:
            aborted = sum((c.active is not None) + len(c.queue) for c in self.connections)
            self.stats.drain_aborted += aborted
            log_event(
                "drain_timeout",
                aborted_requests=aborted,
                connections=len(self.connections),
                drain_timeout=timeout,
            )
        for conn in list(self.connections):
            conn.abort()
        self.serving.pool.close()
        await self.limits.limiter.aclose()
        await self.owners.aclose()
        if self._jwks is not None:
            self._jwks.stop()


def freeze_long_lived() -> None:
    """Move the loaded configuration out of the cyclic collector's sight.

    A registry of 100,000 keys is a few hundred thousand objects that live until
    the next reload; every full collection would walk them all, pausing traffic.
    Frozen objects are still freed by reference counting when a reload drops them.
    """
    gc.collect()
    gc.freeze()


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # optional: keyproxy runs on the standard loop too
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@dataclass(frozen=True, slots=True)
class WorkerLink:
    """What a `serve --workers N` supervisor hands a worker: its sockets and a ready pipe."""

    listen_fds: list[int]
    admin_fds: list[int]
    ready_fd: int | None = None
    supervisor_pid: int | None = None


async def serve(
    holder: ConfigHolder,
    host: str | None = None,
    port: int | None = None,
    ready: asyncio.Future | None = None,
    sockets: list[socket.socket] | None = None,
    admin_sockets: list[socket.socket] | None = None,
    link: WorkerLink | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain. `ready` receives the bound (host, port).

    Without `sockets` the listeners are bound here (ListenError if taken).
    """
    from keyproxy.admin import start_admin
    from keyproxy.config.model import HostPort
    from keyproxy.listeners import BACKLOG, bind

    loop = asyncio.get_running_loop()
    config = holder.config
    if sockets is None:
        listen = config.server.listen
        sockets = bind(
            HostPort(host or listen.host, listen.port if port is None else port),
            "port",
            "server.listen or --port",
        )
    if admin_sockets is None:
        admin_sockets = bind(config.server.admin_listen, "admin port", "server.admin_listen")
    proxy = ProxyServer(holder, loop)
    freeze_long_lived()
    servers = [
        await loop.create_server(lambda: ClientConnection(proxy), sock=sock, backlog=BACKLOG)
        for sock in sockets
    ]
    bound = sockets[0].getsockname()
    admin_bound = admin_sockets[0].getsockname()
    admin_runner = await start_admin(proxy, admin_sockets)
    proxy.observer.start()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, holder.reload_soon)
    loop.add_signal_handler(signal.SIGUSR1, proxy.observer.reopen_access_log)
    watcher = loop.create_task(holder.watch())
    log_event(
        "listening",
        url=f"http://{_host_for_url(bound[0])}:{bound[1]}",
        admin=f"http://{_host_for_url(admin_bound[0])}:{admin_bound[1]}",
        config=config.summary(),
        pid=os.getpid(),
    )
    orphan_watch = None
    if link is not None:
        if config.rate_limits.store == "memory":
            log_event(
                "warning",
                message="rate limits and quotas are counted per worker with the memory store; "
                "use rate_limits.store: redis://... to share them",
            )
        if link.ready_fd is not None:
            os.write(link.ready_fd, b"1")  # the supervisor stops counting this start as a crash
            os.close(link.ready_fd)
        if link.supervisor_pid is not None:
            orphan_watch = loop.create_task(_stop_when_orphaned(link.supervisor_pid, stop))
    if ready is not None and not ready.done():
        ready.set_result((bound[0], bound[1]))
    await stop.wait()
    log_event("draining", connections=len(proxy.connections))
    for server in servers:
        server.close()
    watcher.cancel()
    if orphan_watch is not None:
        orphan_watch.cancel()
    await proxy.drain(config.server.drain_timeout)
    await admin_runner.cleanup()
    proxy.observer.close()
    log_event("stopped")
    return 0


async def _stop_when_orphaned(supervisor_pid: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (SIGKILL) drains and exits instead of holding the port."""
    while os.getppid() == supervisor_pid:
        await asyncio.sleep(1.0)
    log_event("supervisor_gone", supervisor_pid=supervisor_pid)
    stop.set()


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run(
    config_path: str,
    host: str | None,
    port: int | None,
    workers: int = 1,
    link: WorkerLink | None = None,
) -> int:
    """Run in this process, or supervise `workers` processes sharing the listening sockets.

    The sockets are bound here, before anything else starts, so a taken port is
    one line on stderr and a non-zero exit in both modes.
    """
    from keyproxy.config.model import HostPort
    from keyproxy.listeners import ListenError, bind, inherited, raise_fd_limit

    try:
        holder = ConfigHolder.load(config_path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    # Before binding, so the listeners' own descriptors count against the raised limit;
    # a worker inherits the supervisor's.
    fd_limits = raise_fd_limit() if link is None else None
    server = holder.config.server
    try:
        if link is not None:
            sockets, admin_sockets = inherited(link.listen_fds), inherited(link.admin_fds)
        else:
            listen = HostPort(
                host or server.listen.host, server.listen.port if port is None else port
            )
            sockets = bind(listen, "port", "server.listen or --port")
            try:
                admin_sockets = bind(
                    server.admin_listen,
                    "admin port",
                    f"server.admin_listen in {config_path} to a free port "
                    '(e.g. admin_listen: "127.0.0.1:9902")',
                )
            except ListenError:
                for sock in sockets:
                    sock.close()
                raise
    except ListenError as exc:
        print(f"keyproxy: {exc}", file=sys.stderr)
        return 1
    if fd_limits is not None:
        log_event("fd_limit", soft=fd_limits[0], hard=fd_limits[1])
    if workers > 1:
        from keyproxy.workers import supervise

        drain_timeout = server.drain_timeout
        # The supervisor only checked the file: the workers load their own copy, so a
        # large key list is not kept in memory once more for the supervisor's lifetime.
        del holder, server
        gc.collect()
        return supervise(config_path, sockets, admin_sockets, workers, drain_timeout)
    install_uvloop()
    return asyncio.run(serve(holder, sockets=sockets, admin_sockets=admin_sockets, link=link))
