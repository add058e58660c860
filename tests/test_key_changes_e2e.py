"""Changing keys without breaking clients, through real `keyproxy` processes: rotation
with grace (via `keygen --rotate`), report-only rollout, refilling quotas and several
windows, in memory and shared through a real Redis by two replicas."""

from __future__ import annotations

import copy
import http.client
import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests.procs import free_port
from tests.proxy_process import KEYS, Keyproxy, base_config, digest
from tests.redis_server import RedisServer, start_redis

ROOT = Path(__file__).resolve().parent.parent
LIMITED = "pk_" + "8" * 64


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def get(kp: Keyproxy, key: str, path: str = "/echo/x") -> tuple[int, dict[str, str], dict]:
    conn = http.client.HTTPConnection(kp.host, kp.port, timeout=10)
    try:
        conn.request("GET", path, headers={"X-API-Key": key})
        resp = conn.getresponse()
        body = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        data = json.loads(body) if headers.get("content-type") == "application/json" else {}
        return resp.status, headers, data
    finally:
        conn.close()


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the reload did not take effect"
        time.sleep(0.05)


def config_with(upstream, **fields) -> dict:
    config = base_config(upstream.url, upstream.inject())
    config["keys"].append({"id": "limited", "hash": digest(LIMITED), "type": "read", **fields})
    return config


def seconds_until_next(period: str) -> float:
    now = datetime.now(UTC)
    if period == "day":
        end = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    else:
        end = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return (end - now).total_seconds()


# -- rotation -------------------------------------------------------------------------------


def test_keygen_rotate_then_both_keys_work_until_the_old_one_is_refused(
    make, upstream, tmp_path: Path
) -> None:
    old_key = "pk_" + "9" * 64
    config = base_config(upstream.url, upstream.inject())
    config["keys"] = []
    keys_text = f"keys:\n  - id: web\n    hash: {digest(old_key)}\n    type: read\n"
    path = tmp_path / "rotate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False).replace("keys: []\n", keys_text))

    result = cli("keygen", "--rotate", "web", "-c", str(path), "--grace", "3d")
    assert result.returncode == 0, result.stderr
    new_keys = re.findall(r"pk_[0-9a-f]{64}", result.stdout)
    assert len(new_keys) == 1 and old_key not in result.stdout  # shown once; the old never
    new_key = new_keys[0]
    block = result.stdout.split("with these lines:\n\n", 1)[1].split("\n\n", 1)[0] + "\n"
    assert block.startswith("    hashes:\n      - " + digest(new_key) + "\n")
    until = re.search(r"until: (\S+)\}", block).group(1)  # type: ignore[union-attr]
    expected = datetime.now(UTC) + timedelta(days=3)
    assert abs(datetime.fromisoformat(until) - expected) < timedelta(minutes=1)

    pasted = path.read_text().replace(f"    hash: {digest(old_key)}\n", block)
    path.write_text(pasted)
    assert cli("check", "-c", str(path)).stdout.startswith("OK: 1 key,")

    kp = make(yaml.safe_load(pasted))
    for key in (new_key, old_key):
        assert get(kp, key)[0] == 200

    # the grace period ends (the operator shortens it to a moment in the past)
    ended = pasted.replace(until, "2026-01-01T00:00:00Z")
    replacement = kp.config_path.with_suffix(".new")  # replaced by a rename, as editors save
    replacement.write_text(ended)
    replacement.replace(kp.config_path)
    wait_for(lambda: get(kp, old_key)[0] == 401)
    status, headers, data = get(kp, old_key)
    assert (status, data["error"]) == (401, "TOKEN_EXPIRED")
    assert data["message"] == "this key was rotated on 2026-01-01T00:00:00Z; use the new key"
    assert old_key not in json.dumps(data) and old_key[3:] not in str(headers)
    assert get(kp, new_key)[0] == 200


def test_keygen_refuses_what_check_would_refuse(tmp_path: Path) -> None:
    bad_id = cli("keygen", "--id", "my app")
    assert bad_id.returncode == 2 and "not a valid key id" in bad_id.stderr
    assert "Traceback" not in bad_id.stderr and "pk_" not in bad_id.stdout
    config = tmp_path / "c.yaml"
    config.write_text(
        "upstream: {url: 'http://127.0.0.1:1'}\nroutes: [{match: 'GET /x', acl: a}]\n"
        f"keys: [{{id: web, hash: '{digest(LIMITED)}', type: read}}]\n"
    )
    unknown = cli("keygen", "--rotate", "nobody", "-c", str(config))
    assert unknown.returncode == 1 and "no key with id 'nobody'" in unknown.stderr
    grace = cli("keygen", "--rotate", "web", "-c", str(config), "--grace", "3 days")
    assert grace.returncode == 2 and "--grace" in grace.stderr
    for result in (unknown, grace):
        assert result.stderr.count("\n") == 1 and "pk_" not in result.stdout


# -- report mode ------------------------------------------------------------------------------


