"""The shared store: the same GCRA and quota as `memory`, in Redis, in one round trip.

Every replica that points at the same Redis shares one bucket per (key, client IP)
and one quota per key. One Lua script does the whole decision atomically, so
concurrent requests from many replicas can never both take the last request of a
bucket. It reads the clock with Redis `TIME` rather than trusting the caller's:
replicas' clocks differ, and one running ahead would refill buckets early for
its own requests and leave them looking drained to every other replica. Buckets
carry a PEXPIRE that ends when they would be full again, so idle buckets
disappear by themselves and Redis holds only active clients.
Quota counters never expire; run Redis with persistence and a `noeviction` or
`volatile-*` maxmemory policy, or quotas restart when Redis does.

Cost: the hits of one event-loop turn, and those that arrive while a batch is
in flight, go to Redis together as one script call over one connection
(`redis_batch`), so a round trip's cost is shared by every request of the batch.

What is exact: every count. A batch runs as one atomic script that decides its
hits one after another, exactly as the same hits sent one by one in that order
would be decided (and as before, concurrent requests have no order of their own);
no hit is decided from a local copy, so replicas never let more than N through a
bucket nor more than the quota through a key. What is approximate, as before
batching: the time. All hits of a batch are decided at one `TIME` reading, the
instant Redis runs the batch, not the instant each request arrived (at most one
round trip plus the batch in flight earlier, well under the timeout), and a
quota's period is named by each replica's own clock.

Availability: a slow or dead Redis must never hold a request. Each hit is bounded
by `timeout` from the moment it is queued (one timer per batch in flight, due at
its oldest hit's limit; connecting and AUTH are bounded the same way), with no
client-side retries; when the timer fires or the connection drops, every waiter,
sent or still queued, fails at once. After a failure the limiter fails fast,
without touching the network, for `backoff` seconds; then one request probes
Redis while the others keep failing fast, and the first success ends the
back-off. A call that times out may still have been counted by Redis: the
request is refused or let through by the caller's `on_store_error`, whatever
Redis did.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from keyproxy.ratelimit import (
    TOLERANCE,
    UNLIMITED,
    LimitResult,
    QuotaWindow,
    StoreUnavailable,
    quota_exhausted,
)
from keyproxy.ratelimit.redis_batch import ScriptBatcher

if TYPE_CHECKING:
    from keyproxy.config.model import Rate

# One call decides a batch of hits, one after another, atomically. Per hit, KEYS holds
# its quota counter, then one bucket per window; ARGV[1] is the tolerance
# (keyproxy.ratelimit.TOLERANCE), then per hit: its number of windows, its quota (-1:
# none), the quota counter's expiry in ms (0: a lifetime quota, never expires), the time
# in integer microseconds instead of Redis TIME (tests only, else ""; buckets then get no
# expiry), then per window its N and its period in integer microseconds.
# Reply: per hit {status (0 allowed, 1 rate, 2 quota), window (1-based; the one the
# headers report), remaining, reset µs, retry-after µs, used}, all in one flat array.
#
# Every window is read before any is written, so a request refused by one window or by
# the quota is counted in none. The window reported is the refusing one that waits
# longest, else the tightest: least remaining, then soonest reset (as in memory.py).
#
# Times are microseconds since the epoch. Lua numbers are doubles, which hold such
# integers exactly but have only 0.25 µs of resolution at that magnitude, so adding
# period/N thousands of times would drift. The TAT is therefore kept as an integer
# part and a fraction ("<µs> <fraction>"), and period/N is split the same way: the
# integer parts add exactly, the fraction keeps full precision.
SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local tol = tonumber(ARGV[1])
local clock
local function redis_time()
  -- Read once per batch: the batch runs at one instant, as one request did before.
  if not clock then
    local t = redis.call('TIME')
    clock = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return clock
end
local function tightest(remaining, reset, windows)
  local best = 1
  for i = 2, windows do
    if remaining[i] < remaining[best]
      or (remaining[i] == remaining[best] and reset[i] < reset[best]) then
      best = i
    end
  end
  return best
end
-- One hit: its quota counter is KEYS[k], its buckets KEYS[k + 1 ..]; its arguments
-- start at ARGV[a]. Returns the six reply values.
local function decide(k, a, windows)
  local quota = tonumber(ARGV[a + 1])
  local quota_ttl = tonumber(ARGV[a + 2])
  local used = 0
  if quota >= 0 then
    used = tonumber(redis.call('GET', KEYS[k]) or '0')
  end
  local function count()
    if quota < 0 then return used end
    local n = redis.call('INCR', KEYS[k])
    if n == 1 and quota_ttl > 0 then redis.call('PEXPIRE', KEYS[k], quota_ttl) end
    return n
  end
  if windows == 0 then
    if used >= quota then return 2, 0, 0, 0, 0, used end
    return 0, 0, 0, 0, 0, count()
  end
  local now
  local fixed = ARGV[a + 3] ~= ''
  if fixed then
    now = tonumber(ARGV[a + 3])
  else
    now = redis_time()
  end
  local function store(key, value, ttl_us)
    if fixed then
      -- A made-up clock says nothing about when Redis should expire the key.
      redis.call('SET', key, value)
    else
      redis.call('SET', key, value, 'PX', math.ceil(ttl_us / 1000))
    end
  end
  local ti, tf, debt, avail, periods, intervals, limits = {}, {}, {}, {}, {}, {}, {}
  local worst, worst_retry = 0, 0
  for i = 1, windows do
    local limit = tonumber(ARGV[a + 2 + 2 * i])
    local period = tonumber(ARGV[a + 3 + 2 * i])
    local interval = period / limit
    local x0, y0 = now, 0
    local stored = redis.call('GET', KEYS[k + i])
    if stored then
      local x, y = string.match(stored, '^(%d+) (%S+)$')
      if x then x0, y0 = tonumber(x), tonumber(y) end
    end
    local d = (x0 - now) + y0
    if d < 0 then
      x0, y0, d = now, 0, 0
    elseif d > period then
      x0, y0, d = now + period, 0, period
      store(KEYS[k + i], string.format('%d 0', x0), period)
    end
    ti[i], tf[i], debt[i], periods[i], intervals[i], limits[i] = x0, y0, d, period, interval, limit
    avail[i] = (period - d) / interval
    if avail[i] < 1 - tol then
      local retry = d + interval - period
      if worst == 0 or retry > worst_retry then worst, worst_retry = i, retry end
    end
  end
  if worst > 0 then
    return 1, worst, 0, math.ceil(debt[worst]), math.ceil(worst_retry), used
  end
  local remaining, reset = {}, {}
  if quota >= 0 and used >= quota then
    for i = 1, windows do
      remaining[i], reset[i] = math.floor(avail[i] + tol), debt[i]
    end
    local best = tightest(remaining, reset, windows)
    return 2, best, remaining[best], math.ceil(reset[best]), 0, used
  end
  for i = 1, windows do
    local period, interval, limit = periods[i], intervals[i], limits[i]
    local whole = math.floor(period / limit)
    local frac = (period - whole * limit) / limit
    local x1, y1 = ti[i], tf[i] + frac
    if y1 >= 1 then
      y1 = y1 - 1
      x1 = x1 + 1
    end
    x1 = x1 + whole
    local d = debt[i] + interval
    store(KEYS[k + i], string.format('%d %.17g', x1, y1), d)
    remaining[i], reset[i] = math.floor(avail[i] - 1 + tol), d
  end
  local best = tightest(remaining, reset, windows)
  return 0, best, remaining[best], math.ceil(reset[best]), 0, count()
end
local out, n = {}, 0
local k, a = 1, 2
while a <= #ARGV do
  local windows = tonumber(ARGV[a])
  local s, w, r, re, rt, u = decide(k, a, windows)
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5], out[n + 6] = s, w, r, re, rt, u
  n = n + 6
  k = k + 1 + windows
  a = a + 4 + 2 * windows
end
return out
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

_UNAVAILABLE = "rate-limit store unavailable"
_TOLERANCE_ARG = repr(TOLERANCE)
#: Reply values per hit (see SCRIPT).
_REPLY_WIDTH = 6


def quota_key(key_id: str, window: QuotaWindow | None = None) -> str:
    """A lifetime quota's counter, or the counter of one period of a refilling quota."""
    if window is None:
        return f"keyproxy:quota:{key_id}"
    return f"keyproxy:quota:{key_id}:{window.label}"


