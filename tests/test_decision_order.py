"""docs/decision.md: the decision runs in order, so a request that breaks two rules gets the
refusal of the earlier step. Each case breaks exactly two rules."""

from __future__ import annotations

import hashlib
import time

import pytest

from keyproxy.checks import Pipeline, build_checks
from keyproxy.config import parse_config
from keyproxy.ratelimit import open_limiter
from keyproxy.request import Headers, RequestContext

KEYS = {name: f"pk_{name}_" + "0" * 40 for name in ("fenced", "revoked", "reader", "spent")}


def _hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


CONFIG = f"""\
upstream:
  url: http://127.0.0.1:3000
routes:
  - {{match: "GET /v1/data/{{table}}", acl: get}}
  - {{match: "DELETE /v1/data/{{table}}", acl: delete}}
  - {{match: "GET /v1/admin/{{x}}", acl: admin}}
keys:
  - id: fenced
    hash: {_hash(KEYS["fenced"])}
    type: read
    acls: [get]
    ips: [10.0.0.0/8]
    referers: ["https://app.example/*"]
  - {{id: revoked, hash: {_hash(KEYS["revoked"])}, type: read, acls: [get], ips: [10.0.0.0/8],
      revoked: true}}
  - {{id: reader, hash: {_hash(KEYS["reader"])}, type: read, acls: [get]}}
  - {{id: spent, hash: {_hash(KEYS["spent"])}, type: read, acls: [get], rate_limit: 1/minute}}
"""


@pytest.fixture(scope="module")
def decide():
    config = parse_config(CONFIG, "order.yaml", {})
    pipeline = Pipeline(build_checks(open_limiter(config.rate_limits)))

    def run(key: str, method: str, path: str, ip: str = "10.1.2.3", referer: str = "") -> str:
        headers = [("x-api-key", KEYS[key])] + ([("referer", referer)] if referer else [])
        ctx = RequestContext(
            config, method, path, Headers.from_lowered(headers), ip, time.time(), "t"
        )
        deny = pipeline.decide(ctx)  # synchronous: the memory store never waits
        return "allowed" if deny is None else f"{deny.status} {deny.code}: {deny.message}"

    return run


GOOD_REFERER = "https://app.example/page"


@pytest.mark.parametrize(
    ("key", "method", "path", "ip", "referer", "expected"),
    [
        # 1 credential before 2 constraints
        ("revoked", "GET", "/v1/data/posts", "192.0.2.1", "", "401 TOKEN_REVOKED"),
        # 2 constraints (IP, then Referer) before 3 route
        ("fenced", "GET", "/nowhere", "192.0.2.1", GOOD_REFERER, "403 IP_NOT_ALLOWED"),
        (
            "fenced",
            "GET",
            "/v1/data/posts",
            "192.0.2.1",
            "https://evil.example/",
            "403 IP_NOT_ALLOWED",
        ),
        (
            "fenced",
            "GET",
            "/nowhere",
            "10.1.2.3",
            "https://evil.example/",
            "403 REFERER_NOT_ALLOWED",
        ),
        # 3 route before 4 key type
        ("reader", "DELETE", "/nowhere", "10.1.2.3", "", "403 ROUTE_NOT_ALLOWED"),
        # 4 key type before 5 ACL (the reader lacks `delete` too)
        ("reader", "DELETE", "/v1/data/posts", "10.1.2.3", "", "read keys cannot write"),
    ],
)
def test_the_earlier_step_refuses(decide, key, method, path, ip, referer, expected) -> None:
    assert expected in decide(key, method, path, ip, referer)


def test_acl_before_rate_limit_and_refusals_spend_nothing(decide) -> None:
    """Step 8 runs last: requests refused earlier never reach the limiter, and once
    the limit is spent an ACL refusal is still an ACL refusal, not a 429."""
    for _ in range(3):
        assert "lacks the ACL 'admin'" in decide("spent", "GET", "/v1/admin/x")
    assert decide("spent", "GET", "/v1/data/posts") == "allowed"  # the 1 per minute
    assert "429 RATE_LIMITED" in decide("spent", "GET", "/v1/data/posts")
    assert "lacks the ACL 'admin'" in decide("spent", "GET", "/v1/admin/x")