def test_report_mode_forwards_would_be_refusals_then_enforce_keeps_the_counters(
    make, upstream
) -> None:
    config = config_with(upstream, rate_limit="3/minute", ips=["10.0.0.0/8"], mode="report")
    kp = make(config)
    seen = []
    for _ in range(5):
        status, headers, _ = get(kp, LIMITED)
        seen.append((status, headers["x-ratelimit-remaining"]))
    # outside the allowlist and over the limit: forwarded anyway, and counted
    assert seen == [(200, "2"), (200, "1"), (200, "0"), (200, "0"), (200, "0")]
    assert get(kp, "pk_" + "0" * 64)[0] == 401  # credentials are always enforced
    assert get(kp, LIMITED, "/nowhere")[0] == 403  # so is the route

    enforced = copy.deepcopy(config)
    enforced["keys"][-1]["mode"] = "enforce"
    enforced["keys"][-1]["ips"] = ["0.0.0.0/0"]
    enforced["keys"][0]["revoked"] = True  # a marker: the reload has happened
    kp.rewrite_config(enforced)
    wait_for(lambda: get(kp, KEYS["reader"])[0] == 401)
    status, headers, data = get(kp, LIMITED)
    assert (status, data["error"]) == (429, "RATE_LIMITED")  # no fresh bucket after the switch
    assert 1 <= int(headers["retry-after"]) <= 20


# -- refilling quotas and several windows ---------------------------------------------------


def test_a_daily_quota_says_when_it_refills_and_survives_a_reload(make, upstream) -> None:
    config = config_with(upstream, quota="2/day")
    kp = make(config)
    for remaining in ("1", "0"):
        status, headers, _ = get(kp, LIMITED)
        assert status == 200 and headers["x-quota-remaining"] == remaining
        assert abs(int(headers["x-quota-reset"]) - seconds_until_next("day")) <= 5
    edited = copy.deepcopy(config)
    edited["keys"][0]["revoked"] = True  # an unrelated edit, and the sign it was loaded
    kp.rewrite_config(edited)
    wait_for(lambda: get(kp, KEYS["reader"])[0] == 401)
    status, headers, data = get(kp, LIMITED)
    assert (status, data["error"]) == (429, "QUOTA_EXCEEDED")
    assert abs(int(headers["retry-after"]) - seconds_until_next("day")) <= 5
    assert headers["x-quota-remaining"] == "0"


def test_a_lifetime_quota_has_no_reset_and_no_retry_after(make, upstream) -> None:
    kp = make(config_with(upstream, quota=1))
    status, headers, _ = get(kp, LIMITED)
    assert status == 200 and "x-quota-reset" not in headers
    status, headers, data = get(kp, LIMITED)
    assert (status, data["error"]) == (429, "QUOTA_EXCEEDED")
    assert "retry-after" not in headers and "x-quota-reset" not in headers


def test_several_windows_report_the_tightest(make, upstream) -> None:
    kp = make(config_with(upstream, rate_limit=["10/minute", "3/hour"]))
    seen = []
    for _ in range(3):
        status, headers, _ = get(kp, LIMITED)
        seen.append((status, headers["x-ratelimit-limit"], headers["x-ratelimit-remaining"]))
    assert seen == [(200, "3", "2"), (200, "3", "1"), (200, "3", "0")]
    status, headers, data = get(kp, LIMITED)
    assert (status, data["error"]) == (429, "RATE_LIMITED")
    assert 1190 <= int(headers["retry-after"]) <= 1200  # one slot of 3/hour


@pytest.fixture
def redis_server():
    server = start_redis()
    yield server
    server.stop()


def test_two_replicas_share_a_monthly_quota_and_windows_through_redis(
    make, upstream, redis_server: RedisServer
) -> None:
    windowed = "pk_" + "7" * 64
    config = config_with(upstream, quota="5/month", rate_limit=["100/minute", "1000/hour"])
    config["keys"].append(
        {
            "id": "windowed",
            "hash": digest(windowed),
            "type": "read",
            "rate_limit": ["10/minute", "2/hour"],
        }
    )
    config["rate_limits"] = {"store": redis_server.url, "timeout": "2s"}

    def replica() -> Keyproxy:
        own = copy.deepcopy(config)
        own["server"]["listen"] = f"127.0.0.1:{free_port()}"
        own["server"]["admin_listen"] = f"127.0.0.1:{free_port()}"
        return make(own)

    replicas = [replica(), replica()]
    results = [get(replicas[i % 2], LIMITED) for i in range(7)]
    assert [r[0] for r in results] == [200] * 5 + [429] * 2
    assert [r[1]["x-quota-remaining"] for r in results[:5]] == ["4", "3", "2", "1", "0"]
    # the minute window has less left than the hour window: its numbers are the headers'
    assert [r[1]["x-ratelimit-limit"] for r in results[:5]] == ["100"] * 5
    assert [r[1]["x-ratelimit-remaining"] for r in results[:5]] == ["99", "98", "97", "96", "95"]
    for _, headers, data in results[5:]:
        assert data["error"] == "QUOTA_EXCEEDED"
        assert abs(int(headers["retry-after"]) - seconds_until_next("month")) <= 5
    for _, headers, _ in results:
        assert abs(int(headers["x-quota-reset"]) - seconds_until_next("month")) <= 5

    # every window must allow, counted across both replicas
    statuses = [get(replicas[i % 2], windowed) for i in range(3)]
    assert [s for s, _, _ in statuses] == [200, 200, 429]
    assert statuses[2][2]["error"] == "RATE_LIMITED"
    assert 1790 <= int(statuses[2][1]["retry-after"]) <= 1800  # one slot of 2/hour

    # a replica restarts: the month's count lives in Redis, not in the process
    replicas[0].stop()
    restarted = replica()
    status, headers, data = get(restarted, LIMITED)
    assert (status, data["error"]) == (429, "QUOTA_EXCEEDED")
