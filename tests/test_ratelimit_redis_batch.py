"""The Redis store's batching against real `redis-server` processes.

Concurrent hits share one script call; these tests check that a batch decides
exactly what the same hits sent one by one decide, and that a failing Redis
fails every waiter of a batch at once. Round trips are counted by Redis itself
(`INFO commandstats`), not by instrumenting the client.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from keyproxy.config.model import Rate
from keyproxy.ratelimit import LimitResult, QuotaWindow, StoreUnavailable
from keyproxy.ratelimit.redis import RedisLimiter
from keyproxy.ratelimit.redis_batch import MAX_BATCH
from tests.redis_server import RedisServer, free_port

T0 = 1.8e9
PER_MINUTE_3 = Rate(3, 60.0, "3/minute")
GENEROUS = 2.0  # upper bound for "did not hang" on a loaded machine


@pytest.fixture
async def redis_client(redis_client: Redis) -> Redis:
    """The shared client, with Redis's command counts reset: tests count round trips."""
    await redis_client.config_resetstat()
    return redis_client


@pytest.fixture
async def stepped(redis_server: RedisServer, redis_client: Redis) -> AsyncIterator[RedisLimiter]:
    limiter = RedisLimiter(redis_server.url, timeout=2.0, use_caller_clock=True)
    await limiter.hit("warm-up", "ip", PER_MINUTE_3, None, T0)  # connected, script loaded
    await redis_client.flushall()
    await redis_client.config_resetstat()
    yield limiter
    await limiter.aclose()


async def script_calls(client: Redis) -> int:
    """EVALSHA and EVAL calls Redis has run since the last CONFIG RESETSTAT."""
    stats = await client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


Shape = tuple[Rate | tuple[Rate, ...] | None, int | None, QuotaWindow | None]
Hit = tuple[str, str, Rate | tuple[Rate, ...] | None, int | None, float, QuotaWindow | None]


def random_trace(seed: int, n: int) -> list[Hit]:
    """Keys with one window, two windows, a quota only, a periodic quota; few IPs, so
    buckets fill up and refusals land in the middle of the batch."""
    rng = random.Random(seed)
    shapes: dict[str, Shape] = {
        "one": (PER_MINUTE_3, None, None),
        "two": ((Rate(2, 1.0, "2/second"), Rate(5, 3600.0, "5/hour")), 40, None),
        "quota": (None, 6, None),
        "monthly": (Rate(4, 10.0, "4/10s"), 9, QuotaWindow("month:2027-01", 1000.0)),
    }
    trace = []
    now = T0
    for _ in range(n):
        now += round(rng.random() * 0.5, 6)
        key = rng.choice(sorted(shapes))
        rate, quota, window = shapes[key]
        trace.append((key, rng.choice(["192.0.2.1", "192.0.2.2"]), rate, quota, now, window))
    return trace


async def test_a_batch_decides_exactly_what_sequential_hits_decide(
    stepped: RedisLimiter, redis_client: Redis
) -> None:
    trace = random_trace(7, 200)
    sequential = [await stepped.hit(*hit) for hit in trace]
    assert await script_calls(redis_client) == len(trace)
    assert 0 < sum(r.allowed for r in sequential) < len(trace)  # refusals happened

    await redis_client.flushall()
    await redis_client.config_resetstat()
    batched = await asyncio.gather(*(stepped.hit(*hit) for hit in trace))
    assert await script_calls(redis_client) == 1  # all 200 in one round trip
    assert batched == sequential


async def test_a_refusal_in_the_middle_of_a_batch_spends_nothing(
    stepped: RedisLimiter, redis_client: Redis
) -> None:
    hits = [
        ("k", "192.0.2.1", PER_MINUTE_3, 4),
        ("k", "192.0.2.1", PER_MINUTE_3, 4),
        ("k", "192.0.2.1", PER_MINUTE_3, 4),
        ("k", "192.0.2.1", PER_MINUTE_3, 4),  # bucket empty: refused, quota untouched
        ("k", "192.0.2.2", PER_MINUTE_3, 4),  # another IP: the quota's last request
        ("k", "192.0.2.3", PER_MINUTE_3, 4),  # quota spent, bucket untouched
        ("other", "192.0.2.1", PER_MINUTE_3, None),  # another key: unaffected
    ]
    results = await asyncio.gather(*(stepped.hit(k, ip, r, q, T0) for k, ip, r, q in hits))
    assert await script_calls(redis_client) == 1
    assert [r.reason for r in results] == [None, None, None, "rate", None, "quota", None]
    assert [r.remaining for r in results] == [2, 1, 0, 0, 2, 3, 2]
    assert [r.quota_remaining for r in results[:6]] == [3, 2, 1, 1, 0, 0]
    assert await redis_client.get("keyproxy:quota:k") == b"4"
    assert await redis_client.exists("keyproxy:rl:k:192.0.2.3") == 0


async def test_more_hits_than_one_script_call_takes_go_in_one_write(
    stepped: RedisLimiter, redis_client: Redis
) -> None:
    n = MAX_BATCH * 2 + 10
    rate = Rate(MAX_BATCH * 2, 60.0, "many/minute")
    results = await asyncio.gather(*(stepped.hit("k", "ip", rate, None, T0) for _ in range(n)))
    assert sum(r.allowed for r in results) == MAX_BATCH * 2
    assert [r.remaining for r in results[:3]] == [2 * MAX_BATCH - i for i in (1, 2, 3)]
    assert {r.reason for r in results[MAX_BATCH * 2 :]} == {"rate"}
    assert await script_calls(redis_client) == 3


