"""The public listener: client connections, the request loop and the process lifecycle.

Each client socket is an `asyncio.Protocol` whose bytes are parsed by
httptools (llhttp). A request becomes an `Exchange` as soon as its head is
parsed; one coroutine per connection takes exchanges in order (HTTP/1.1
pipelining answers in order), runs the pipeline against the configuration
snapshot current at that moment, and either answers with a JSON error or
hands the exchange to the forwarder.

Timeouts (slow headers, idle keep-alive, a silent upstream) are checked by one
periodic tick per connection instead of arming and cancelling timers on every
request.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass

import httptools

from keyproxy.checks import Pipeline, build_checks
from keyproxy.checks.limits import RateLimitCheck
from keyproxy.config import Config, ConfigError
from keyproxy.config.reload import ConfigHolder
from keyproxy.forward import Exchange, ForwardPlan
from keyproxy.observability import log_event
from keyproxy.observe import Observer
from keyproxy.ratelimit import open_limiter
from keyproxy.request import Deny, Headers, RequestContext
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
INTERNAL_ERROR = Deny(500, "INTERNAL_ERROR", "keyproxy failed on this request")
EXPECTATION_FAILED = Deny(417, "EXPECTATION_FAILED", "only 'Expect: 100-continue' is supported")
HOST_REQUIRED = Deny(400, "BAD_REQUEST", "HTTP/1.1 requests need exactly one Host header")


class ListenError(Exception):
    """A listener could not be opened; the message says which setting to change."""


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
        self.head_started = self.idle_since = self.loop.time()
        transport.set_write_buffer_limits(high=256 * 1024)  # type: ignore[attr-defined]
        self.proxy.connections.add(self)
        self.tick = self.loop.call_later(self.proxy.tick_interval, self._on_tick)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse_now(UPGRADE_NOT_ALLOWED)
            return
        except httptools.HttpParserError as exc:
            # httptools wraps an exception raised in a callback; ours says why.
            cause = exc.__context__
            self._refuse_now(cause.deny if isinstance(cause, _HeadRefused) else BAD_REQUEST)
            return
        if self.in_head and self.head_begun:
            # A head still incomplete after this chunk: bound what llhttp and
            # httptools may be accumulating for it.
            self.head_bytes += len(data)
            if self.head_bytes > self.max_header_size:
                self._refuse_now(HEADERS_TOO_LARGE)
                return
        if self.active is None and self.queue:
            # After the whole read is parsed, so a refused request whose body came
            # in the same packet is known to be complete and the connection can stay.
            self._dispatch()

    def eof_received(self) -> bool:
        """The client will send nothing more. Complete requests still get their answers
        (HTTP/1.1 clients may half-close, as `nc -N` does); a request cut short cannot."""
        if self.parsing is not None or (self.active is None and not self.queue):
            return False  # nothing (complete) to answer: let the transport close
        self.peer_done = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
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
        self.head_begun = True
        self.head_started = self.loop.time()
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
        self.queue.append(ex)
        if len(self.queue) > MAX_QUEUED:
            self.pause_reading(self.queue)

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.parsing.feed_body(body)

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
                    self.resume_reading(queue)
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
        if not keep_alive or self.proxy.draining or (self.peer_done and not self.queue):
            self.close()
            return
        self.idle_since = self.loop.time()
        if self.queue:
            self._dispatch()

    def _on_tick(self) -> None:
        if self.closed:
            return
        now = self.loop.time()
        settings = self.proxy.serving.config.server
        if self.active is not None:
            self.active.check_timeout(now)
        elif not self.queue:
            if self.head_begun:  # a request has started but its head is not complete
                if now - self.head_started > settings.header_timeout:
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
            self.transport.resume_reading()

    def close(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.lingering:
            return
        if self.parsing is not None and not self.closed:
            # A request body is still arriving: finish writing, stop answering, drain a while.
            self.lingering = True
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
        self.request_ids = RequestIds()
        self.draining = False
        config = holder.config
        self.checks = build_checks(open_limiter(config.rate_limits))
        self.pipeline = Pipeline(self.checks)
        #: The rate-limit step; its limiter is swapped when `rate_limits` changes.
        self.limits: RateLimitCheck = next(
            c.run for c in self.checks if isinstance(c.run, RateLimitCheck)
        )
        self.serving = Serving(config, ForwardPlan(config), UpstreamPool(config.upstream, loop))
        self.tick_interval = self._tick_interval(config)
        self.observer = Observer(config, loop)
        self.observer.metrics.reloads = holder.reloads
        holder.subscribe(self._on_config)

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
        self.observer.on_config(config)

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
        for conn in list(self.connections):
            conn.abort()
        self.serving.pool.close()
        await self.limits.limiter.aclose()


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


async def serve(
    holder: ConfigHolder,
    host: str | None = None,
    port: int | None = None,
    reuse_port: bool = False,
    ready: asyncio.Future | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain. `ready` receives the bound (host, port)."""
    from keyproxy.admin import start_admin

    loop = asyncio.get_running_loop()
    config = holder.config
    proxy = ProxyServer(holder, loop)
    freeze_long_lived()
    listen_host = host or config.server.listen.host
    listen_port = config.server.listen.port if port is None else port
    server = await loop.create_server(
        lambda: ClientConnection(proxy),
        listen_host,
        listen_port,
        reuse_port=reuse_port or None,
        backlog=2048,
    )
    bound = server.sockets[0].getsockname()
    try:
        admin_runner = await start_admin(proxy, reuse_port=reuse_port)
    except OSError as exc:
        server.close()
        raise ListenError(
            f"cannot listen on the admin address {config.server.admin_listen}: "
            f"{exc.strerror or exc} (another keyproxy?); set server.admin_listen "
            f"in {config.source or 'the configuration'} to a free port, "
            'e.g. admin_listen: "127.0.0.1:9902"'
        ) from None
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
        admin=f"http://{config.server.admin_listen}",
        config=config.summary(),
        pid=os.getpid(),
    )
    if reuse_port and config.rate_limits.store == "memory":
        log_event(
            "warning",
            message="rate limits and quotas are counted per worker with the memory store; "
            "use rate_limits.store: redis://... to share them",
        )
    if ready is not None and not ready.done():
        ready.set_result((bound[0], bound[1]))
    await stop.wait()
    log_event("draining", connections=len(proxy.connections))
    server.close()
    watcher.cancel()
    await proxy.drain(config.server.drain_timeout)
    await admin_runner.cleanup()
    proxy.observer.close()
    log_event("stopped")
    return 0


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run(config_path: str, host: str | None, port: int | None, workers: int = 1) -> int:
    """Run in this process, or supervise `workers` processes sharing the port."""
    if workers > 1:
        from keyproxy.workers import supervise

        return supervise(config_path, host, port, workers)
    try:
        holder = ConfigHolder.load(config_path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    install_uvloop()
    reuse = os.environ.get("KEYPROXY_REUSE_PORT") == "1"
    try:
        return asyncio.run(serve(holder, host, port, reuse_port=reuse))
    except ListenError as exc:
        print(f"keyproxy: {exc}", file=sys.stderr)
        return 1
