"""The memory store's GCRA and quota, driven with explicit clock values."""

from __future__ import annotations

import math
import random

import pytest

from keyproxy.config.model import Rate, RateLimitSettings
from keyproxy.ratelimit import TOLERANCE, UNLIMITED, LimitResult, ip_bucket, open_limiter
from keyproxy.ratelimit.memory import MemoryLimiter

T0 = 1000.0


def rate(limit: int, period: float) -> Rate:
    return Rate(limit, period, f"{limit}/{period}s")


PER_MINUTE_10 = rate(10, 60.0)  # one request every 6 s, bucket of 10


@pytest.fixture
def limiter() -> MemoryLimiter:
    return MemoryLimiter(max_buckets=1000)


def burst(limiter: MemoryLimiter, n: int, now: float, **kw: object) -> list[LimitResult]:
    args = {"key_id": "k", "client_ip": "192.0.2.1", "rate": PER_MINUTE_10, "quota": None}
    args.update(kw)
    return [limiter.hit(now=now, **args) for _ in range(n)]  # type: ignore[arg-type]


def test_burst_of_simultaneous_requests_lets_exactly_n_through(limiter: MemoryLimiter) -> None:
    results = burst(limiter, 25, T0)
    assert [r.allowed for r in results] == [True] * 10 + [False] * 15
    assert [r.remaining for r in results[:10]] == list(range(9, -1, -1))
    assert {r.reason for r in results[10:]} == {"rate"}
    assert all(r.limit == 10 for r in results)


@pytest.mark.parametrize("uptime", [0.0, 12345.678, 1e7 + 0.123456])
@pytest.mark.parametrize(
    ("limit", "period"),
    [
        (1, 1),
        (3, 1),
        (7, 1),
        (10, 60),
        (13, 3600),
        (99, 86400),
        (333, 1),
        (3000, 1),
        (30_001, 3600),
    ],
)
def test_exact_burst_despite_float_rounding(limit: int, period: float, uptime: float) -> None:
    """period/N is rarely exact in binary; the N-th request must still pass, the N+1-th not.

    `uptime`: how long after its first request the limiter sees the burst (float
    precision falls as stored times grow).
    """
    limiter = MemoryLimiter()
    limiter.hit("first", "ip", rate(1, 1), None, 5000.0)
    r = rate(limit, period)
    now = 5000.0 + uptime
    allowed = sum(limiter.hit("k", "ip", r, None, now).allowed for _ in range(limit + 5))
    assert allowed == limit


def test_values_reported_while_allowed(limiter: MemoryLimiter) -> None:
    first = limiter.hit("k", "ip", PER_MINUTE_10, None, T0)
    assert first == LimitResult(True, None, 10, 9, pytest.approx(6.0), 0.0, None, None)
    second = limiter.hit("k", "ip", PER_MINUTE_10, None, T0 + 1)
    # Bucket: 10 - 1 + 1/6 refilled - 1 = 8.17 -> 8 whole requests; full again 11 s later.
    assert second.remaining == 8
    assert second.reset == pytest.approx(11.0)


def test_values_reported_when_refused(limiter: MemoryLimiter) -> None:
    burst(limiter, 10, T0)
    refused = limiter.hit("k", "192.0.2.1", PER_MINUTE_10, None, T0 + 2)
    assert not refused.allowed
    assert refused.reason == "rate"
    assert refused.remaining == 0
    assert refused.retry_after == pytest.approx(4.0)  # the next 1/10 refills at T0 + 6
    assert refused.reset == pytest.approx(58.0)  # full again at T0 + 60


def test_refill_is_continuous(limiter: MemoryLimiter) -> None:
    burst(limiter, 10, T0)
    assert not limiter.hit("k", "192.0.2.1", PER_MINUTE_10, None, T0 + 5.9).allowed
    assert limiter.hit("k", "192.0.2.1", PER_MINUTE_10, None, T0 + 6.0).allowed
    assert not limiter.hit("k", "192.0.2.1", PER_MINUTE_10, None, T0 + 6.0).allowed
    # Half the period gives half the bucket back (minus the one just taken at +6).
    assert sum(r.allowed for r in burst(limiter, 10, T0 + 30)) == 4
    # A whole idle period refills the bucket completely, and no further.
    assert sum(r.allowed for r in burst(limiter, 20, T0 + 1000)) == 10


