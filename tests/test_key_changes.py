"""Report mode, refilling quotas and several windows, through the pipeline and the
memory store with clocks passed in (no sleeping, no wall clock)."""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime

import pytest

from keyproxy.checks import Pipeline, build_checks
from keyproxy.checks.limits import RateLimitCheck
from keyproxy.commands.explain import explain, render
from keyproxy.config import parse_config
from keyproxy.config.model import Config, Rate
from keyproxy.ratelimit import QuotaWindow, quota_window
from keyproxy.ratelimit.memory import MemoryLimiter
from keyproxy.request import Deny, Headers, RequestContext

KEYS = {name: f"pk_{name}_" + "0" * 40 for name in ("watched", "monthly", "lifetime", "windows")}


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def config_text(mode: str = "report") -> str:
    return f"""\
upstream:
  url: http://127.0.0.1:3000
routes:
  - {{match: "GET /v1/data/{{table}}", acl: get}}
  - {{match: "DELETE /v1/data/{{table}}", acl: delete}}
keys:
  - {{id: watched, hash: {sha(KEYS["watched"])}, type: read, acls: [get], ips: [10.0.0.0/8],
      rate_limit: 3/minute, mode: {mode}}}
  - {{id: monthly, hash: {sha(KEYS["monthly"])}, type: read, quota: 2/month}}
  - {{id: lifetime, hash: {sha(KEYS["lifetime"])}, type: read, quota: 2}}
  - {{id: windows, hash: {sha(KEYS["windows"])}, type: read,
      rate_limit: [5/second, 3/hour]}}
"""


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


