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

Availability: a slow or dead Redis must never hold a request. Each call is bounded
by `timeout` (socket timeouts and an `asyncio.timeout` around the whole exchange,
no client-side retries). After a failure the limiter fails fast, without touching
the network, for `backoff` seconds; then one request probes Redis while the
others keep failing fast, and the first success ends the back-off. A call that
times out may still have been counted by Redis: the request is refused or let
through by the caller's `on_store_error`, whatever Redis did.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import time
from typing import TYPE_CHECKING

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from keyproxy.ratelimit import (
    TOLERANCE,
    UNLIMITED,
    LimitResult,
    StoreUnavailable,
    quota_exhausted,
)

if TYPE_CHECKING:
    from keyproxy.config.model import Rate

# KEYS[1]: bucket, KEYS[2]: quota counter.
# ARGV[1]: the rate's N (0: no rate limit), ARGV[2]: its period in microseconds (an
# integer), ARGV[3]: quota (-1: none), ARGV[4]: tolerance (keyproxy.ratelimit.TOLERANCE),
# ARGV[5] (tests only): the time in integer microseconds, instead of Redis TIME; buckets
# then get no expiry.
# Reply: {status (0 allowed, 1 rate, 2 quota), remaining, reset µs, retry-after µs, used}.
#
# Times are microseconds since the epoch. Lua numbers are doubles, which hold such
# integers exactly but have only 0.25 µs of resolution at that magnitude, so adding
# period/N thousands of times would drift. The TAT is therefore kept as an integer
# part and a fraction ("<µs> <fraction>"), and period/N is split the same way: the
# integer parts add exactly, the fraction keeps full precision.
SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local quota = tonumber(ARGV[3])
local tol = tonumber(ARGV[4])
local used = 0
if quota >= 0 then
  used = tonumber(redis.call('GET', KEYS[2]) or '0')
end
if limit <= 0 then
  if used >= quota then return {2, 0, 0, 0, used} end
  return {0, 0, 0, 0, redis.call('INCR', KEYS[2])}
end
local now
local function store(value, ttl_us)
  redis.call('SET', KEYS[1], value, 'PX', math.ceil(ttl_us / 1000))
end
if ARGV[5] then
  now = tonumber(ARGV[5])
  -- A made-up clock says nothing about when Redis should expire the key.
  store = function(value) redis.call('SET', KEYS[1], value) end
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local whole = math.floor(period / limit)
local frac = (period - whole * limit) / limit
local interval = period / limit
local ti, tf = now, 0
local stored = redis.call('GET', KEYS[1])
if stored then
  local a, b = string.match(stored, '^(%d+) (%S+)$')
  if a then ti, tf = tonumber(a), tonumber(b) end
end
local debt = (ti - now) + tf
if debt < 0 then
  ti, tf, debt = now, 0, 0
elseif debt > period then
  ti, tf, debt = now + period, 0, period
  store(string.format('%d 0', ti), period)
end
local available = (period - debt) / interval
if available < 1 - tol then
  return {1, 0, math.ceil(debt), math.ceil(debt + interval - period), used}
end
if quota >= 0 and used >= quota then
  return {2, math.floor(available + tol), math.ceil(debt), 0, used}
end
tf = tf + frac
if tf >= 1 then
  tf = tf - 1
  ti = ti + 1
end
ti = ti + whole
debt = debt + interval
store(string.format('%d %.17g', ti, tf), debt)
if quota >= 0 then used = redis.call('INCR', KEYS[2]) end
return {0, math.floor(available - 1 + tol), math.ceil(debt), 0, used}
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

_UNAVAILABLE = "rate-limit store unavailable"
_TOLERANCE_ARG = repr(TOLERANCE)

# A new connection must be ready within the first request's timeout, so it skips
# what costs round trips and tells us nothing: RESP2 needs no HELLO, and without
# library info there is no CLIENT SETINFO. (redis-py 8 renamed the latter option.)
_LEAN_HANDSHAKE: dict[str, object] = {"protocol": 2}
if importlib.util.find_spec("redis.driver_info") is not None:
    _LEAN_HANDSHAKE["driver_info"] = None
else:
    _LEAN_HANDSHAKE.update(lib_name=None, lib_version=None)


def bucket_key(key_id: str, client_ip: str) -> str:
    return f"keyproxy:rl:{key_id}:{client_ip}"


def quota_key(key_id: str) -> str:
    return f"keyproxy:quota:{key_id}"


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
        max_connections: int = 32,
        use_caller_clock: bool = False,
    ) -> None:
        self._timeout = timeout
        self._backoff = backoff
        # Bounded: beyond max_connections callers queue for a connection (within their
        # timeout) instead of opening one socket per concurrent request; a burst of
        # new connections is also what could blow the first requests' timeout.
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            **_LEAN_HANDSHAKE,
        )
        self._redis = Redis(connection_pool=self._pool)
        self._retry_at = 0.0  # monotonic time the back-off ends; 0.0 when healthy
        self._probing = False
        self._use_caller_clock = use_caller_clock

    async def hit(
        self, key_id: str, client_ip: str, rate: Rate | None, quota: int | None, now: float
    ) -> LimitResult:
        if rate is None and quota is None:
            return UNLIMITED
        probe = False
        if self._retry_at:
            if self._probing or time.monotonic() < self._retry_at:
                raise StoreUnavailable(_UNAVAILABLE)
            probe = self._probing = True
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._call(key_id, client_ip, rate, quota, now)
        except (RedisError, OSError, TimeoutError) as exc:
            self._retry_at = time.monotonic() + self._backoff
            raise StoreUnavailable(_UNAVAILABLE) from exc
        finally:
            if probe:
                self._probing = False
        self._retry_at = 0.0
        return _result(reply, rate, quota)

    async def _call(
        self, key_id: str, client_ip: str, rate: Rate | None, quota: int | None, now: float
    ) -> list[int]:
        args: tuple[str | int, ...] = (
            2,
            bucket_key(key_id, client_ip),
            quota_key(key_id),
            0 if rate is None else rate.limit,
            0 if rate is None else round(rate.period * 1_000_000),
            -1 if quota is None else quota,
            _TOLERANCE_ARG,
        )
        if self._use_caller_clock:
            args += (round(now * 1_000_000),)
        try:
            return await self._redis.evalsha(SCRIPT_SHA, *args)  # type: ignore[no-any-return]
        except NoScriptError:
            # First use, or Redis restarted or was flushed: EVAL runs and caches it.
            return await self._redis.eval(SCRIPT, *args)  # type: ignore[no-any-return]

    async def ping(self) -> bool:
        """Whether Redis answers within the timeout (for readiness checks)."""
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._pool.aclose()


def _result(reply: list[int], rate: Rate | None, quota: int | None) -> LimitResult:
    status, remaining, reset_us, retry_us, used = reply
    quota_remaining = None if quota is None else max(quota - used, 0)
    if rate is None:
        if status == 2:
            return quota_exhausted(None, None, None, quota)  # type: ignore[arg-type]
        return LimitResult(True, None, None, None, None, 0.0, quota, quota_remaining)
    reset = reset_us / 1_000_000
    if status == 0:
        return LimitResult(True, None, rate.limit, remaining, reset, 0.0, quota, quota_remaining)
    if status == 1:
        return LimitResult(
            False, "rate", rate.limit, 0, reset, retry_us / 1_000_000, quota, quota_remaining
        )
    return quota_exhausted(rate, remaining, reset, quota)  # type: ignore[arg-type]