def test_no_double_burst_at_window_edges(limiter: MemoryLimiter) -> None:
    """A fixed window would allow 10 at 59.9 s and 10 more at 60.1 s; GCRA allows 10 in all."""
    assert sum(r.allowed for r in burst(limiter, 10, T0 + 59.9)) == 10
    assert sum(r.allowed for r in burst(limiter, 10, T0 + 60.1)) == 0


def test_no_window_ever_holds_more_than_the_bucket_plus_its_refill() -> None:
    """Over random arrivals: any span of L seconds admits at most N + L/interval requests.

    (Plus the rounding tolerance: a request may pass 1 % of an interval early.)
    """
    rng = random.Random(7)
    limiter = MemoryLimiter()
    r = rate(5, 10.0)
    interval = 2.0
    now, admitted = T0, []
    for _ in range(3000):
        now += rng.expovariate(2.0)
        if limiter.hit("k", "ip", r, None, now).allowed:
            admitted.append(now)
    assert len(admitted) > 100
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            span = admitted[j] - start
            assert j - i + 1 <= r.limit + math.floor(span / interval + TOLERANCE)


def test_quota_counts_per_key_across_ips_and_then_refuses(limiter: MemoryLimiter) -> None:
    results = [limiter.hit("k", f"192.0.2.{i}", None, 3, T0) for i in range(5)]
    assert [r.allowed for r in results] == [True, True, True, False, False]
    assert [r.quota_remaining for r in results] == [2, 1, 0, 0, 0]
    spent = results[3]
    assert spent.reason == "quota"
    assert spent.quota == 3
    assert spent.retry_after == math.inf
    assert spent.limit is None and spent.remaining is None
    # Forever: no amount of time gives it back.
    assert limiter.hit("k", "192.0.2.9", None, 3, T0 + 10**9).reason == "quota"
    # Another key's quota is untouched.
    assert limiter.hit("other", "192.0.2.1", None, 3, T0).quota_remaining == 2


def test_rate_refusal_does_not_spend_quota(limiter: MemoryLimiter) -> None:
    r = rate(2, 60.0)
    results = [limiter.hit("k", "ip", r, 5, T0) for _ in range(10)]
    assert sum(x.allowed for x in results) == 2
    assert results[-1].reason == "rate"
    assert results[-1].quota_remaining == 3
    results = [limiter.hit("k", "ip", r, 5, T0 + 60) for _ in range(10)]
    assert sum(x.allowed for x in results) == 2
    assert results[-1].quota_remaining == 1
    last = [limiter.hit("k", "ip", r, 5, T0 + 120) for _ in range(3)]
    assert [x.reason for x in last] == [None, "quota", "quota"]


def test_quota_refusal_does_not_spend_the_bucket(limiter: MemoryLimiter) -> None:
    assert limiter.hit("k", "ip", PER_MINUTE_10, 1, T0).remaining == 9
    refused = limiter.hit("k", "ip", PER_MINUTE_10, 1, T0)
    assert refused.reason == "quota"
    assert refused.limit == 10
    assert refused.remaining == 9  # still 9 in the bucket: nothing was taken
    assert refused.quota_remaining == 0


def test_buckets_are_per_key_and_per_ip(limiter: MemoryLimiter) -> None:
    burst(limiter, 10, T0, key_id="a", client_ip="192.0.2.1")
    assert not limiter.hit("a", "192.0.2.1", PER_MINUTE_10, None, T0).allowed
    assert limiter.hit("a", "192.0.2.2", PER_MINUTE_10, None, T0).allowed
    assert limiter.hit("b", "192.0.2.1", PER_MINUTE_10, None, T0).allowed


def test_unlimited_key_costs_nothing(limiter: MemoryLimiter) -> None:
    assert limiter.hit("k", "ip", None, None, T0) is UNLIMITED
    assert UNLIMITED.allowed and UNLIMITED.retry_after == 0.0
    assert len(limiter) == 0


