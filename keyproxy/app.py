"""The one place that joins the decision and the transport.

`ProxyServer.start` runs the pipeline over a parsed request against the
configuration snapshot current at that moment: a `Deny` or a `Reply` is answered
locally, an allowed request gets its route's response chain and is forwarded.
`ProxyServer` also holds what every connection of the process shares: the
snapshot being served, the upstream pool, the connection limits and the
long-lived services (`keyproxy.services`), swapped explicitly on reload.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import resource
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from keyproxy.checks import Pipeline, build_checks
from keyproxy.checks.memo import DecisionMemo, memo_key
from keyproxy.config import Config
from keyproxy.config.model import ServerSettings, Upstream
from keyproxy.config.reload import ConfigHolder
from keyproxy.forward.plan import ForwardPlan
from keyproxy.observability import log_event
from keyproxy.policy.refusals import ROUTE_BUSY
from keyproxy.request import Deny, Headers, Reply, RequestContext
from keyproxy.response.body_links import CacheStoreHolder, join_lines
from keyproxy.response.cache import CachedResponse
from keyproxy.services import Services
from keyproxy.wire.client import ClientConnection
from keyproxy.wire.exchange import Exchange
from keyproxy.wire.outbox import Outbox
from keyproxy.wire.upstream import UpstreamPool

#: Descriptors kept out of the client connection budget beyond the upstream pool:
#: the admin listener and its probes, Redis, DNS, config and log files.
FD_RESERVE = 64
#: At most one log line about refused connections (or failed accepts) this often.
REFUSAL_LOG_INTERVAL = 5.0


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


class ProxyServer:
    """State shared by every connection of one process."""

    def __init__(self, holder: ConfigHolder, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: Every connection's writes of a turn, sent when the turn ends (see the module).
        self.outbox = Outbox(loop)
        self.holder = holder
        self.connections: set[ClientConnection] = set()
        self.per_ip: dict[str, int] = {}  # open connections by peer address
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
        self.services = Services(config, loop, holder.reloads)
        self.cache_stores = CacheStoreHolder(loop)  # the response cache's store, across reloads
        self.checks = build_checks(
            self.services.limits.limiter, self.services.owners, self.services.limits
        )
        self.pipeline = Pipeline(self.checks, DecisionMemo())
        #: Metrics and the access log (the services' own object, never replaced).
        self.observer = self.services.observer
        self.serving = Serving(
            config, self._plan(config), UpstreamPool(config.upstream, loop, self.outbox)
        )
        self.tick_interval = self._tick_interval(config)
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
            pool = UpstreamPool(up, self.loop, self.outbox)
        self.services.on_config(config, old.config)
        self.serving = Serving(config, self._plan(config), pool)
        self.tick_interval = self._tick_interval(config)
        self.max_connections, self.max_per_ip = connection_limits(
            config.server, config.upstream, fd_soft_limit()
        )

    def _plan(self, config: Config) -> ForwardPlan:
        """The snapshot's plan, with the response cache's store (opened, kept or replaced)."""
        store = self.cache_stores.update(config)
        metrics = self.observer.metrics
        return ForwardPlan(config, store, metrics.cache, metrics.fields_memo)

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
        if ex.content_length or ex.chunked:  # `Exchange.has_body`, without the call
            ctx.has_body = True
        key = ex.memo_key = memo_key(ex.method, ex.target, conn.peer_ip, ex.headers, ex.varying)
        outcome = self.pipeline.decide(ctx, key)
        if outcome is None:
            self._allow(ex, ctx, serving)
        elif outcome.__class__ is Deny:
            ex.send_error(outcome)
        elif outcome.__class__ is Reply:
            ex.allowed = True  # a preflight the CORS policy answers: an allow in logs and metrics
            ex.send_reply(outcome)
        else:  # a check must wait (Redis, the owner lookup): decide in a task
            pending: Awaitable[Deny | None] = outcome  # type: ignore[assignment]  # the rest
            self.loop.create_task(self._decide_later(conn, ex, serving, pending))

    def _allow(self, ex: Exchange, ctx: RequestContext, serving: Serving) -> None:
        """The decision said yes: a cache hit is served here, anything else forwarded."""
        plan = serving.plan
        ex.chain = plan.chain
        cache = plan.cache
        if cache is not None and cache.applies(ctx):
            found = cache.find(ctx)
            if isinstance(found, CachedResponse):
                self._serve_hit(ex, plan, found)
                return
            if found is not None:
                # A store that answers over the network (Redis): look up in a task.
                self.loop.create_task(self._after_lookup(ex, ctx, serving, found))
                return
        self._forward(ex, ctx, serving)

    def _serve_hit(self, ex: Exchange, plan: ForwardPlan, entry: CachedResponse) -> None:
        """A cache hit: through the links after the cache (fields, limit headers, CORS),
        never touching the upstream or its pool."""
        ex.serve_stored(entry.status, join_lines(entry.headers), entry.body, plan.cache_start)

    async def _after_lookup(
        self,
        ex: Exchange,
        ctx: RequestContext,
        serving: Serving,
        pending: Awaitable[CachedResponse | None],
    ) -> None:
        try:
            entry = await pending
            if ex.done:
                return
            if entry is not None:
                self._serve_hit(ex, serving.plan, entry)
            else:
                self._forward(ex, ctx, serving)
        except Exception as exc:
            ex.fail_internally(exc)

    def _forward(self, ex: Exchange, ctx: RequestContext, serving: Serving) -> None:
        """Forward upstream, within the route's concurrency slots."""
        route = ctx.route
        if route is not None and route.max_concurrency is not None:
            slots = self.services.route_slots
            if not slots.claim(route.match, route.max_concurrency):
                self.stats.route_busy += 1
                ex.send_error(ROUTE_BUSY)
                return
            ex.route_slot, ex.route_slots = route.match, slots
        ex.forward(ctx, serving.plan, serving.pool)

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
                self._allow(ex, ex.ctx, serving)
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
        await self.services.aclose()
        await self.cache_stores.aclose()


def freeze_long_lived() -> None:
    """Move the loaded configuration out of the cyclic collector's sight.

    A registry of 100,000 keys is a few hundred thousand objects that live until
    the next reload; every full collection would walk them all, pausing traffic.
    Frozen objects are still freed by reference counting when a reload drops them.
    """
    gc.collect()
    gc.freeze()
