"""Step 8: rate limit and quota (docs/decision.md; README, Errors).

The limiter lives outside the configuration snapshot so counters survive
reloads. A store that does not answer must never hang a request: it raises
`StoreUnavailable` within its timeout and `rate_limits.on_store_error`
decides (deny with 503 by default, or let the request through).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

from keyproxy.observability import log_event
from keyproxy.ratelimit import Limiter, LimitResult, StoreUnavailable, ip_bucket, quota_window
from keyproxy.request import Deny, IPAddress, RequestContext

#: A dead store fails every request; one log line per interval says so without flooding.
STORE_ERROR_LOG_INTERVAL = 5.0

STORE_UNAVAILABLE = Deny(
    503,
    "RATE_LIMIT_UNAVAILABLE",
    "the rate-limit store is unavailable; retry shortly",
    (("Retry-After", "1"),),
)


def limit_denial(result: LimitResult) -> Deny:
    if result.reason == "quota":
        if result.quota_reset is None:  # a lifetime total: waiting never helps
            return Deny(
                429, "QUOTA_EXCEEDED", f"this key's quota of {result.quota} requests is used up"
            )
        retry = max(1, math.ceil(result.quota_reset))
        return Deny(
            429,
            "QUOTA_EXCEEDED",
            f"this key's quota of {result.quota} requests is used up; it refills in {retry}s",
            (("Retry-After", str(retry)),),
        )
    retry = max(1, math.ceil(result.retry_after))
    return Deny(
        429,
        "RATE_LIMITED",
        f"rate limit of {result.limit} requests exceeded; retry in {retry}s",
        (("Retry-After", str(retry)),),
    )


#: id(address) -> (address, bucket). Client addresses come from LRUs of parsed peers
#: and forwarded hops (keyproxy.policy.clientip), so one client is one object; by identity,
#: the lookup skips `ipaddress`'s hash, a Python function. The address is held in
#: the value so its id cannot be reused.
_BUCKETS: dict[int, tuple[IPAddress, int, int, str]] = {}
_MAX_BUCKETS = 4096


def client_bucket(ip: IPAddress, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> str:
    """Who a rate limit counts: the client's network at the configured prefix length
    (by default the IPv4 address, or an IPv6 address's /64: one host's usual share)."""
    known = _BUCKETS.get(id(ip))
    if known is not None and known[0] is ip and known[1] == ipv4_prefix and known[2] == ipv6_prefix:
        return known[3]
    bucket = ip_bucket(str(ip), ipv4_prefix, ipv6_prefix)
    if len(_BUCKETS) >= _MAX_BUCKETS:
        _BUCKETS.clear()
    _BUCKETS[id(ip)] = (ip, ipv4_prefix, ipv6_prefix, bucket)
    return bucket


class RateLimitCheck:
    __slots__ = ("_logged_at", "clock", "limiter", "store_failures")

    def __init__(self, limiter: Limiter, clock: Callable[[], float] = time.monotonic) -> None:
        self.limiter = limiter
        # Buckets need a clock that never steps; expiry (ctx.now) needs wall time.
        self.clock = clock
        self.store_failures = 0
        self._logged_at = -STORE_ERROR_LOG_INTERVAL

    def __call__(self, ctx: RequestContext) -> Deny | Awaitable[Deny | None] | None:
        key = ctx.key
        assert key is not None
        if key.rate_limit is None and key.quota is None:
            return None
        try:
            assert ctx.client_ip is not None
            settings = ctx.config.rate_limits
            bucket = client_bucket(ctx.client_ip, settings.ipv4_prefix, settings.ipv6_prefix)
            if key.quota_period is None:
                result = self.limiter.hit(key.id, bucket, key.rate_limit, key.quota, self.clock())
            else:  # the period comes from the request's wall clock, like expiry
                result = self.limiter.hit(
                    key.id,
                    bucket,
                    key.rate_limit,
                    key.quota,
                    self.clock(),
                    quota_window(key.quota_period, ctx.now),
                )
        except StoreUnavailable:
            return self._store_failed(ctx)
        if result.__class__ is LimitResult:
            return self._apply(ctx, result)
        return self._wait(ctx, result)  # type: ignore[arg-type]  # a check returns Deny | None or an awaitable of it; `__class__ is` does not narrow it

    async def _wait(self, ctx: RequestContext, pending: Awaitable[LimitResult]) -> Deny | None:
        try:
            result = await pending
        except StoreUnavailable:
            return self._store_failed(ctx)
        return self._apply(ctx, result)

    def _apply(self, ctx: RequestContext, result: LimitResult) -> Deny | None:
        ctx.limit = result
        return None if result.allowed else limit_denial(result)

    def _store_failed(self, ctx: RequestContext) -> Deny | None:
        self.store_failures += 1
        policy = ctx.config.rate_limits.on_store_error
        now = time.monotonic()
        if now - self._logged_at >= STORE_ERROR_LOG_INTERVAL:
            self._logged_at = now
            log_event("rate_limit_store_error", on_store_error=policy, failures=self.store_failures)
        return None if policy == "allow" else STORE_UNAVAILABLE

    def describe(self, ctx: RequestContext) -> str:
        key = ctx.key
        assert key is not None
        if key.rate_limit is None and key.quota is None:
            return "key has no rate limit or quota"
        parts = []
        rate = key.rate_limit
        if rate is not None:
            windows = " and ".join(map(str, rate)) if isinstance(rate, tuple) else str(rate)
            parts.append(f"{windows} per client IP")
        if key.quota is not None:
            parts.append(
                f"quota {key.quota}" + (f"/{key.quota_period}" if key.quota_period else "")
            )
        result = ctx.limit
        state = ""
        if result is not None and result.remaining is not None:
            state = f"; {result.remaining} left"
        return ", ".join(parts) + state
