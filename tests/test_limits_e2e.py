"""Who may call, and how often — through real keyproxy processes (decision steps 2 and 8,
docs/decision.md)."""

from __future__ import annotations

import copy
import http.client
import json
import threading
import time
from collections import Counter

import pytest

from tests.proxy_process import KEYS, Keyproxy, base_config, digest
from tests.redis_server import RedisServer, start_redis

LIMITED = "pk_" + "7" * 64


def config_with(upstream, **key_fields) -> dict:
    config = base_config(upstream.url, upstream.inject())
    config["keys"].append({"id": "limited", "hash": digest(LIMITED), "type": "read", **key_fields})
    return config


def get(
    kp: Keyproxy,
    path: str = "/echo/x",
    key: str = LIMITED,
    source: str = "127.0.0.1",
    headers: dict | None = None,
) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection(kp.host, kp.port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"X-API-Key": key, **(headers or {})})
        resp = conn.getresponse()
        body = resp.read()
        data = (
            json.loads(body)
            if resp.getheader("content-type", "").startswith("application/json")
            else {}
        )
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


# -- referer and IP allowlists --------------------------------------------------------


def test_referer_allowlist(make, upstream):
    kp = make(config_with(upstream, referers=["https://*.example.com/*"]))
    status, _, data = get(kp)
    assert status == 403 and data["error"] == "REFERER_NOT_ALLOWED"
    assert get(kp, headers={"Referer": "https://app.example.com/page?x=1"})[0] == 200
    for bad in (
        "https://example.com.evil.com/",
        "https://evil.com/?https://app.example.com/",
        "https://app.example.com@evil.com/",
        "http://app.example.com/",
        "https://example.com/",
    ):
        status, _, data = get(kp, headers={"Referer": bad})
        assert (status, data["error"]) == (403, "REFERER_NOT_ALLOWED"), bad


def test_ip_allowlist_with_loopback_aliases(make, upstream):
    kp = make(config_with(upstream, ips=["127.0.0.2/32", "::1/128"]))
    status, _, data = get(kp, source="127.0.0.1")
    assert status == 403 and data["error"] == "IP_NOT_ALLOWED"
    assert get(kp, source="127.0.0.2")[0] == 200


#: The same chains of trust as the former hop counts 0, 1 and 2 (the test client is 127.0.0.1).
TRUST_DEPTHS = {0: 0, 1: ["127.0.0.1"], 2: ["127.0.0.1", "203.0.113.0/24"]}


@pytest.mark.parametrize("trusted", [0, 1, 2])
def test_trusted_proxies_decide_the_client_address(make, upstream, trusted):
    config = config_with(upstream, ips=["203.0.113.0/24"])
    config["server"]["trusted_proxies"] = TRUST_DEPTHS[trusted]
    kp = make(config)
    chain = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
    status = get(kp, headers=chain)[0]
    # 0: the socket peer (127.0.0.1); 1: the last hop; 2: the one before it
    assert status == {0: 403, 1: 200, 2: 403}[trusted]
    if trusted:
        status, _, data = get(kp, headers={"X-Forwarded-For": "not-an-ip"})
        assert (status, data["error"]) == (400, "INVALID_FORWARDED_FOR")
        status, _, data = get(kp, headers={**chain, "Forwarded": "for=192.0.2.1"})
        assert (status, data["error"]) == (400, "INVALID_FORWARDED_FOR")


def test_a_direct_client_cannot_forge_x_forwarded_for(make, upstream):
    """Only 127.0.0.2 is a trusted proxy: a client connecting from 127.0.0.1 itself writes
    `X-Forwarded-For: 10.1.2.3` to pass a 10.0.0.0/8 allowlist or to get a fresh rate-limit
    bucket per request. Neither works; the same header from the proxy is believed."""
    config = config_with(upstream, ips=["10.0.0.0/8", "127.0.0.1"], rate_limit="3/minute")
    config["keys"].append(
        {
            "id": "tenants",
            "hash": digest(KEYS["reader"] + "x"),
            "type": "read",
            "ips": ["10.0.0.0/8"],
        }
    )
    config["server"]["trusted_proxies"] = ["127.0.0.2"]
    kp = make(config)
    forged = {"X-Forwarded-For": "10.1.2.3"}
    status, _, data = get(kp, key=KEYS["reader"] + "x", headers=forged)
    assert (status, data["error"]) == (403, "IP_NOT_ALLOWED")
    assert "127.0.0.1" in data["message"]
    status, _, data = get(kp, key=KEYS["reader"] + "x", headers={"Forwarded": "for=10.1.2.3"})
    assert (status, data["error"]) == (403, "IP_NOT_ALLOWED")
    # through the trusted proxy the same header names the client
    assert get(kp, key=KEYS["reader"] + "x", headers=forged, source="127.0.0.2")[0] == 200
    # a forged address per request does not buy a fresh bucket: all count as 127.0.0.1
    statuses = [get(kp, headers={"X-Forwarded-For": f"10.9.9.{i}"})[0] for i in range(1, 6)]
    assert statuses == [200, 200, 200, 429, 429]