#: How long a period's counter outlives the period: replicas' clocks differ by seconds,
#: and one still in the old period must find its counter, not a fresh one.
QUOTA_GRACE_MS = 86_400_000


class RedisLimiter:
    """GCRA and quotas shared through Redis; `hit` raises `StoreUnavailable` rather than wait.

    The caller's `now` is ignored (Redis's clock decides); it is accepted so both
    stores have one signature. `use_caller_clock=True` makes the script use it
    instead, so tests can step time exactly; never in production, where replicas'
    clocks disagree.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.1,
        backoff: float = 1.0,
        use_caller_clock: bool = False,
    ) -> None:
        self._timeout = timeout
        self._backoff = backoff
        # One connection; every hit of a loop turn shares its round trip (redis_batch).
        self._batcher = ScriptBatcher(
            url, SCRIPT, SCRIPT_SHA, [_TOLERANCE_ARG], _REPLY_WIDTH, timeout
        )
        self._retry_at = 0.0  # monotonic time the back-off ends; 0.0 when healthy
        self._probing = False
        self._use_caller_clock = use_caller_clock

    async def hit(
        self,
        key_id: str,
        client_ip: str,
        rate: Rate | tuple[Rate, ...] | None,
        quota: int | None,
        now: float,
        window: QuotaWindow | None = None,
    ) -> LimitResult:
        if rate is None and quota is None:
            return UNLIMITED
        rates: tuple[Rate, ...] = (
            () if rate is None else rate if rate.__class__ is tuple else (rate,)  # type: ignore[assignment]  # Rate is a tuple too
        )
        probe = False
        if self._retry_at:
            if self._probing or time.monotonic() < self._retry_at:
                raise StoreUnavailable(_UNAVAILABLE)
            probe = self._probing = True
        try:
            # Bounded by `timeout` from now: the batcher fails every waiter when time is up.
            reply = await self._call(key_id, client_ip, rates, quota, now, window)
        except (RedisError, OSError, TimeoutError) as exc:
            self._retry_at = time.monotonic() + self._backoff
            unavailable = StoreUnavailable(_UNAVAILABLE)
            # Set by hand: compiled (mypyc), `raise … from exc` after an await drops the cause.
            unavailable.__cause__ = exc
            raise unavailable from exc
        finally:
            if probe:
                self._probing = False
        self._retry_at = 0.0
        return _result(reply, rates, quota, window)

    def _call(
        self,
        key_id: str,
        client_ip: str,
        rates: tuple[Rate, ...],
        quota: int | None,
        now: float,
        window: QuotaWindow | None,
    ) -> Awaitable[list[int]]:
        """Queue this hit's part of the next batch; its six reply values when answered."""
        bucket = f"keyproxy:rl:{key_id}:{client_ip}"  # the bucket's counter
        keys = [quota_key(key_id, window)]
        args: list[str | int] = [
            len(rates),
            -1 if quota is None else quota,
            0 if window is None else round(window.reset_in * 1000) + QUOTA_GRACE_MS,
            round(now * 1_000_000) if self._use_caller_clock else "",
        ]
        for position, rate in enumerate(rates, 1):
            keys.append(bucket if position == 1 else f"{bucket}#{position}")
            args += (rate.limit, round(rate.period * 1_000_000))
        return self._batcher.submit(keys, args)

    async def ping(self) -> bool:
        """Whether Redis answers within the timeout (for readiness checks)."""
        try:
            return await self._batcher.command("PING") == b"PONG"
        except (RedisError, OSError, TimeoutError):
            return False

    async def aclose(self) -> None:
        await self._batcher.aclose()


def _result(
    reply: list[int], rates: tuple[Rate, ...], quota: int | None, window: QuotaWindow | None
) -> LimitResult:
    status, position, remaining, reset_us, retry_us, used = reply
    quota_remaining = None if quota is None else max(quota - used, 0)
    quota_reset = None if window is None or quota is None else window.reset_in
    if not rates:
        if status == 2:
            return quota_exhausted(None, None, None, quota, window)  # type: ignore[arg-type]  # status 2 only with a quota
        return LimitResult(True, None, None, None, None, 0.0, quota, quota_remaining, quota_reset)
    rate = rates[position - 1]
    reset = reset_us / 1_000_000
    if status == 0:
        return LimitResult(
            True, None, rate.limit, remaining, reset, 0.0, quota, quota_remaining, quota_reset
        )
    if status == 1:
        return LimitResult(
            False,
            "rate",
            rate.limit,
            0,
            reset,
            retry_us / 1_000_000,
            quota,
            quota_remaining,
            quota_reset,
        )
    return quota_exhausted(rate, remaining, reset, quota, window)  # type: ignore[arg-type]  # status 2 only with a quota
