"""Attacks that widened a key's access, each through a real `keyproxy serve` in front of a
real upstream: method overrides, framework spellings of `_method`, shadowed routes,
upstream query features, `${VAR}` outside secret fields."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.procs import UpstreamServer
from tests.proxy_process import KEYS, Keyproxy, base_config, start_keyproxy

ROOT = Path(__file__).resolve().parent.parent

EXTRA_ROUTES = [
    {"match": "GET|DELETE /comments/{id}", "acl": "get", "allow_method_override": True},
    {"match": "POST|PUT /users/{id}", "acl": "upload", "allow_method_override": True},
    {"match": "GET /posts/{id}", "acl": "get", "query": {"deny": ["_embed", "select"]}},
    {"match": "GET /items", "acl": "get", "query": {"allow": ["page", "limit"]}},
]


@pytest.fixture(scope="module")
def kp(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyproxy]:
    config = base_config(upstream.url, upstream.inject())
    config["routes"] = EXTRA_ROUTES + config["routes"]
    proxy = start_keyproxy(tmp_path_factory.mktemp("widened"), config)
    yield proxy
    proxy.stop()


def _error(body: bytes) -> str:
    return json.loads(body)["error"]


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/comments/7", {"X-HTTP-Method-Override": "DELETE"}),
        ("/comments/7?_method=DELETE", {}),
        ("/comments/7", {"X-Method-Override": "delete"}),
    ],
)
def test_a_read_key_cannot_delete_through_an_override(kp: Keyproxy, upstream, target, headers):
    upstream.reset()
    status, _, body, _ = kp.request("GET", target, headers, key=KEYS["reader"])
    assert status == 403 and _error(body) == "PERMISSION_DENIED", body
    assert upstream.records() == []


@pytest.mark.parametrize(
    ("target", "headers"),
    [("/users/7", {"X-HTTP-Method-Override": "GET"}), ("/users/7?_method=GET", {})],
)
def test_a_write_key_cannot_read_through_an_override(kp: Keyproxy, upstream, target, headers):
    upstream.reset()
    status, _, body, _ = kp.request("POST", target, headers, b"{}", key=KEYS["writer"])
    assert status == 403 and _error(body) == "ROUTE_NOT_ALLOWED", body
    assert upstream.records() == []


def test_an_override_within_the_route_and_the_key_passes(kp: Keyproxy, upstream):
    upstream.reset()
    status, _, _, _ = kp.request(
        "POST", "/users/7", {"X-HTTP-Method-Override": "PUT"}, b"{}", key=KEYS["writer"]
    )
    assert status == 200
    (record,) = upstream.records()
    assert record["method"] == "POST"  # the wire method goes upstream, with its override
    assert ["X-HTTP-Method-Override", "PUT"] in [list(h) for h in record["headers"]]


@pytest.mark.parametrize(
    "name",
    [
        "%5B_method%5D",
        "[_method]",
        "[_method][]",
        "_method[]",
        "_method.x",
        "]]_method",
        "%255Fmethod",
        "_method%00",
    ],
)
def test_framework_spellings_of_method_are_refused(kp: Keyproxy, upstream, name):
    upstream.reset()
    # raw bytes: brackets are sent as the attacker wrote them
    response = kp.raw(
        f"GET /echo/x?{name}=DELETE HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS['admin']}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    assert response.startswith(b"HTTP/1.1 400"), response
    assert b'"error":"METHOD_OVERRIDE_NOT_ALLOWED"' in response
    assert upstream.records() == []


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b"_method=DELETE&q=x"),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--b--\r\n',
        ),
    ],
)
def test_a_read_key_cannot_send_a_form_to_a_read_only_post(
    kp: Keyproxy, upstream, content_type, body
):
    """`POST /{index}/_search` only reads (`access: read`); a form body could carry
    `_method=DELETE` to a Rack, Laravel or Spring upstream."""
    upstream.reset()
    headers = {"Content-Type": content_type}
    status, _, got, _ = kp.request("POST", "/posts/_search", headers, body, key=KEYS["reader"])
    assert status == 400 and _error(got) == "METHOD_OVERRIDE_NOT_ALLOWED", got
    assert upstream.records() == []
    headers = {"Content-Type": "application/json"}
    status, _, _, _ = kp.request("POST", "/posts/_search", headers, b"{}", key=KEYS["reader"])
    assert status == 200


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/posts/1?_embed=audit_log", 403),  # json-server reads another table
        ("/posts/1?select=*,other(*)", 403),  # PostgREST embeds another table
        ("/posts/1?select%5Bx%5D=1", 403),
        ("/posts/1?%5Fembed=audit_log", 403),
        ("/posts/1?q=1", 200),
        ("/items?page=2&limit=5", 200),
        ("/items?page=2&_expand=user", 403),
    ],
)
def test_route_query_lists(kp: Keyproxy, upstream, target, status):
    upstream.reset()
    got, _, body, _ = kp.request("GET", target, key=KEYS["reader"])
    assert got == status, body
    if status == 403:
        assert _error(body) == "QUERY_NOT_ALLOWED"
        assert upstream.records() == []
    else:
        assert len(upstream.records()) == 1


def _check(tmp_path: Path, config: dict, env: dict[str, str] | None = None):
    import os

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return subprocess.run(
        [sys.executable, "-m", "keyproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def test_check_names_both_lines_of_a_shadowed_route(tmp_path: Path):
    config = base_config("http://127.0.0.1:1", {"headers": {"K": "v"}})
    config["routes"] = [
        {"match": "GET /v1/data/{table}", "acl": "search"},
        {"match": "GET /v1/data/admin", "acl": "admin"},
    ]
    result = _check(tmp_path, config)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    lines = (tmp_path / "c.yaml").read_text().splitlines()
    first = 1 + next(i for i, line in enumerate(lines) if "{table}" in line)
    second = 1 + next(i for i, line in enumerate(lines) if "/v1/data/admin" in line)
    assert f":{second}:" in text and f"line {first}" in text, text
    assert "can never match" in text and "move it above" in text


def test_a_variable_outside_secret_fields_is_refused_and_never_echoed(tmp_path: Path):
    config = base_config("http://127.0.0.1:1", {"headers": {"K": "${SECRET}"}})
    config["routes"][0]["acl"] = "${SECRET}"
    result = _check(tmp_path, config, {"SECRET": "s3cr3t-value-xyz"})
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "routes[0].acl" in text and "${" in text
    assert "s3cr3t-value-xyz" not in text


@pytest.mark.parametrize("name", ["api_key[]", "%5Bapi_key%5D", "api_key.x"])
def test_framework_spellings_of_the_query_key_never_reach_the_upstream(
    kp: Keyproxy, upstream, name
):
    upstream.reset()
    response = kp.raw(
        f"GET /echo/x?{name}=smuggled HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS['admin']}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    assert response.startswith(b"HTTP/1.1 401"), response
    assert b'"error":"INVALID_TOKEN"' in response
    assert upstream.records() == []
