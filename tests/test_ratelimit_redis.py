"""The Redis store against real `redis-server` processes.

Most tests step time explicitly (`use_caller_clock=True`) so they can assert exact
values without sleeping; the ones about sharing, expiry and Redis's own clock use
the real `TIME`.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from keyproxy.config.model import Rate
from keyproxy.ratelimit import UNLIMITED, LimitResult, StoreUnavailable
from keyproxy.ratelimit.memory import MemoryLimiter
from keyproxy.ratelimit.redis import RedisLimiter
from tests.redis_server import RedisServer, free_port

T0 = 1.8e9  # epoch-like seconds: the script must stay exact at this magnitude
PER_MINUTE_10 = Rate(10, 60.0, "10/minute")
PER_SECOND_10 = Rate(10, 1.0, "10/second")
GENEROUS = 2.0  # upper bound for "did not hang"; the configured timeouts are 0.2 s


@pytest.fixture
async def limiter(redis_server: RedisServer, redis_client: Redis) -> AsyncIterator[RedisLimiter]:
    """Redis's clock; a timeout generous enough for a loaded test machine."""
    limiter = RedisLimiter(redis_server.url, timeout=2.0)
    yield limiter
    await limiter.aclose()


@pytest.fixture
async def stepped(redis_server: RedisServer, redis_client: Redis) -> AsyncIterator[RedisLimiter]:
    """The test's clock, passed as `now`."""
    limiter = RedisLimiter(redis_server.url, timeout=2.0, use_caller_clock=True)
    yield limiter
    await limiter.aclose()


async def burst(
    limiter: RedisLimiter,
    n: int,
    now: float = T0,
    *,
    key_id: str = "k",
    client_ip: str = "192.0.2.1",
    rate: Rate | None = PER_MINUTE_10,
    quota: int | None = None,
) -> list[LimitResult]:
    """`n` concurrent hits, at most 100 in flight, so a loaded machine stays within the timeout."""
    results: list[LimitResult] = []
    for start in range(0, n, 100):
        results += await asyncio.gather(
            *(limiter.hit(key_id, client_ip, rate, quota, now) for _ in range(min(100, n - start)))
        )
    return results


async def test_50_concurrent_hits_on_a_limit_of_10_let_exactly_10_through(
    limiter: RedisLimiter,
) -> None:
    results = await burst(limiter, 50)
    assert sum(r.allowed for r in results) == 10
    assert sorted(r.remaining for r in results if r.allowed) == list(range(10))
    assert {r.reason for r in results if not r.allowed} == {"rate"}


@pytest.mark.parametrize(("limit", "period"), [(3, 1), (7, 1), (13, 3600), (3000, 1)])
async def test_exact_burst_at_epoch_magnitudes(
    stepped: RedisLimiter, limit: int, period: float
) -> None:
    results = await burst(stepped, limit + 5, T0 + 0.123457, rate=Rate(limit, period, "r"))
    assert sum(r.allowed for r in results) == limit


async def test_values_match_the_memory_store(stepped: RedisLimiter) -> None:
    first = await stepped.hit("k", "ip", PER_MINUTE_10, None, T0)
    assert first == LimitResult(True, None, 10, 9, 6.0, 0.0, None, None)
    second = await stepped.hit("k", "ip", PER_MINUTE_10, None, T0 + 1)
    assert (second.remaining, second.reset) == (8, 11.0)
    rest = await burst(stepped, 10, T0 + 1, client_ip="ip")
    assert sum(r.allowed for r in rest) == 8  # the bucket held 8.17
    refused = await stepped.hit("k", "ip", PER_MINUTE_10, None, T0 + 3)
    assert (refused.allowed, refused.reason, refused.remaining) == (False, "rate", 0)
    # TAT is T0 + 60 (10 requests of 6 s from T0): full at T0 + 60, one slot at T0 + 6.
    assert refused.retry_after == pytest.approx(3.0, abs=1e-6)
    assert refused.reset == pytest.approx(57.0, abs=1e-6)


async def test_refill_is_continuous(stepped: RedisLimiter) -> None:
    await burst(stepped, 10, T0)
    assert not (await stepped.hit("k", "192.0.2.1", PER_MINUTE_10, None, T0 + 5.9)).allowed
    assert (await stepped.hit("k", "192.0.2.1", PER_MINUTE_10, None, T0 + 6.0)).allowed
    assert sum(r.allowed for r in await burst(stepped, 10, T0 + 30)) == 4
    assert sum(r.allowed for r in await burst(stepped, 20, T0 + 1000)) == 10


async def test_no_double_burst_at_window_edges(stepped: RedisLimiter) -> None:
    assert sum(r.allowed for r in await burst(stepped, 10, T0 + 59.9)) == 10
    assert sum(r.allowed for r in await burst(stepped, 10, T0 + 60.1)) == 0