def test_rate_limit_buckets_group_clients_by_the_configured_prefix(make, upstream):
    config = config_with(upstream, rate_limit="2/minute")
    config["rate_limits"] = {"ipv4_prefix": 24}
    kp = make(config)
    # 127.0.0.1 and 127.0.0.3 are one /24: one bucket of 2
    assert [get(kp, source=s)[0] for s in ("127.0.0.1", "127.0.0.3", "127.0.0.4")] == [
        200,
        200,
        429,
    ]


# -- rate limits and quotas -------------------------------------------------------------


def test_rate_limit_headers_then_429_with_retry_after(make, upstream):
    kp = make(config_with(upstream, rate_limit="5/minute"))
    remaining = []
    for _ in range(5):
        status, headers, _ = get(kp)
        assert status == 200
        assert headers["x-ratelimit-limit"] == "5"
        remaining.append(int(headers["x-ratelimit-remaining"]))
        assert 0 < int(headers["x-ratelimit-reset"]) <= 60
    assert remaining == [4, 3, 2, 1, 0]
    status, headers, data = get(kp)
    assert status == 429 and data["error"] == "RATE_LIMITED"
    assert 1 <= int(headers["retry-after"]) <= 12
    assert headers["x-ratelimit-remaining"] == "0"
    # another client address has its own bucket
    assert get(kp, source="127.0.0.3")[0] == 200
    # keys without a limit carry no rate-limit headers
    status, headers, _ = get(kp, key=KEYS["reader"])
    assert status == 200 and "x-ratelimit-limit" not in headers


def test_exactly_n_of_a_concurrent_burst_pass(make, upstream):
    kp = make(config_with(upstream, rate_limit="10/minute"))
    results: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(30)

    def one() -> None:
        barrier.wait()
        status = get(kp)[0]
        with lock:
            results.append(status)

    threads = [threading.Thread(target=one) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert Counter(results) == {200: 10, 429: 20}


def test_quota_is_spent_across_addresses_and_survives_reload(make, upstream):
    config = config_with(upstream, quota=3)
    kp = make(config)
    seen = []
    for source in ("127.0.0.1", "127.0.0.4", "127.0.0.5"):
        status, headers, _ = get(kp, source=source)
        assert status == 200
        seen.append(headers["x-quota-remaining"])
    assert seen == ["2", "1", "0"]
    edited = copy.deepcopy(config)
    edited["keys"][0]["revoked"] = True  # an unrelated edit
    kp.rewrite_config(edited)
    deadline = time.monotonic() + 3
    while get(kp, key=KEYS["reader"])[0] != 401 and time.monotonic() < deadline:
        time.sleep(0.05)
    status, _, data = get(kp)
    assert status == 429 and "quota" in data["message"]


# -- shared limits in Redis --------------------------------------------------------------


@pytest.fixture
def redis_server():
    server = start_redis()
    yield server
    server.stop()


def test_two_replicas_share_one_limit_in_redis(make, upstream, redis_server: RedisServer):
    config = config_with(upstream, rate_limit="10/minute", quota=1000)
    config["rate_limits"] = {"store": redis_server.url}
    first = make(config)
    second_config = copy.deepcopy(config)
    from tests.procs import free_port

    second_config["server"]["listen"] = f"127.0.0.1:{free_port()}"
    second_config["server"]["admin_listen"] = f"127.0.0.1:{free_port()}"
    second = make(second_config)
    statuses = [get(kp)[0] for _ in range(8) for kp in (first, second)]
    assert Counter(statuses) == {200: 10, 429: 6}


@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_redis_dying_never_hangs_a_request(make, upstream, redis_server: RedisServer, policy):
    config = config_with(upstream, rate_limit="1000/minute")
    config["rate_limits"] = {
        "store": redis_server.url,
        "on_store_error": policy,
        "timeout": "200ms",
    }
    kp = make(config)
    assert get(kp)[0] == 200
    redis_server.kill()
    started = time.monotonic()
    for _ in range(5):
        status, headers, data = get(kp)
        if policy == "deny":
            assert (status, data["error"]) == (503, "RATE_LIMIT_UNAVAILABLE")
            assert headers["retry-after"]
        else:
            assert status == 200
    assert time.monotonic() - started < 3  # five requests, each bounded by the store timeout
    assert kp.process.stderr.count('"event":"rate_limit_store_error"') == 1  # not one per request
    redis_server.restart()
    deadline = time.monotonic() + 5
    while get(kp)[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert get(kp)[0] == 200


def test_the_upstreams_own_limit_headers_never_reach_the_client(make, upstream):
    """A client must see keyproxy's limits only: the upstream's count the one shared
    secret, and a second X-RateLimit-Limit would be read first by most libraries."""
    kp = make(config_with(upstream, rate_limit="5/minute"))
    asked = [
        ("X-Echo-Response-Header", f"{name}=999")
        for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-Quota-Remaining")
    ]
    for key, limit in ((LIMITED, ["5"]), (KEYS["reader"], [])):
        conn = http.client.HTTPConnection(kp.host, kp.port, timeout=10)
        try:
            conn.putrequest("GET", "/echo/limits")
            for name, value in [("X-API-Key", key), *asked]:
                conn.putheader(name, value)
            conn.endheaders()
            resp = conn.getresponse()
            resp.read()
            headers = [(n.lower(), v) for n, v in resp.getheaders()]
        finally:
            conn.close()
        assert resp.status == 200
        assert [v for n, v in headers if n == "x-ratelimit-limit"] == limit
        assert "999" not in [v for _, v in headers]
