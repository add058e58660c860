"""Per-(key, client IP) rate limits and per-key quotas (decision step 8, docs/decision.md).

Both stores implement the same GCRA ("generic cell rate algorithm") with a burst
of N: a key limited to `N/period` has, per client IP, a bucket of N requests
refilled continuously at N per period. A bucket is one number, its theoretical
arrival time (TAT): the moment the bucket will be full again. GCRA is used
rather than fixed windows because a fixed window lets a client send N requests
at the end of one window and N more at the start of the next (2N in an instant);
GCRA never lets more than N through in any stretch of `period`, and it needs
neither timestamps per request nor a background refill task.

A request is allowed only when both the rate and the quota allow it, and only
an allowed request consumes either, so a client hammering a limited bucket does
not burn the key's quota. State is keyed by key id and IP only, never by the
`Config` object, so it survives configuration reloads; a key whose `rate_limit`
changes keeps its bucket, reinterpreted with the new rate.

A key may have several windows (`[10/second, 1000/hour]`): each is its own GCRA
bucket, a request must fit all of them and is then counted in all of them. A quota
may refill per UTC day, week or month: the caller names the current period
(`quota_window`, from the request's wall clock), and the stores keep one counter per
key and period, so a new period starts at zero without any reset job.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections.abc import Awaitable
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from keyproxy.config.model import Rate, RateLimitSettings

__all__ = [
    "LimitResult",
    "Limiter",
    "QuotaWindow",
    "StoreUnavailable",
    "ip_bucket",
    "open_limiter",
    "quota_window",
]

#: Fraction of one emission interval by which a request may arrive early and still
#: pass. Float rounding makes the bucket's content an approximation: after a burst of
#: N it may read 0.99999... instead of 1 for the last request. A bucket never holds more
#: than N, so any tolerance below 1 still lets exactly N of a simultaneous burst
#: through and leaves the sustained rate exactly N per period; 1 % covers the rounding
#: error of bursts of tens of thousands, and moves nothing by more than 1 % of an interval.
TOLERANCE = 0.01


class LimitResult(NamedTuple):
    """The verdict for one request, with what the response headers need.

    `retry_after` is `math.inf` when the quota is spent: no amount of waiting
    helps until the configuration raises the quota, so the caller must not turn it
    into an integer `Retry-After` blindly.
    """

    allowed: bool
    reason: str | None  # None, "rate" or "quota"
    limit: int | None  # the rate's N (None when the key has no rate limit)
    remaining: int | None  # requests left in the bucket now
    reset: float | None  # seconds until the bucket is full again
    retry_after: float  # seconds until a request would pass (0 when allowed)
    quota: int | None
    quota_remaining: int | None
    quota_reset: float | None = None  # seconds until a refilling quota refills; None: lifetime


#: The answer for keys with neither a rate limit nor a quota; shared, since it is immutable.
UNLIMITED = LimitResult(True, None, None, None, None, 0.0, None, None, None)


class QuotaWindow(NamedTuple):
    """The current period of a refilling quota: its name and the seconds until it ends.

    The label names the period ("month:2026-12"), so a store keeps one counter per key
    and period and a new period starts from zero without any reset job.
    """

    label: str
    reset_in: float


_SECONDS_PER_DAY = 86400
#: period -> (start, end, label) of the last window computed: a month is computed once.
_WINDOWS: dict[str, tuple[float, float, str]] = {}


def _period_bounds(period: str, now: float) -> tuple[float, float, str]:
    day = math.floor(now / _SECONDS_PER_DAY)
    if period == "day":
        first, after = day, day + 1
    elif period == "week":
        first = day - (day + 3) % 7  # 1970-01-01 was a Thursday; ISO weeks start on Monday
        after = first + 7
    elif period == "month":
        today = date.fromordinal(date(1970, 1, 1).toordinal() + day)
        start = datetime(today.year, today.month, 1, tzinfo=UTC)
        year, month = divmod(today.year * 12 + today.month, 12)  # the month after, 0-based
        end = datetime(year, month + 1, 1, tzinfo=UTC)
        return start.timestamp(), end.timestamp(), f"month:{start:%Y-%m}"
    else:
        raise ValueError(f"unknown quota period {period!r}")
    label = date.fromordinal(date(1970, 1, 1).toordinal() + first).isoformat()
    return first * _SECONDS_PER_DAY, after * _SECONDS_PER_DAY, f"{period}:{label}"


def quota_window(period: str, now: float) -> QuotaWindow:
    """The UTC day, ISO week (from Monday) or month that wall-clock `now` falls in."""
    bounds = _WINDOWS.get(period)
    if bounds is None or not bounds[0] <= now < bounds[1]:
        bounds = _WINDOWS[period] = _period_bounds(period, now)
    return QuotaWindow(bounds[2], bounds[1] - now)


class StoreUnavailable(Exception):
    """The shared store did not answer in time or is down.

    The pipeline maps this to `rate_limits.on_store_error` (deny with 503, or
    allow). The message is deliberately generic: it may reach logs, and the
    store URL can carry a password.
    """


class Limiter(Protocol):
    """A rate-limit and quota store.

    `hit` is synchronous for the memory store (no await on the hot path) and a
    coroutine for Redis; callers handle both with
    `result = limiter.hit(...); if not isinstance(result, LimitResult): result = await result`.
    """

    def hit(
        self,
        key_id: str,
        client_ip: str,
        rate: Rate | tuple[Rate, ...] | None,
        quota: int | None,
        now: float,
        window: QuotaWindow | None = None,
    ) -> LimitResult | Awaitable[LimitResult]:
        """`rate` may be several windows (each must allow); `window` makes `quota`
        count per period instead of for the key's lifetime."""
        ...

    async def aclose(self) -> None: ...


