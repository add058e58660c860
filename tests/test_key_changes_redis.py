"""Several windows and refilling quotas in the Redis store, against a real `redis-server`."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from keyproxy.config.model import Rate
from keyproxy.ratelimit import QuotaWindow
from keyproxy.ratelimit.memory import MemoryLimiter
from keyproxy.ratelimit.redis import QUOTA_GRACE_MS, RedisLimiter
from tests.redis_server import RedisServer

T0 = 1.8e9
WINDOWS = (Rate(3, 1.0, "3/second"), Rate(5, 60.0, "5/minute"), Rate(20, 3600.0, "20/hour"))


@pytest.fixture
async def stepped(redis_server: RedisServer, redis_client: Redis) -> AsyncIterator[RedisLimiter]:
    limiter = RedisLimiter(redis_server.url, timeout=2.0, use_caller_clock=True)
    yield limiter
    await limiter.aclose()


async def test_windows_and_periods_decide_as_the_memory_store(stepped: RedisLimiter) -> None:
    """One random trace through both stores: the same verdicts, windows, counts and times."""
    rng = random.Random(14)
    memory = MemoryLimiter()
    rates = {"a": WINDOWS, "b": WINDOWS[1:], "c": None, "d": Rate(2, 1.0, "2/second")}
    quotas = {"a": 30, "b": None, "c": 6, "d": 9}
    now = T0
    for step in range(500):
        now += round(rng.expovariate(2.0), 6)
        key = rng.choice("abcd")
        ip = rng.choice(["192.0.2.1", "192.0.2.2"])
        # keys a, c and d count per period, which turns over every 100 steps
        window = None if key == "b" else QuotaWindow(f"day:{step // 100}", 1000.0 - step)
        expected = memory.hit(key, ip, rates[key], quotas[key], now, window)
        got = await stepped.hit(key, ip, rates[key], quotas[key], now, window)
        assert got[:4] == expected[:4], (step, got, expected)
        assert got[6:] == expected[6:], (step, got, expected)
        for want, have in ((expected.reset, got.reset), (expected.retry_after, got.retry_after)):
            if want is None or math.isinf(want):
                assert have == want
            else:
                assert have == pytest.approx(want, abs=2e-6)


async def test_a_refused_window_spends_no_other_window(stepped: RedisLimiter) -> None:
    results = [await stepped.hit("k", "ip", WINDOWS, None, T0) for _ in range(10)]
    assert [r.allowed for r in results] == [True] * 3 + [False] * 7
    assert {r.limit for r in results[3:]} == {3}  # the second's window refuses
    # two seconds later the second window is full again and the minute window has 2 left:
    # the 7 refusals took nothing from it
    later = await stepped.hit("k", "ip", WINDOWS, None, T0 + 2)
    assert (later.allowed, later.limit, later.remaining) == (True, 5, 1)


async def test_one_round_trip_for_every_window_and_the_quota(
    stepped: RedisLimiter, redis_client: Redis
) -> None:
    await stepped.hit("k", "ip", WINDOWS, 10, T0, QuotaWindow("month:2026-12", 60.0))
    await redis_client.config_resetstat()
    for _ in range(5):
        await stepped.hit("k", "ip", WINDOWS, 10, T0, QuotaWindow("month:2026-12", 60.0))
    stats = await redis_client.info("commandstats")
    calls = {name: value["calls"] for name, value in stats.items()}
    assert calls.get("cmdstat_evalsha") == 5  # one script per request
    assert "cmdstat_eval" not in calls


async def test_a_period_counter_refills_and_expires_after_its_period(
    stepped: RedisLimiter, redis_client: Redis
) -> None:
    december = QuotaWindow("month:2026-12", 120.0)
    assert (await stepped.hit("k", "ip", None, 1, T0, december)).quota_reset == 120.0
    spent = await stepped.hit("k", "ip", None, 1, T0, december)
    assert (spent.reason, spent.retry_after, spent.quota_reset) == ("quota", 120.0, 120.0)
    january = QuotaWindow("month:2027-01", 31 * 86400.0)
    assert (await stepped.hit("k", "ip", None, 1, T0, january)).allowed
    ttl = await redis_client.pttl("keyproxy:quota:k:month:2026-12")
    assert 0 < ttl <= 120_000 + QUOTA_GRACE_MS
    # a lifetime quota's counter never expires
    await stepped.hit("k", "ip", None, 1, T0)
    assert await redis_client.pttl("keyproxy:quota:k") == -1


async def test_report_mode_through_the_awaited_store(stepped: RedisLimiter) -> None:
    """The pipeline's waiting path applies report mode exactly as the synchronous one."""
    import hashlib

    from keyproxy.checks import Pipeline, build_checks
    from keyproxy.config import parse_config
    from keyproxy.request import Headers, RequestContext

    key = "pk_" + "5" * 64
    config = parse_config(
        f"""\
upstream: {{url: "http://127.0.0.1:3000"}}
routes: [{{match: "GET /x", acl: x}}, {{match: "DELETE /x", acl: y}}]
keys:
  - {{id: k, hash: "sha256:{hashlib.sha256(key.encode()).hexdigest()}", type: read,
      acls: [x], ips: [10.0.0.0/8], rate_limit: 2/minute, mode: report}}
""",
        "t.yaml",
        {},
    )
    pipeline = Pipeline(build_checks(stepped))

    async def decide(ip: str, method: str = "GET") -> RequestContext:
        headers = Headers.from_lowered([("x-api-key", key)])
        ctx = RequestContext(config, method, "/x", headers, ip, 0.0, "t")
        outcome = pipeline.decide(ctx)
        assert outcome is not None and not hasattr(outcome, "code")  # an awaitable
        assert await outcome is None  # type: ignore[misc]
        return ctx

    inside = [await decide("10.0.0.1") for _ in range(3)]
    assert [c.would_deny and c.would_deny.code for c in inside] == [None, None, "RATE_LIMITED"]
    outside = await decide("192.0.2.1")
    assert outside.would_deny is not None and outside.would_deny.code == "IP_NOT_ALLOWED"
    assert outside.limit is not None and outside.limit.limit == 2  # still counted
