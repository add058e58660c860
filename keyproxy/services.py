"""Long-lived state that outlives configuration snapshots.

A snapshot is immutable and replaced whole on reload; what must survive it (the
rate limiter's counters, the identity provider's keys being fetched, the session
that reads records' owners, metrics and the access log, requests in flight per
route) lives here, in one object handed to what needs it. A reload swaps a part
explicitly (`Services.on_config`) instead of reaching into a check to find it.
"""

from __future__ import annotations

import asyncio

from keyproxy.checks.limits import RateLimitCheck
from keyproxy.checks.permissions import OwnershipCheck
from keyproxy.config import Config
from keyproxy.jwks import JwksCache
from keyproxy.observe import Observer
from keyproxy.ratelimit import open_limiter


class RouteSlots:
    """Requests in flight upstream per route with `max_concurrency`, by route text."""

    __slots__ = ("inflight",)

    def __init__(self) -> None:
        self.inflight: dict[str, int] = {}

    def claim(self, match: str, limit: int) -> bool:
        """Take a slot of route `match`; False when all `limit` are taken."""
        inflight = self.inflight
        busy = inflight.get(match, 0)
        if busy >= limit:
            return False
        inflight[match] = busy + 1
        return True

    def release(self, match: str) -> None:
        inflight = self.inflight
        left = inflight[match] - 1
        if left:
            inflight[match] = left
        else:
            del inflight[match]


class Services:
    """The process's long-lived services, kept across reloads."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        reloads: dict[str, int] | None = None,
    ) -> None:
        self.loop = loop
        #: The rate-limit step; its limiter is replaced when `rate_limits` names a new store.
        self.limits = RateLimitCheck(open_limiter(config.rate_limits))
        self.owners = OwnershipCheck()
        self.jwks: JwksCache | None = None
        self.route_slots = RouteSlots()
        self.observer = Observer(config, loop)
        if reloads is not None:
            self.observer.metrics.reloads = reloads
        self._start_jwks(config)

    def _start_jwks(self, config: Config) -> None:
        """Keep the identity provider's keys fresh in the background, off the request path;
        a reload that drops or changes `jwks_url` stops fetching the old one."""
        users = config.users
        jwks = users.jwks if users is not None else None
        previous = self.jwks
        if previous is not None and previous is not jwks:
            previous.stop()
        self.jwks = jwks
        if jwks is not None:
            assert users is not None
            jwks.start(self.loop, users.settings.jwks_refresh)

    def on_config(self, config: Config, old: Config) -> None:
        """Swap what the new snapshot changes; everything else keeps its state."""
        new_limits, old_limits = config.rate_limits, old.rate_limits
        if (new_limits.store, new_limits.max_buckets, new_limits.timeout) != (
            old_limits.store,
            old_limits.max_buckets,
            old_limits.timeout,
        ):  # a new store; `on_store_error` alone is read per request and keeps the counters
            previous = self.limits.limiter
            self.limits.limiter = open_limiter(config.rate_limits)
            self.loop.create_task(previous.aclose())
        self._start_jwks(config)
        self.observer.on_config(config)

    async def aclose(self) -> None:
        await self.limits.limiter.aclose()
        await self.owners.aclose()
        if self.jwks is not None:
            self.jwks.stop()
