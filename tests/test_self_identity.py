"""Self records and the user id the upstream sees, through `keyproxy serve` in front of
the real demo backend: one upstream form of the id for the identity header, the list
filter and the owner check; `%` and control characters refused in token user ids."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from keyproxy.config.errors import ConfigError
from keyproxy.config.load import parse_config
from keyproxy.policy.permissions import SelfRecords, upstream_user_id
from keyproxy.policy.users import JwtSettings, TokenVerifier
from keyproxy.request import Deny
from tests.procs import start_demo_backend, start_upstream
from tests.proxy_process import CRUD_ROUTES, Keyproxy, base_config, digest, error_of, start_keyproxy

SECRET = "hs256-secret-for-self-identity-0123456789"
DEMO_SECRET = "demo-backend-secret-for-self-identity"
APP_KEY = "sk_" + "d" * 64
ROUTES = [*CRUD_ROUTES]


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def as_user(sub: str) -> list[tuple[str, str]]:
    return [("X-API-Key", APP_KEY), ("Authorization", f"Bearer {token(sub)}")]


@pytest.fixture
def backend() -> Iterator[int]:
    with start_demo_backend(DEMO_SECRET) as port:
        yield port


def self_config(port: int) -> dict[str, Any]:
    config = base_config(f"http://127.0.0.1:{port}", {"headers": {"X-API-Key": DEMO_SECRET}})
    config["routes"] = ROUTES
    config["keys"] = [
        {"id": "app", "hash": digest(APP_KEY), "type": "admin", "roles": ["anonymous"]}
    ]
    config["users"] = {
        "jwt": {"algorithms": ["HS256"], "secret": SECRET, "issuer": "any", "audience": "any"}
    }
    config["roles"] = {
        "anonymous": {"*": []},
        "user": {"posts": ["create", "list:self", "read:self", "update:self", "delete:self"]},
    }
    config["self"] = {"owner_field": "createdBy", "list_filter": {"query": {"createdBy": "{user}"}}}
    config["upstream"]["identity_headers"] = {"user": "X-Keyproxy-User"}
    return config


@pytest.fixture
def proxy(backend: int, tmp_path: Path) -> Iterator[Keyproxy]:
    kp = start_keyproxy(tmp_path, self_config(backend))
    yield kp
    kp.stop()


def test_upstream_user_id_is_one_form():
    assert upstream_user_id("alice") == "alice"
    assert upstream_user_id("jörg") == "j%C3%B6rg"
    records = SelfRecords("createdBy", (("createdBy", "{user}"),))
    # the filter carries the upstream form, query-encoded once more
    assert records.filter_query("jörg") == "createdBy=j%25C3%25B6rg"


@pytest.mark.parametrize(
    "sub", ["j%C3%B6rg", "100%", "bob\x00", "bob\x1b[0m", "a\x85b", "alice,bob", ","]
)
def test_percent_comma_and_control_characters_refused_in_user_ids(sub: str):
    verifier = TokenVerifier(JwtSettings(algorithms=("HS256",), secret=SECRET))
    result = verifier.verify(token(sub), time.time())
    assert isinstance(result, Deny) and result.status == 401
    assert result.code == "INVALID_TOKEN" and "user id" in result.message


def test_non_ascii_user_owns_their_records_and_a_percent_spelling_is_refused(proxy: Keyproxy):
    status, _, body, _ = proxy.request(
        "POST", "/v1/data/posts", as_user("jörg"), body=b'{"title": "private diary"}'
    )
    assert status == 201, body
    record = json.loads(body)
    assert record["createdBy"] == "j%C3%B6rg"  # the upstream form, from the identity header
    path = f"/v1/data/posts/{record['id']}"
    # jörg reads, lists, updates his record (the owner check compares upstream forms)
    status, _, body, _ = proxy.request("GET", path, as_user("jörg"))
    assert status == 200 and b"private diary" in body, body
    status, _, body, _ = proxy.request("GET", "/v1/data/posts", as_user("jörg"))
    assert status == 200 and [r["id"] for r in json.loads(body)] == [record["id"]], body
    status, _, body, _ = proxy.request("PATCH", path, as_user("jörg"), body=b'{"title": "t"}')
    assert status == 200, body
    # a user literally named "j%C3%B6rg" is refused at the token, everywhere
    for method, target in (("GET", path), ("GET", "/v1/data/posts"), ("DELETE", path)):
        status, _, body, _ = proxy.request(method, target, as_user("j%C3%B6rg"))
        assert (status, error_of(body)) == (401, "INVALID_TOKEN"), (method, target, body)
        assert b"user id" in body
    assert proxy.request("GET", path, as_user("jörg"))[0] == 200


def test_a_user_id_with_a_comma_never_reaches_the_backend(proxy: Keyproxy):
    """`X-User-Id: alice,x` is a list to a backend that reads headers as HTTP allows, and
    its first item is alice: such an id is refused at the token, before any record."""
    status, _, body, _ = proxy.request("POST", "/v1/data/posts", as_user("alice"), body=b"{}")
    assert status == 201, body
    for method, target in (("GET", "/v1/data/posts"), ("POST", "/v1/data/posts")):
        status, _, body, _ = proxy.request(method, target, as_user("alice,x"), body=b"{}")
        assert (status, error_of(body)) == (401, "INVALID_TOKEN"), (method, body)
        assert b"user id" in body


# ------------------------------------------------------------ the owner comes from keyproxy

SELF_BASE = """\
upstream:
  url: http://127.0.0.1:3000
{identity}routes:
  - {{match: "GET /v1/data/{{table}}", acl: search, op: list}}
