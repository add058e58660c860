"""CORS: the `cors` section, the preflight answered without a key, origins on every answer.

Direct tests of the parsing and the policy, `explain` showing the preflight as
keyproxy's own reply, and the whole behaviour through a real `keyproxy serve`
in front of the real test upstream. The browser's view is in test_browser_cors.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from keyproxy.commands.explain import explain, render
from keyproxy.config import ConfigError, parse_config
from keyproxy.request import Headers, RequestContext
from keyproxy.response.cors import EXPOSED, check_preflight, parse_origin_pattern
from tests.procs import UpstreamServer
from tests.proxy_process import KEYS, Keyproxy, base_config, digest, start_keyproxy

ALLOWED = "http://app.example.test:8080"
ALSO_ALLOWED = "https://shop.example.org"
OTHER = "http://evil.example.test:8080"
LIMITED = "pk_" + "8" * 64

BASE = """\
upstream:
  url: http://127.0.0.1:3000
routes:
  - {match: "GET /v1/data/{table}", acl: search}
  - {match: "POST /v1/data/{table}", acl: index}
keys:
  - {id: web, hash: "sha256:%s", type: read}
""" % ("a" * 64)


def parse(cors: str):
    return parse_config(BASE + cors, "test.yaml", {})


def issues(cors: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(cors)
    return [issue.format("test.yaml") for issue in caught.value.issues]


# -------------------------------------------------------------------------- config


def test_cors_section_is_compiled_with_the_routes_methods() -> None:
    config = parse(
        "cors:\n"
        f"  allow_origins: ['{ALLOWED}', 'https://*.example.org']\n"
        "  max_age: 120\n"
        "  allow_headers: [X-Custom]\n"
        "  expose_headers: [X-Total-Count]\n"
    )
    cors = config.cors
    assert cors is not None
    assert cors.methods == "GET, HEAD, OPTIONS, POST"
    assert cors.allows(ALLOWED) and cors.allows(ALSO_ALLOWED)
    assert not cors.allows(OTHER) and not cors.allows("https://example.org")
    assert not cors.allows("null") and not cors.allows(None) and not cors.allows("")
    headers = cors.response_headers(ALLOWED).decode()
    assert f"Access-Control-Allow-Origin: {ALLOWED}\r\n" in headers
    assert "Vary: Origin\r\n" in headers
    exposed = headers.split("Access-Control-Expose-Headers: ")[1].split("\r\n")[0]
    assert exposed.split(", ") == [*EXPOSED, "X-Total-Count"]
    assert cors.response_headers(OTHER) == b"Vary: Origin\r\n"


def test_no_cors_section_means_no_policy() -> None:
    assert parse("").cors is None


@pytest.mark.parametrize(
    ("cors", "problem"),
    [
        ("cors:\n  allow_origins: []\n", "is an empty list"),
        ("cors:\n  max_age: 10\n", "allow_origins is required"),
        ("cors:\n  allow_origins: ['*']\n", "has no scheme"),
        ("cors:\n  allow_origins: ['https://app.example.com/app']\n", "has a path"),
        ("cors:\n  allow_origins: ['https://app.example.com/*']\n", "has a path"),
        ("cors:\n  allow_origins: ['https://user@app.example.com']\n", "user information"),
        ("cors:\n  allow_origins: [x]\n  max_age: 99999999\n", "must be between 0 and 86400"),
        ("cors:\n  allow_origins: ['https://a.example']\n  allow_headers: [X_Key]\n", "X_Key"),
        ("cors:\n  allow_origins: ['https://a.example']\n  credentials: true\n", "unknown field"),
    ],
)
def test_cors_section_errors_name_the_line(cors: str, problem: str) -> None:
    found = issues(cors)
    assert any(problem in text for text in found), found
    assert all(text.startswith("test.yaml:") and text[10].isdigit() for text in found), found


def test_origin_patterns_use_the_linear_referer_matcher() -> None:
    pattern = parse_origin_pattern("https://*.example.com:*")
    assert pattern.host == ".example.com" and pattern.any_port and pattern.path is None


# -------------------------------------------------------------------------- the check


def context(config, method: str, headers: list[tuple[str, str]]) -> RequestContext:
    return RequestContext(config, method, "/v1/data/posts", Headers(headers), "127.0.0.1", 0.0)


def test_preflight_check_answers_only_a_real_preflight_from_an_allowed_origin() -> None:
    config = parse(f"cors:\n  allow_origins: ['{ALLOWED}']\n  max_age: 300\n")
    acrm = ("access-control-request-method", "GET")
    reply = check_preflight(
        context(
            config,
            "OPTIONS",
            [("origin", ALLOWED), acrm, ("access-control-request-headers", "x-api-key, x-trace")],
        )
    )
    assert reply is not None and reply.status == 204
    head = reply.headers.decode()
    assert f"Access-Control-Allow-Origin: {ALLOWED}\r\n" in head
    assert (
        "Access-Control-Allow-Headers: X-API-Key, Authorization, Content-Type, x-trace\r\n" in head
    )
    assert "Access-Control-Allow-Methods: GET, HEAD, OPTIONS, POST\r\n" in head
    assert "Access-Control-Max-Age: 300\r\n" in head and "Vary: Origin" in head
    # not preflights, or not from an allowed origin: the normal decision goes on
    assert check_preflight(context(config, "OPTIONS", [("origin", OTHER), acrm])) is None
    assert check_preflight(context(config, "OPTIONS", [("origin", ALLOWED)])) is None
    assert check_preflight(context(config, "GET", [("origin", ALLOWED), acrm])) is None
    assert check_preflight(context(config, "OPTIONS", [("origin", "null"), acrm])) is None
    two = [("origin", ALLOWED), ("origin", ALLOWED), acrm]
    assert check_preflight(context(config, "OPTIONS", two)) is None
    # requested header names that are not plain tokens are not echoed back
    odd = check_preflight(
        context(
            config,
            "OPTIONS",
            [("origin", ALLOWED), acrm, ("access-control-request-headers", "x-a, bad header")],
        )
    )
    assert odd is not None and b"bad" not in odd.headers and b"x-a" not in odd.headers
    underscore = check_preflight(
        context(
            config,
            "OPTIONS",
            [("origin", ALLOWED), acrm, ("access-control-request-headers", "x_api_key")],
        )
    )
    assert underscore is not None and b"x_api_key" not in underscore.headers


def test_explain_shows_the_preflight_as_keyproxys_own_reply() -> None:
    config = parse(f"cors:\n  allow_origins: ['{ALLOWED}']\n")
    url = "http://proxy/v1/data/posts"
    result = asyncio.run(
        explain(
            config,
            "OPTIONS",
            url,
            origin=ALLOWED,
            extra_headers=(("Access-Control-Request-Method", "GET"),),
        )
    )
    text = render(result, "OPTIONS", url, config)
    assert result.reply is not None and not result.allowed
    assert "REPLY 0 cors preflight" in text and "verdict: REPLY 204" in text
    refused = asyncio.run(
        explain(
            config,
            "OPTIONS",
            url,
            origin=OTHER,
            extra_headers=(("Access-Control-Request-Method", "GET"),),
        )
    )
    assert refused.reply is None and not refused.allowed
    assert "DENY  1 credential" in render(refused, "OPTIONS", url, config)


# -------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cors_proxy(
    upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keyproxy]:
    config = base_config(upstream.url, upstream.inject())
    config["keys"].append(
        {"id": "limited", "hash": digest(LIMITED), "type": "read", "rate_limit": "1/minute"}
    )
    config["cors"] = {"allow_origins": [ALLOWED, "https://*.example.org"], "max_age": 600}
    kp = start_keyproxy(tmp_path_factory.mktemp("cors"), config)
    yield kp
    kp.stop()


def preflight(kp: Keyproxy, origin: str, path: str = "/v1/data/posts"):
    return kp.request(
        "OPTIONS",
        path,
        {
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "x-api-key,x-custom",
        },
    )


def cors_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}


def test_preflight_from_allowed_origin_is_answered_without_a_key_or_the_upstream(
    cors_proxy: Keyproxy, upstream: UpstreamServer
) -> None:
    upstream.reset()
    status, headers, body, _ = preflight(cors_proxy, ALLOWED)
    assert status == 204 and body == b""
    assert headers["access-control-allow-origin"] == ALLOWED
    assert headers["access-control-allow-headers"] == (
        "X-API-Key, Authorization, Content-Type, x-custom"
    )
    assert "GET" in headers["access-control-allow-methods"].split(", ")
    assert headers["access-control-max-age"] == "600"
    assert "Origin" in headers["vary"] and headers["x-request-id"]
    status, headers, _, _ = preflight(cors_proxy, "https://shop.example.org")
    assert status == 204 and headers["access-control-allow-origin"] == "https://shop.example.org"
    assert upstream.records() == []
    # Counted as what it is, an allowed preflight, not as a refusal without a reason.
    url = f"http://{cors_proxy.admin_host}:{cors_proxy.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    options = [x for x in lines if x.startswith("keyproxy_requests_total{") and "OPTIONS" in x]
    assert options and all('decision="allow"' in x and 'status="204"' in x for x in options)


def test_preflight_from_another_origin_meets_the_normal_decision(
    cors_proxy: Keyproxy, upstream: UpstreamServer
) -> None:
    upstream.reset()
    for origin in (OTHER, "https://example.org", "null"):
        status, headers, body, _ = preflight(cors_proxy, origin)
        assert status == 401 and json.loads(body)["error"] == "UNAUTHORIZED", origin
        assert cors_headers(headers) == {}, origin
    assert upstream.records() == []


def test_real_answer_to_an_allowed_origin_names_it_and_drops_the_upstreams_cors(
    cors_proxy: Keyproxy,
) -> None:
    status, headers, body, _ = cors_proxy.request(
        "GET",
        "/echo/cors",
        {
            "Origin": ALLOWED,
            "X-Echo-Response-Header": "Access-Control-Allow-Origin=*",
        },
        key=KEYS["reader"],
    )
    assert status == 200 and json.loads(body)["path"] == "/echo/cors"
    assert headers["access-control-allow-origin"] == ALLOWED  # not the upstream's '*'
    assert headers["access-control-expose-headers"].split(", ") == list(EXPOSED)
    assert headers["vary"] == "Origin"


def test_real_answer_to_another_origin_has_no_cors_headers(cors_proxy: Keyproxy) -> None:
    status, headers, _, _ = cors_proxy.request(
        "GET",
        "/echo/cors",
        {"Origin": OTHER, "X-Echo-Response-Header": "Access-Control-Allow-Origin=*"},
        key=KEYS["reader"],
    )
    assert status == 200 and cors_headers(headers) == {}
    assert headers["vary"] == "Origin"


@pytest.mark.parametrize(
    ("key", "path", "status", "error"),
    [
        (None, "/v1/data/posts", 401, "UNAUTHORIZED"),
        ("pk_" + "0" * 64, "/v1/data/posts", 401, "INVALID_TOKEN"),
        (KEYS["getonly"], "/v1/data/posts", 403, "PERMISSION_DENIED"),
        (KEYS["reader"], "/nowhere", 403, "ROUTE_NOT_ALLOWED"),
    ],
)
def test_keyproxys_refusals_to_an_allowed_origin_carry_cors_headers(
    cors_proxy: Keyproxy, key: str | None, path: str, status: int, error: str
) -> None:
    got, headers, body, _ = cors_proxy.request("GET", path, {"Origin": ALLOWED}, key=key)
    assert (got, json.loads(body)["error"]) == (status, error)
    assert headers["access-control-allow-origin"] == ALLOWED
    assert "X-Request-Id" in headers["access-control-expose-headers"]
    got, headers, _, _ = cors_proxy.request("GET", path, {"Origin": OTHER}, key=key)
    assert got == status and cors_headers(headers) == {}


def test_rate_limited_answer_exposes_retry_after_to_an_allowed_origin(cors_proxy: Keyproxy) -> None:
    first = cors_proxy.request("GET", "/echo/x", {"Origin": ALLOWED}, key=LIMITED)
    assert first[0] == 200 and first[1]["x-ratelimit-remaining"] == "0"
    status, headers, body, _ = cors_proxy.request(
        "GET", "/echo/x", {"Origin": ALLOWED}, key=LIMITED
    )
    assert status == 429 and json.loads(body)["error"] == "RATE_LIMITED"
    assert headers["access-control-allow-origin"] == ALLOWED and "retry-after" in headers
    assert "Retry-After" in headers["access-control-expose-headers"]


def test_without_cors_the_upstreams_own_cors_headers_pass(
    upstream: UpstreamServer, tmp_path: Path
) -> None:
    config = copy.deepcopy(base_config(upstream.url, upstream.inject()))
    kp = start_keyproxy(tmp_path, config)
    try:
        status, headers, _, _ = kp.request(
            "GET",
            "/echo/x",
            {"Origin": ALLOWED, "X-Echo-Response-Header": "Access-Control-Allow-Origin=*"},
            key=KEYS["reader"],
        )
        assert status == 200 and headers["access-control-allow-origin"] == "*"
        assert "vary" not in headers
        status, headers, _, _ = preflight(kp, ALLOWED)
        assert status == 401 and cors_headers(headers) == {}
    finally:
        kp.stop()


def test_cors_config_file_round_trips_through_yaml(tmp_path: Path) -> None:
    """The section as a user writes it in a file (flow and block styles alike)."""
    text = BASE + yaml.safe_dump({"cors": {"allow_origins": [ALLOWED], "max_age": 0}})
    config = parse_config(text, "f.yaml", {})
    assert config.cors is not None and b"Access-Control-Max-Age: 0" in config.cors.preflight_tail


def test_explain_command_shows_a_preflight_reply(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = base_config("http://127.0.0.1:3000", {"headers": {"K": "k-upstream-secret"}})
    config["cors"] = {"allow_origins": [ALLOWED]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))

    def run(*args: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "keyproxy", "explain", "-c", str(path), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    preflight_args = ["--header", "Access-Control-Request-Method: GET", "OPTIONS", "/v1/data/x"]
    answered = run("--origin", ALLOWED, *preflight_args)
    assert answered.returncode == 0, answered.stdout + answered.stderr
    assert "verdict: REPLY 204" in answered.stdout
    refused = run("--origin", OTHER, *preflight_args)
    assert refused.returncode == 1 and "verdict: DENY 401 UNAUTHORIZED" in refused.stdout