def test_lru_bound_holds_under_a_flood_of_distinct_ips() -> None:
    limiter = MemoryLimiter(max_buckets=100)
    burst(limiter, 10, T0, client_ip="victim")
    assert not limiter.hit("k", "victim", PER_MINUTE_10, None, T0).allowed
    for i in range(1000):
        limiter.hit("k", f"10.0.{i // 256}.{i % 256}", PER_MINUTE_10, None, T0)
        assert len(limiter) <= 100
    assert len(limiter) == 100
    # The documented trade-off: an evicted bucket starts full again.
    assert limiter.hit("k", "victim", PER_MINUTE_10, None, T0).allowed


def test_recently_used_buckets_survive_eviction() -> None:
    limiter = MemoryLimiter(max_buckets=10)
    burst(limiter, 10, T0, client_ip="busy")
    for i in range(50):
        limiter.hit("k", f"10.0.0.{i}", PER_MINUTE_10, None, T0)
        limiter.hit("k", "busy", PER_MINUTE_10, None, T0)  # refused, but touched
    assert not limiter.hit("k", "busy", PER_MINUTE_10, None, T0).allowed


def test_state_survives_a_changed_rate(limiter: MemoryLimiter) -> None:
    burst(limiter, 10, T0)
    # Reload: same key, now 20/minute. The bucket is not reset by the new configuration.
    assert not limiter.hit("k", "192.0.2.1", rate(20, 60.0), None, T0).allowed
    assert limiter.hit("k", "192.0.2.1", rate(20, 60.0), None, T0 + 3.0).allowed


def test_shorter_period_after_reload_does_not_block_for_the_old_one(
    limiter: MemoryLimiter,
) -> None:
    hourly = rate(10, 3600.0)
    burst(limiter, 10, T0, rate=hourly)
    assert not limiter.hit("k", "192.0.2.1", hourly, None, T0 + 1).allowed
    per_second = rate(10, 1.0)
    refused = limiter.hit("k", "192.0.2.1", per_second, None, T0 + 1)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(0.1)
    assert sum(r.allowed for r in burst(limiter, 20, T0 + 3, rate=per_second)) == 10


def test_lowered_quota_applies_to_what_was_already_used(limiter: MemoryLimiter) -> None:
    for _ in range(5):
        limiter.hit("k", "ip", None, 10, T0)
    assert limiter.hit("k", "ip", None, 4, T0).reason == "quota"
    assert limiter.hit("k", "ip", None, 10, T0).quota_remaining == 4


def test_ip_bucket_prefixes_are_configurable_per_family() -> None:
    assert ip_bucket("192.0.2.7", 24, 64) == "192.0.2.0/24"
    assert ip_bucket("192.0.2.7", 32, 64) == "192.0.2.7"
    assert ip_bucket("::ffff:192.0.2.7", 16, 64) == "192.0.0.0/16"
    assert ip_bucket("2001:db8:1:2:aaaa::1", 32, 48) == "2001:db8:1::/48"
    assert ip_bucket("2001:db8:1:2:aaaa::1", 32, 56) == "2001:db8:1::/56"
    assert ip_bucket("2001:db8:1:2:aaaa::1", 32, 128) == "2001:db8:1:2:aaaa::1"
    assert ip_bucket("2001:db8:1:2:aaaa::1", 32, 127) == "2001:db8:1:2:aaaa::/127"


def test_ip_bucket_groups_ipv6_by_64_and_unmaps_ipv4() -> None:
    assert ip_bucket("192.0.2.7") == "192.0.2.7"
    assert ip_bucket("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert ip_bucket("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert ip_bucket("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert ip_bucket("::ffff:192.0.2.7") == "192.0.2.7"
    assert ip_bucket("fe80::1%eth0") == "fe80::/64"
    assert ip_bucket("not-an-ip") == "not-an-ip"


async def test_open_limiter_picks_the_store() -> None:
    memory = open_limiter(RateLimitSettings(store="memory", max_buckets=5))
    assert isinstance(memory, MemoryLimiter)
    await memory.aclose()

    from keyproxy.ratelimit.redis import RedisLimiter

    shared = open_limiter(RateLimitSettings(store="redis://127.0.0.1:1/0"))
    assert isinstance(shared, RedisLimiter)
    await shared.aclose()

    with pytest.raises(ValueError):
        open_limiter(RateLimitSettings(store="memcached://x"))