def open_limiter(settings: RateLimitSettings) -> Limiter:
    """Build the store named by `rate_limits.store`; connects lazily, so it never blocks."""
    store = settings.store
    if store == "memory":
        from keyproxy.ratelimit.memory import MemoryLimiter

        return MemoryLimiter(max_buckets=settings.max_buckets)
    if store.startswith(("redis://", "rediss://", "unix://")):
        from keyproxy.ratelimit.redis import RedisLimiter

        return RedisLimiter(store, timeout=settings.timeout)
    raise ValueError("rate_limits.store must be 'memory' or a redis://, rediss:// or unix:// URL")


@functools.lru_cache(maxsize=4096)
def ip_bucket(client_ip: str, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> str:
    """The client network to rate-limit by: an IPv4 address's /ipv4_prefix (32: the
    address itself), an IPv6 address's /ipv6_prefix (64 by default).

    One IPv6 host usually owns a whole /64 and can pick a new source address per
    request; limited by full address, each request would find a fresh, full bucket.
    Sites that hand out /56 or /48 networks (or IPv4 clients behind carrier NAT
    ranges an operator wants grouped) need a shorter prefix, hence the settings.
    IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, seen on dual-stack sockets) are
    folded into their IPv4 form so one client has one bucket. Not applied by the
    stores themselves: the caller decides what "client" means.
    """
    if ":" not in client_ip:
        if ipv4_prefix >= 32:
            return client_ip
        try:
            v4 = ipaddress.IPv4Address(client_ip)
        except ValueError:
            return client_ip
        return _network(int(v4), 32, ipv4_prefix)
    try:
        addr = ipaddress.IPv6Address(client_ip.split("%", 1)[0])
    except ValueError:
        return client_ip
    if addr.ipv4_mapped is not None:
        return ip_bucket(str(addr.ipv4_mapped), ipv4_prefix, ipv6_prefix)
    if ipv6_prefix >= 128:
        return str(addr)
    return _network(int(addr), 128, ipv6_prefix)


def _network(value: int, bits: int, prefix: int) -> str:
    shift = bits - prefix
    masked = value >> shift << shift
    address = ipaddress.IPv4Address(masked) if bits == 32 else ipaddress.IPv6Address(masked)
    return f"{address}/{prefix}"


def quota_exhausted(
    rate: Rate | None,
    remaining: int | None,
    reset: float | None,
    quota: int,
    window: QuotaWindow | None = None,
) -> LimitResult:
    """The refusal for a spent quota, shared by both stores so they answer alike.

    A lifetime quota never refills (`retry_after` is infinite); a periodic one does
    when its period ends.
    """
    return LimitResult(
        False,
        "quota",
        rate.limit if rate is not None else None,
        remaining,
        reset,
        math.inf if window is None else window.reset_in,
        quota,
        0,
        None if window is None else window.reset_in,
    )


def tightest(candidates: list[tuple[int, float, int]]) -> int:
    """Which window the headers report: the least remaining, then the soonest reset.

    `candidates` are (remaining, reset, index); the index breaks exact ties, so both
    stores pick the same window.
    """
    return min(candidates)[2]
