"""`keyproxy replay`: an access log recorded from real traffic through `keyproxy serve`,
re-decided by the real CLI under candidate configurations."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from tests.procs import UpstreamServer
from tests.proxy_process import KEYS, base_config, digest, start_keyproxy

JWT_SECRET = "hs256-secret-for-replay-tests-0123456789"
ISSUER = "https://auth.test/"
AUDIENCE = "keyproxy-tests"
LIMITED = "pk_" + "7" * 64
GUEST = "sk_" + "c" * 64
UNKNOWN = "pk_" + "9" * 64
ENV = {**os.environ, "JWT_SECRET": JWT_SECRET}


def user_token(roles: list[str]) -> str:
    claims = {
        "sub": "alice",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": int(time.time()) + 600,
        "role": roles,
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def recorded_config(upstream: UpstreamServer, log: Path) -> dict[str, Any]:
    config = base_config(upstream.url, upstream.inject())
    config["keys"] = [
        {"id": "reader", "hash": digest(KEYS["reader"]), "type": "read"},
        {"id": "admin", "hash": digest(KEYS["admin"]), "type": "admin"},
        {"id": "limited", "hash": digest(LIMITED), "type": "read", "rate_limit": "2/minute"},
        {"id": "guest", "hash": digest(GUEST), "type": "admin", "roles": ["guest"]},
    ]
    config["server"]["credential_sources"] = ["header", "basic", "query"]
    config["users"] = {
        "jwt": {
            "algorithms": ["HS256"],
            "secret": "${JWT_SECRET}",
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "roles_claim": "role",
        }
    }
    config["roles"] = {
        "admin": {"*": ["create", "read", "update", "delete", "list"]},
        "user": {"*": ["create", "read", "list"]},
        "guest": {"*": ["read", "list"]},
    }
    config["log"] = {"access": str(log)}
    return config


def send(port: int, method: str, target: str, source: str, headers: list[tuple[str, str]]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        body = b"{}" if method in ("POST", "PUT", "PATCH") else None
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def key_header(key: str) -> list[tuple[str, str]]:
    return [("X-API-Key", key)]


#: (method, target, source address, headers, expected status) — the recorded traffic.
def traffic() -> list[tuple[str, str, str, list[tuple[str, str]], int]]:
    reader = key_header(KEYS["reader"])
    basic = "Basic " + base64.b64encode(f"reader:{KEYS['reader']}".encode()).decode()
    plan: list[tuple[str, str, str, list[tuple[str, str]], int]] = []
    plan += [("GET", "/v1/data/posts", "127.0.0.1", reader, 200)] * 3
    plan += [("GET", "/v1/data/posts/7", "127.0.0.1", reader, 200)] * 2
    plan += [("DELETE", "/v1/data/posts/7", "127.0.0.1", reader, 403)]  # a read key
    plan += [("GET", "/v1/data/posts", "127.0.0.2", reader, 200)] * 4
    plan += [("GET", "/echo/x?q=1&page=2", "127.0.0.2", reader, 200)]
    plan += [("GET", "/v1/data/posts/1", "127.0.0.2", [("Authorization", basic)], 200)]
    plan += [("GET", f"/echo/q?api_key={KEYS['reader']}&page=2", "127.0.0.1", [], 200)]
    plan += [("GET", "/v1/data/posts", "127.0.0.2", key_header(KEYS["admin"]), 200)] * 2
    plan += [("GET", "/echo/l", "127.0.0.1", key_header(LIMITED), 200)] * 2
    plan += [("GET", "/echo/l", "127.0.0.1", key_header(LIMITED), 429)]
    token = [("Authorization", f"Bearer {user_token(['user'])}"), *key_header(GUEST)]
    plan += [("POST", "/v1/data/posts", "127.0.0.1", token, 200)]  # the user role creates
    plan += [("POST", "/v1/data/posts", "127.0.0.1", key_header(GUEST), 403)]  # guest alone
    plan += [("GET", "/v1/data/posts", "127.0.0.1", key_header(UNKNOWN), 401)] * 2
    plan += [("GET", "/v1/data/posts", "127.0.0.1", [], 401)]
    return plan


@pytest.fixture(scope="module")
def recorded(upstream: UpstreamServer, tmp_path_factory) -> Iterator[tuple[Path, dict, Path]]:
    """A real access log: the traffic above through `keyproxy serve`, which is then stopped
    (so every line is written)."""
    tmp = tmp_path_factory.mktemp("replay")
    log = tmp / "access.log"
    config = recorded_config(upstream, log)
    kp = start_keyproxy(tmp, config, env=ENV)
    try:
        statuses = [send(kp.port, m, t, src, h) for m, t, src, h, _ in traffic()]
    finally:
        kp.stop()
    assert statuses == [expected for *_, expected in traffic()]
    lines = log.read_text().splitlines()
    assert len(lines) == len(statuses)
    # Which hash a request used is logged as a label of its digest, never the key.
    assert json.loads(lines[0])["key_hash"] == digest(KEYS["reader"])[:15]
    yield log, config, tmp


def candidate(tmp: Path, config: dict, name: str, change) -> Path:
    edited = copy.deepcopy(config)
    change(edited)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(edited, sort_keys=False))
    return path


def key_entry(config: dict, key_id: str) -> dict:
    return next(k for k in config["keys"] if k["id"] == key_id)


def replay(config: Path, log: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyproxy", "replay", "-c", str(config), "--log", str(log), *extra],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )


def changes(log: Path, config: Path) -> tuple[int, dict]:
    result = replay(config, log, "--json")
    assert result.returncode in (0, 1), result.stderr
    assert "Traceback" not in result.stderr
    return result.returncode, json.loads(result.stdout)


def by_group(report: dict) -> Counter:
    return Counter(
        {
            (c["from"], c["to"], c["key"], c["route"], c["reason"]): c["count"]
            for c in report["changes"]
        }
    )


def test_the_same_config_changes_nothing(recorded):
    log, config, tmp = recorded
    path = candidate(tmp, config, "same", lambda c: None)
    code, report = changes(log, path)
    assert code == 0
    assert report["changed"] == 0 and report["changes"] == []
    summary = report["summary"]
    # 3 requests without a usable key; everything else was re-decided to the same verdict,
    # the rate-limited third request and the token-carrying user's create included.
    assert summary["not_replayable"] == {"no_key": 3, "credential_refused": 0, "kept_as_logged": 0}
    assert summary["lines"] == len(traffic())
    assert summary["replayed"] == summary["unchanged"] == len(traffic()) - 3
    assert summary["bad_lines"] == 0
    text = replay(path, log)
    assert text.returncode == 0
    assert "no verdict changes" in text.stdout and "3 no key" in text.stdout


def test_an_ip_allowlist_breaks_exactly_the_other_address(recorded):
    log, config, tmp = recorded

    def allow_one_address(c: dict) -> None:
        key_entry(c, "reader")["ips"] = ["127.0.0.1/32"]

    path = candidate(tmp, config, "ips", allow_one_address)
    code, report = changes(log, path)
    assert code == 1
    # reader's requests from 127.0.0.2: 4 lists, 1 echo, 1 read by Basic credentials.
    assert by_group(report) == Counter(
        {
            ("allow", "deny", "reader", "GET /v1/data/{table}", "IP_NOT_ALLOWED"): 4,
            ("allow", "deny", "reader", "GET|HEAD|OPTIONS /echo/**", "IP_NOT_ALLOWED"): 1,
            ("allow", "deny", "reader", "GET /v1/data/{table}/{id}", "IP_NOT_ALLOWED"): 1,
        }
    )
    assert report["summary"]["allow_to_deny"] == 6 and report["changed"] == 6
    first = report["changes"][0]
    assert first["count"] == 4 and len(first["examples"]) == 3
    example = first["examples"][0]
    assert example["client_ip"] == "127.0.0.2" and example["method"] == "GET"
    assert example["before"] == {"decision": "allow", "reason": None, "status": 200}
    assert example["after"]["status"] == 403 and example["after"]["reason"] == "IP_NOT_ALLOWED"
    echo = next(c for c in report["changes"] if c["route"].endswith("/echo/**"))
    assert echo["examples"][0]["query_names"] == ["q", "page"]
    # No key, value or token in the report.
    raw = replay(path, log, "--json").stdout + replay(path, log).stdout
    for secret in (*KEYS.values(), LIMITED, GUEST, JWT_SECRET, "q=1", "page=2"):
        assert secret not in raw
    text = replay(path, log)
    assert text.returncode == 1
    assert "allow -> deny" in text.stdout and "IP_NOT_ALLOWED" in text.stdout
    assert "from 127.0.0.2" in text.stdout and "from 127.0.0.1" not in text.stdout


def test_removing_an_acl_denies_the_routes_that_need_it(recorded):
    log, config, tmp = recorded

    def drop_search(c: dict) -> None:
        key_entry(c, "reader")["acls"] = ["get", "echo"]

    code, report = changes(log, candidate(tmp, config, "acl", drop_search))
    assert code == 1
    assert by_group(report) == Counter(
        {("allow", "deny", "reader", "GET /v1/data/{table}", "PERMISSION_DENIED"): 7}
    )


def test_a_new_rate_limit_and_a_lifted_one(recorded):
    log, config, tmp = recorded

    def limits(c: dict) -> None:
        key_entry(c, "admin")["rate_limit"] = "1/minute"  # two requests, one IP: one refused
        del key_entry(c, "limited")["rate_limit"]  # its third request goes through

    code, report = changes(log, candidate(tmp, config, "limits", limits))
    assert code == 1
    assert by_group(report) == Counter(
        {
            ("allow", "deny", "admin", "GET /v1/data/{table}", "RATE_LIMITED"): 1,
            ("deny", "allow", "limited", "GET|HEAD|OPTIONS /echo/**", "RATE_LIMITED"): 1,
        }
    )
    assert report["summary"]["deny_to_allow"] == 1


def test_a_removed_key_and_the_users_roles(recorded):
    log, config, tmp = recorded

    def edit(c: dict) -> None:
        c["keys"] = [k for k in c["keys"] if k["id"] != "admin"]
        c["roles"]["user"] = {"*": ["read", "list"]}  # users may no longer create

    code, report = changes(log, candidate(tmp, config, "removed", edit))
    assert code == 1
    assert by_group(report) == Counter(
        {
            ("allow", "deny", "admin", "GET /v1/data/{table}", "INVALID_TOKEN"): 2,
            ("allow", "deny", "guest", "POST /v1/data/{table}", "PERMISSION_DENIED"): 1,
        }
    )
    user_change = next(c for c in report["changes"] if c["key"] == "guest")
    assert user_change["examples"][0]["user"] == "alice"

    def no_users(c: dict) -> None:
        del c["users"]

    code, report = changes(log, candidate(tmp, config, "nousers", no_users))
    assert by_group(report) == Counter(
        {("allow", "deny", "guest", "POST /v1/data/{table}", "INVALID_TOKEN"): 1}
    )


def test_bad_lines_are_counted_not_fatal(recorded):
    log, config, tmp = recorded
    mixed = tmp / "mixed.log"
    lines = log.read_text().splitlines()
    mixed.write_text(
        "\n".join([lines[0], "not json at all", '{"some": "object"}', *lines[1:], "[1, 2]"]) + "\n"
    )
    path = candidate(tmp, config, "same2", lambda c: None)
    code, report = changes(mixed, path)
    assert code == 0
    assert report["summary"]["bad_lines"] == 3
    assert report["bad_lines"] == [
        {"line": 2, "error": "not a JSON line"},
        {"line": 3, "error": "missing field 'key'"},
        {"line": len(lines) + 3, "error": "not an access-log record"},
    ]
    text = replay(path, mixed)
    assert text.returncode == 0 and "bad lines: 3 skipped" in text.stdout


def test_unreadable_input_exits_2_with_one_line(recorded, tmp_path):
    log, config, tmp = recorded
    good = candidate(tmp, config, "same3", lambda c: None)
    missing = replay(good, tmp_path / "nope.log")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and "cannot read the access log" in missing.stderr
    garbage = tmp_path / "garbage.log"
    garbage.write_text("hello\nworld\n")
    refused = replay(good, garbage)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "no line is a keyproxy access-log record" in refused.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {listen: nowhere}\nkeys: []\nrouts: []\n")
    result = replay(bad, log)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and "bad.yaml" in result.stderr
    absent = replay(tmp_path / "absent.yaml", log)
    assert absent.returncode == 2 and absent.stderr.count("\n") == 1