async def test_hits_arriving_during_a_round_trip_wait_and_go_together(
    stepped: RedisLimiter, redis_client: Redis
) -> None:
    first = asyncio.ensure_future(stepped.hit("k", "ip", PER_MINUTE_3, None, T0))
    await asyncio.sleep(0)  # the first batch is sent and in flight
    later = [
        asyncio.ensure_future(stepped.hit("k", "ip", PER_MINUTE_3, None, T0)) for _ in range(5)
    ]
    results = [await first] + [await each for each in later]
    assert [r.allowed for r in results] == [True, True, True, False, False, False]
    assert await script_calls(redis_client) == 2


async def test_a_cancelled_caller_leaves_the_others_of_its_batch_answered(
    stepped: RedisLimiter,
) -> None:
    tasks = [
        asyncio.ensure_future(stepped.hit("k", "ip", PER_MINUTE_3, None, T0)) for _ in range(4)
    ]
    await asyncio.sleep(0)
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    # Redis counted the cancelled hit too (it was sent): the batch is exact, not the caller.
    assert [r.allowed for r in done if isinstance(r, LimitResult)] == [True, True, False]


async def test_ping(redis_server: RedisServer, redis_client: Redis) -> None:
    limiter = RedisLimiter(redis_server.url, timeout=2.0)
    nowhere = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    try:
        assert await limiter.ping() is True
        assert await nowhere.ping() is False
    finally:
        await limiter.aclose()
        await nowhere.aclose()


async def test_password_and_db_from_the_url() -> None:
    server = RedisServer()
    server.start()
    try:
        admin = Redis.from_url(server.url)
        await admin.config_set("requirepass", "s3cret")
        await admin.aclose()
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        limiter = RedisLimiter(url, timeout=2.0)
        wrong = RedisLimiter(f"redis://:nope@127.0.0.1:{server.port}/3", timeout=2.0)
        try:
            assert (await limiter.hit("k", "ip", PER_MINUTE_3, None, 0.0)).remaining == 2
            check = Redis.from_url(url)
            assert await check.exists("keyproxy:rl:k:ip") == 1  # in db 3
            await check.aclose()
            with pytest.raises(StoreUnavailable):
                await wrong.hit("k", "ip", PER_MINUTE_3, None, 0.0)
        finally:
            await limiter.aclose()
            await wrong.aclose()
    finally:
        server.stop()


async def hit(limiter: RedisLimiter, ip: int) -> LimitResult:
    return await limiter.hit("k", f"192.0.2.{ip}", PER_MINUTE_3, None, 0.0)


@pytest.mark.parametrize("how", ["kill", "pause"])
async def test_redis_failing_mid_batch_fails_every_waiter_without_hanging(how: str) -> None:
    """Sent and still-queued hits alike get the fail-closed answer: killed, at once
    (long before the timeout); hung, when the oldest hit's timeout is up."""
    server = RedisServer()
    server.start()
    timeout = 30.0 if how == "kill" else 0.3
    limiter = RedisLimiter(server.url, timeout=timeout, backoff=0.5)
    try:
        assert (await limiter.hit("k", "ip", PER_MINUTE_3, None, 0.0)).allowed  # connected
        server.pause()
        start = time.monotonic()
        sent = [asyncio.ensure_future(hit(limiter, i)) for i in range(20)]
        await asyncio.sleep(0.05)  # the batch is written, Redis does not answer
        queued = [asyncio.ensure_future(hit(limiter, i)) for i in range(20)]
        await asyncio.sleep(0)
        if how == "kill":
            server.kill()
        outcomes = await asyncio.wait_for(
            asyncio.gather(*sent, *queued, return_exceptions=True), GENEROUS + timeout / 10
        )
        elapsed = time.monotonic() - start
        assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        assert elapsed < GENEROUS
        if how == "pause":
            assert elapsed >= 0.3  # the timeout, not an earlier guess
            server.resume()
    finally:
        await limiter.aclose()
        server.stop()


async def test_redis_restarted_after_a_failed_batch_is_used_again() -> None:
    server = RedisServer()
    server.start()
    limiter = RedisLimiter(server.url, timeout=0.5, backoff=0.2)
    try:
        await asyncio.gather(*(limiter.hit("k", "ip", PER_MINUTE_3, None, 0.0) for _ in range(3)))
        server.kill()
        outcomes = await asyncio.gather(
            *(limiter.hit("k", "ip", PER_MINUTE_3, None, 0.0) for _ in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(o, StoreUnavailable) for o in outcomes)
        server.start()
        await asyncio.sleep(0.3)  # the back-off is over: the next hit probes
        assert (await limiter.hit("k", "ip", PER_MINUTE_3, None, 0.0)).remaining == 2  # fresh
        results = await asyncio.gather(
            *(limiter.hit("k", "ip", PER_MINUTE_3, None, 0.0) for _ in range(3))
        )
        assert [r.allowed for r in results] == [True, True, False]
    finally:
        await limiter.aclose()
        server.stop()


async def test_a_connection_that_cannot_even_start_fails_the_waiters() -> None:
    """A host name that cannot be encoded raises ValueError, not OSError: the waiters
    must still fail (and fail closed), never wait for good."""
    limiter = RedisLimiter("redis://a..b:6379/0", timeout=0.1)
    try:
        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(limiter.hit("k", "ip", PER_MINUTE_3, None, T0), 2.0)
    finally:
        await limiter.aclose()