class Clock:
    """The limiter's monotonic clock, stepped by the test."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pipeline_with(limiter: MemoryLimiter, clock: Clock) -> Pipeline:
    checks = build_checks(limiter)
    for check in checks:
        if isinstance(check.run, RateLimitCheck):
            check.run.clock = clock
    return Pipeline(checks)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pipeline(clock: Clock) -> Pipeline:
    return pipeline_with(MemoryLimiter(), clock)


def request(
    config: Config,
    key: str,
    now: float,
    *,
    method: str = "GET",
    path: str = "/v1/data/posts",
    ip: str = "10.1.2.3",
) -> RequestContext:
    headers = Headers.from_lowered([("x-api-key", KEYS.get(key, key))])
    return RequestContext(config, method, path, headers, ip, now, "t")


def decide(pipeline: Pipeline, ctx: RequestContext) -> Deny | None:
    outcome = pipeline.decide(ctx)
    assert outcome is None or isinstance(outcome, Deny)  # the memory store never waits
    return outcome


# -- periods ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "now", "label", "ends"),
    [
        ("day", utc(2026, 12, 4, 5, 30), "day:2026-12-04", utc(2026, 12, 5)),
        ("day", utc(2026, 12, 4), "day:2026-12-04", utc(2026, 12, 5)),
        ("week", utc(2026, 12, 4, 5), "week:2026-11-30", utc(2026, 12, 7)),  # a Friday
        ("week", utc(2026, 12, 7), "week:2026-12-07", utc(2026, 12, 14)),  # a Monday
        ("week", utc(2026, 12, 6, 23, 59, 59), "week:2026-11-30", utc(2026, 12, 7)),
        ("month", utc(2026, 12, 31, 23, 59, 59), "month:2026-12", utc(2027, 1, 1)),
        ("month", utc(2027, 1, 1), "month:2027-01", utc(2027, 2, 1)),
        ("month", utc(2028, 2, 29, 12), "month:2028-02", utc(2028, 3, 1)),
    ],
)
def test_quota_periods_start_at_the_utc_period_start(
    period: str, now: float, label: str, ends: float
) -> None:
    assert quota_window(period, now) == QuotaWindow(label, ends - now)


# -- refilling quotas ------------------------------------------------------------------------


def test_a_monthly_quota_refills_at_the_month_boundary(pipeline: Pipeline, clock: Clock) -> None:
    config = parse_config(config_text(), "t.yaml", {})
    before = utc(2026, 12, 31, 23, 59, 0)
    first = request(config, "monthly", before)
    assert decide(pipeline, first) is None
    assert first.limit is not None
    assert (first.limit.quota, first.limit.quota_remaining) == (2, 1)
    assert first.limit.quota_reset == 60.0
    # another client address spends the same quota
    assert decide(pipeline, request(config, "monthly", before + 1, ip="192.0.2.7")) is None
    spent = decide(pipeline, request(config, "monthly", before + 30))
    assert spent is not None and (spent.status, spent.code) == (429, "QUOTA_EXCEEDED")
    assert spent.headers == (("Retry-After", "30"),)
    clock.now += 60  # the limiter's clock moves too, but the period follows ctx.now
    after = request(config, "monthly", utc(2027, 1, 1))
    assert decide(pipeline, after) is None
    assert after.limit is not None and after.limit.quota_remaining == 1
    assert after.limit.quota_reset == 31 * 86400


def test_a_lifetime_quota_never_refills_and_says_no_retry(pipeline: Pipeline) -> None:
    config = parse_config(config_text(), "t.yaml", {})
    now = utc(2026, 12, 31, 23, 59)
    for _ in range(2):
        ctx = request(config, "lifetime", now)
        assert decide(pipeline, ctx) is None
        assert ctx.limit is not None and ctx.limit.quota_reset is None
    for later in (now, utc(2027, 1, 1), utc(2030, 1, 1)):
        spent = decide(pipeline, request(config, "lifetime", later))
        assert spent is not None and spent.code == "QUOTA_EXCEEDED" and spent.headers == ()


# -- several windows -----------------------------------------------------------------------


def test_every_window_must_allow_and_the_headers_show_the_tightest(
    pipeline: Pipeline, clock: Clock
) -> None:
    config = parse_config(config_text(), "t.yaml", {})
    seen = []
    for _ in range(3):
        ctx = request(config, "windows", 0.0)
        assert decide(pipeline, ctx) is None
        assert ctx.limit is not None
        seen.append((ctx.limit.limit, ctx.limit.remaining))
    assert seen == [(3, 2), (3, 1), (3, 0)]  # the hour window has less left than the second's
    refused = decide(pipeline, request(config, "windows", 0.0))
    assert refused is not None and refused.code == "RATE_LIMITED"
    assert refused.headers == (("Retry-After", "1200"),)  # one slot of 3/hour


def test_a_refused_request_costs_the_other_windows_nothing() -> None:
    limiter = MemoryLimiter()
    second, hour = Rate(2, 1.0, "2/second"), Rate(100, 3600.0, "100/hour")
    windows = (second, hour)
    results = [limiter.hit("k", "ip", windows, None, 0.0) for _ in range(10)]
    assert [r.allowed for r in results] == [True, True] + [False] * 8
    assert results[-1].limit == 2 and results[-1].retry_after == pytest.approx(0.5)
    # eight refusals later, the hour window holds the two allowed requests only:
    # 98 left after a third one, not 90
    # (a generous first window at the same position, so the hour window is the tightest)
    after = limiter.hit("k", "ip", (Rate(1000, 1.0, "1000/second"), hour), None, 1.0)
    assert after.allowed and (after.limit, after.remaining) == (100, 97)


def test_a_spent_quota_with_windows_spends_no_window() -> None:
    limiter = MemoryLimiter()
    windows = (Rate(10, 1.0, "10/second"), Rate(100, 3600.0, "100/hour"))
    assert limiter.hit("k", "ip", windows, 1, 0.0).allowed
    spent = limiter.hit("k", "ip", windows, 1, 0.0)
    assert (spent.allowed, spent.reason, spent.retry_after) == (False, "quota", math.inf)
    assert spent.remaining == 9  # the tightest window, untouched by the refusal
    window = QuotaWindow("day:2026-12-04", 42.0)
    assert limiter.hit("k", "ip", windows, 1, 0.0, window).allowed  # a new period
    again = limiter.hit("k", "ip", windows, 1, 0.0, window)
    assert (again.reason, again.retry_after, again.quota_reset) == ("quota", 42.0, 42.0)
    assert limiter.hit("k", "ip", windows, 1, 0.0, QuotaWindow("day:2026-12-05", 9.0)).allowed


# -- report mode -------------------------------------------------------------------------------


def test_report_mode_records_the_refusal_and_lets_the_request_through(
    pipeline: Pipeline,
) -> None:
    config = parse_config(config_text(), "t.yaml", {})
    outside = request(config, "watched", 0.0, ip="192.0.2.1")
    assert decide(pipeline, outside) is None
    assert outside.would_deny is not None and outside.would_deny.code == "IP_NOT_ALLOWED"
    # the first refusal is the one recorded; later steps still run (the ACL would refuse too)
    both = request(config, "watched", 0.0, ip="192.0.2.1", method="DELETE")
    assert decide(pipeline, both) is None
    assert both.would_deny is not None and both.would_deny.code == "IP_NOT_ALLOWED"
    fine = request(config, "watched", 0.0)
    assert decide(pipeline, fine) is None and fine.would_deny is None
    # step 1 and the route are always enforced
    unknown = decide(pipeline, request(config, "pk_nobody_" + "0" * 40, 0.0))
    assert unknown is not None and unknown.code == "INVALID_TOKEN"
    nowhere = decide(pipeline, request(config, "watched", 0.0, path="/admin"))
    assert nowhere is not None and nowhere.code == "ROUTE_NOT_ALLOWED"
    bad_path = decide(pipeline, request(config, "watched", 0.0, path="/v1/data/%2e%2e"))
    assert bad_path is not None and bad_path.status == 400


def test_report_then_enforce_keeps_the_counters(clock: Clock) -> None:
    limiter = MemoryLimiter()
    pipeline = pipeline_with(limiter, clock)
    report = parse_config(config_text("report"), "t.yaml", {})
    outcomes = []
    for _ in range(5):
        ctx = request(report, "watched", 0.0)
        outcomes.append((decide(pipeline, ctx), ctx.would_deny and ctx.would_deny.code))
    assert outcomes == [(None, None)] * 3 + [(None, "RATE_LIMITED")] * 2
    enforce = parse_config(config_text("enforce"), "t.yaml", {})  # the edited file
    refused = decide(pipeline, request(enforce, "watched", 0.0))
    assert refused is not None and refused.code == "RATE_LIMITED"  # no fresh bucket
    clock.now += 20  # one slot of 3/minute
    assert decide(pipeline, request(enforce, "watched", 0.0)) is None


async def test_explain_shows_what_report_mode_would_deny() -> None:
    config = parse_config(config_text(), "t.yaml", {})
    result = await explain(
        config, "DELETE", "/v1/data/posts", key=KEYS["watched"], ip="192.0.2.1", now=0.0
    )
    assert result.allowed
    text = render(result, "DELETE", "/v1/data/posts", config)
    assert "WOULD 2 key constraints" in text and "would deny (report mode)" in text
    assert "WOULD 4 key type" in text  # every step is shown, as the live decision runs it
    assert "verdict: ALLOW" in text
    assert "would deny (report mode): 403 IP_NOT_ALLOWED" in text