self: {{owner_field: createdBy, list_filter: {{query: {{createdBy: "{{user}}"}}}}}}
"""


def test_self_section_requires_the_user_identity_header():
    with pytest.raises(ConfigError) as info:
        parse_config(SELF_BASE.format(identity=""), "t.yaml", {})
    (issue,) = info.value.issues
    assert issue.where == "self" and issue.line == 5
    assert "identity_headers.user" in issue.message and "X-Keyproxy-User" in (issue.hint or "")
    with pytest.raises(ConfigError):  # key_id alone is not the owner
        parse_config(
            SELF_BASE.format(identity="  identity_headers: {key_id: X-Keyproxy-Key-Id}\n"),
            "t.yaml",
            {},
        )
    config = parse_config(
        SELF_BASE.format(identity="  identity_headers: {user: X-Keyproxy-User}\n"), "t.yaml", {}
    )
    assert config.permissions is not None and config.permissions.self_records is not None


def test_client_identity_headers_are_dropped_even_when_none_are_configured(tmp_path: Path):
    with start_upstream() as upstream:
        config = base_config(upstream.url, upstream.inject())
        config["routes"] = [{"match": "GET /v1/data/{table}", "acl": "search"}]
        config["keys"] = [{"id": "reader", "hash": digest(APP_KEY), "type": "read"}]
        assert "identity_headers" not in config["upstream"]
        kp = start_keyproxy(tmp_path, config)
        try:
            spoof = [
                ("X-Keyproxy-User", "bob"),
                ("x-keyproxy-roles", "admin"),
                ("X-KEYPROXY-KEY-ID", "admin"),
                ("X-Keyproxy-Anything", "x"),
                ("X-Keyproxy", "kept"),  # not an identity name
            ]
            status, _, body, _ = kp.request("GET", "/v1/data/posts", spoof, key=APP_KEY)
            assert status == 200, body
            (record,) = upstream.records()
            names = [name.lower() for name, _ in record["headers"]]
            assert not [n for n in names if n.startswith("x-keyproxy-")], names
            assert "x-keyproxy" in names
        finally:
            kp.stop()


# ------------------------------------------------- a record that changes hands mid-request


def _slow_patch(
    proxy: Keyproxy, path: str, sub: str, body: bytes, extra: str = ""
) -> socket.socket:
    head = (
        f"PATCH {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {APP_KEY}\r\n"
        f"Authorization: Bearer {token(sub)}\r\n{extra}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    sock.sendall(head)
    return sock


@pytest.mark.parametrize("client_if_match", ["", "If-Match: *\r\n"])
def test_a_self_update_fails_when_the_record_changed_hands_after_the_owner_check(
    proxy: Keyproxy, client_if_match: str
):
    body = b'{"title": "defaced by alice"}'
    sock = _slow_patch(proxy, "/v1/data/posts/3", "alice", body, client_if_match)
    time.sleep(0.5)  # the owner check (post 3 is alice's) has run on the head
    assert proxy.request("DELETE", "/v1/data/posts/3", as_user("alice"))[0] == 204
    status, _, created, _ = proxy.request(
        "POST", "/v1/data/posts", as_user("bob"), body=b'{"title": "bob\'s new post"}'
    )
    assert status == 201 and json.loads(created)["id"] == 3  # the backend reuses the id
    sock.sendall(body)
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 412"), answer[:200]
    status, _, now, _ = proxy.request("GET", "/v1/data/posts/3", as_user("bob"))
    assert status == 200 and json.loads(now)["title"] == "bob's new post"


def test_a_self_update_of_an_unchanged_record_carries_its_etag(proxy: Keyproxy):
    sock = _slow_patch(proxy, "/v1/data/posts/1", "alice", b'{"title": "t"}')
    time.sleep(0.2)
    sock.sendall(b'{"title": "t"}')
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