async def test_same_decisions_as_the_memory_store(stepped: RedisLimiter) -> None:
    """One random trace through both stores: identical verdicts, counts and times."""
    rng = random.Random(3)
    memory = MemoryLimiter()
    rates = {"a": Rate(3, 10.0, "3/10s"), "b": Rate(5, 60.0, "5/minute"), "c": None}
    quotas = {"a": None, "b": 40, "c": 7}
    now = T0
    for _ in range(400):
        now += round(rng.expovariate(1.0), 6)
        key = rng.choice("abc")
        ip = rng.choice(["192.0.2.1", "192.0.2.2", "2001:db8::1"])
        expected = memory.hit(key, ip, rates[key], quotas[key], now)
        got = await stepped.hit(key, ip, rates[key], quotas[key], now)
        assert (got.allowed, got.reason, got.limit, got.remaining) == (
            expected.allowed,
            expected.reason,
            expected.limit,
            expected.remaining,
        )
        assert (got.quota, got.quota_remaining) == (expected.quota, expected.quota_remaining)
        for field in ("reset", "retry_after"):
            want, have = getattr(expected, field), getattr(got, field)
            if want is None or math.isinf(want):
                assert have == want
            else:
                assert have == pytest.approx(want, abs=2e-6)


async def test_quota_counts_per_key_across_ips_and_then_refuses(stepped: RedisLimiter) -> None:
    results = [await stepped.hit("k", f"192.0.2.{i}", None, 3, T0) for i in range(5)]
    assert [r.allowed for r in results] == [True, True, True, False, False]
    assert [r.quota_remaining for r in results] == [2, 1, 0, 0, 0]
    spent = results[3]
    assert (spent.reason, spent.quota, spent.retry_after) == ("quota", 3, math.inf)
    assert (await stepped.hit("k", "192.0.2.9", None, 3, T0 + 10**8)).reason == "quota"
    assert (await stepped.hit("other", "192.0.2.1", None, 3, T0)).quota_remaining == 2


async def test_rate_refusal_does_not_spend_quota(stepped: RedisLimiter) -> None:
    r = Rate(2, 60.0, "2/minute")
    results = await burst(stepped, 10, rate=r, quota=5)
    assert sum(x.allowed for x in results) == 2
    refused = [x for x in results if not x.allowed]
    assert {x.reason for x in refused} == {"rate"}
    assert {x.quota_remaining for x in refused} == {3}
    results = await burst(stepped, 10, T0 + 60, rate=r, quota=5)
    assert sum(x.allowed for x in results) == 2
    last = [await stepped.hit("k", "192.0.2.1", r, 5, T0 + 120) for _ in range(3)]
    assert [x.reason for x in last] == [None, "quota", "quota"]


async def test_quota_refusal_does_not_spend_the_bucket(stepped: RedisLimiter) -> None:
    assert (await stepped.hit("k", "ip", PER_MINUTE_10, 1, T0)).remaining == 9
    refused = await stepped.hit("k", "ip", PER_MINUTE_10, 1, T0)
    assert (refused.reason, refused.remaining, refused.quota_remaining) == ("quota", 9, 0)


async def test_shorter_period_after_reload_does_not_block_for_the_old_one(
    stepped: RedisLimiter,
) -> None:
    hourly = Rate(10, 3600.0, "10/hour")
    await burst(stepped, 10, rate=hourly)
    per_second = Rate(10, 1.0, "10/second")
    refused = await stepped.hit("k", "192.0.2.1", per_second, None, T0 + 1)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(0.1, abs=1e-6)
    assert sum(r.allowed for r in await burst(stepped, 20, T0 + 3, rate=per_second)) == 10


async def test_uses_redis_time_not_the_callers(limiter: RedisLimiter) -> None:
    results = await burst(limiter, 11, now=0.0, rate=PER_SECOND_10)
    assert sum(r.allowed for r in results) == 10
    refused = next(r for r in results if not r.allowed)
    assert 0.0 < refused.retry_after <= 0.1
    await asyncio.sleep(0.15)  # the caller's `now` stays 0.0; Redis's clock moved on
    assert (await limiter.hit("k", "192.0.2.1", PER_SECOND_10, None, 0.0)).allowed


async def test_two_replicas_share_one_count(redis_server: RedisServer, redis_client: Redis) -> None:
    replica_a = RedisLimiter(redis_server.url, timeout=2.0)
    replica_b = RedisLimiter(redis_server.url, timeout=2.0)
    try:
        results = await asyncio.gather(
            *(
                (replica_a if i % 2 else replica_b).hit("k", "192.0.2.1", PER_MINUTE_10, 15, 0.0)
                for i in range(30)
            )
        )
        assert sum(r.allowed for r in results) == 10
        other_ip = [await replica_b.hit("k", "192.0.2.2", None, 15, 0.0) for _ in range(6)]
        assert [r.allowed for r in other_ip] == [True] * 5 + [False]
        assert other_ip[-1].reason == "quota"
        assert (await replica_a.hit("k", "192.0.2.3", None, 15, 0.0)).reason == "quota"
    finally:
        await replica_a.aclose()
        await replica_b.aclose()


async def test_key_names_and_expiry(limiter: RedisLimiter, redis_client: Redis) -> None:
    await limiter.hit("website", "192.0.2.1", PER_MINUTE_10, 100, 0.0)
    bucket, quota = "keyproxy:rl:website:192.0.2.1", "keyproxy:quota:website"
    assert 0 < await redis_client.pttl(bucket) <= 6000  # full again after one interval
    assert await redis_client.ttl(quota) == -1  # quotas never expire
    assert await redis_client.get(quota) == b"1"
    await burst(limiter, 9, key_id="website", quota=100)
    assert 50_000 < await redis_client.pttl(bucket) <= 60_000
    assert sorted(await redis_client.keys("*")) == sorted([bucket.encode(), quota.encode()])


async def test_idle_buckets_disappear(limiter: RedisLimiter, redis_client: Redis) -> None:
    fast = Rate(10, 0.1, "10/0.1s")
    await limiter.hit("k", "192.0.2.1", fast, None, 0.0)
    await asyncio.sleep(0.05)
    assert await redis_client.exists("keyproxy:rl:k:192.0.2.1") == 0


async def test_script_is_reloaded_after_a_flush(limiter: RedisLimiter, redis_client: Redis) -> None:
    assert (await limiter.hit("k", "192.0.2.1", PER_MINUTE_10, None, 0.0)).allowed
    await redis_client.script_flush()
    assert (await limiter.hit("k", "192.0.2.1", PER_MINUTE_10, None, 0.0)).remaining == 8


async def test_unlimited_keys_never_touch_redis() -> None:
    nowhere = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    try:
        assert await nowhere.hit("k", "192.0.2.1", None, None, 0.0) is UNLIMITED
    finally:
        await nowhere.aclose()


class CountingRelay:
    """A TCP relay in front of Redis that counts the script calls the limiter sends.

    Counting on the wire rather than by wrapping a method: it sees what reaches the
    network, and the compiled build's classes cannot have methods replaced.
    """

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._sent = bytearray()  # everything the limiter wrote, over every connection
        self._server: asyncio.Server | None = None
        self._relaying: set[asyncio.Task[None]] = set()
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"

    @property
    def script_calls(self) -> int:
        return self._sent.count(b"\r\nEVALSHA\r\n") + self._sent.count(b"\r\nEVAL\r\n")

    def reset(self) -> None:
        self._sent.clear()

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        try:
            redis_in, redis_out = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            client_out.close()
            return

        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, record: bool
        ) -> None:
            try:
                while data := await source.read(65536):
                    if record:
                        self._sent += data
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        relaying = asyncio.current_task()
        assert relaying is not None
        self._relaying.add(relaying)
        try:
            await asyncio.gather(
                pump(client_in, redis_out, True), pump(redis_in, client_out, False)
            )
        finally:
            self._relaying.discard(relaying)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for relaying in self._relaying:
            relaying.cancel()
        await asyncio.gather(*self._relaying, return_exceptions=True)


async def test_dead_or_hung_redis_fails_fast_and_recovers() -> None:
    server = RedisServer()
    server.start()
    relay = CountingRelay(server.port)
    await relay.start()
    limiter = RedisLimiter(relay.url, timeout=0.2, backoff=0.5)

    async def hit() -> LimitResult:
        return await limiter.hit("k", "192.0.2.1", PER_SECOND_10, None, 0.0)

    async def refused_within(bound: float) -> StoreUnavailable:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await hit()
        assert time.monotonic() - start < bound
        return caught.value

    try:
        assert (await hit()).allowed

        # Hung: connected, but nothing answers. Bounded by the timeout, not by TCP.
        server.pause()
        error = await refused_within(GENEROUS)
        assert str(error) == "rate-limit store unavailable"  # no host, port or password
        assert error.__cause__ is not None

        # During the back-off: no network attempt at all.
        relay.reset()
        for _ in range(20):
            await refused_within(GENEROUS)
        assert relay.script_calls == 0

        # Back-off over, still hung: one request probes, the others keep failing fast.
        await asyncio.sleep(0.6)
        outcomes = await asyncio.gather(*(hit() for _ in range(10)), return_exceptions=True)
        assert all(isinstance(o, StoreUnavailable) for o in outcomes)
        assert relay.script_calls == 1

        # It answers again: the first request after the back-off goes through.
        server.resume()
        await asyncio.sleep(0.6)
        assert (await hit()).allowed

        # Crash: refused connections, same behaviour.
        server.kill()
        await refused_within(GENEROUS)
        await refused_within(GENEROUS)

        # Back on the same port (empty, scripts not loaded): recovers by itself.
        server.start()
        await asyncio.sleep(0.6)
        result = await hit()
        assert result.allowed
        assert result.remaining == 9  # a fresh server: a fresh bucket
    finally:
        await limiter.aclose()
        await relay.aclose()
        server.stop()
