"""Attacks on self records by a logged-in user with a valid key and token, through the
real `keyproxy serve` in front of the real demo backend: each test is a way of reading
or listing another user's records that the owner filter or the owner read must stop."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyproxy.policy.headers import owner_read_headers
from keyproxy.policy.permissions import SelfRecords
from tests.procs import UpstreamServer, start_demo_backend, start_upstream
from tests.proxy_process import Keyproxy, base_config, digest, error_of, start_keyproxy
from tests.test_self_identity import APP_KEY, DEMO_SECRET, SECRET, as_user, self_config, token

SEARCH_ROUTE = {"match": "POST /{index}/_search", "acl": "search", "access": "read", "op": "list"}
SEARCH_READ_ROUTE = {
    "match": "POST /{index}/_lookup",
    "acl": "search",
    "access": "read",
    "op": "read",
}


@pytest.fixture
def backend() -> Iterator[int]:
    with start_demo_backend(DEMO_SECRET) as port:
        yield port


def attack_config(port: int) -> dict[str, Any]:
    config = self_config(port)
    config["routes"] = [*config["routes"], SEARCH_ROUTE, SEARCH_READ_ROUTE]
    return config


@pytest.fixture
def proxy(backend: int, tmp_path: Path) -> Iterator[Keyproxy]:
    kp = start_keyproxy(tmp_path, attack_config(backend))
    yield kp
    kp.stop()


def test_a_self_list_through_a_read_only_post_is_refused(proxy: Keyproxy):
    """The owner filter is a query parameter; a search POST is decided by its body, so
    the filter would not limit it and every user's records would come back."""
    headers = [*as_user("alice"), ("Content-Type", "application/json")]
    status, _, body, _ = proxy.request("POST", "/posts/_search", headers, body=b'{"query": ""}')
    assert (status, error_of(body)) == (403, "PERMISSION_DENIED"), body
    assert b"Shipping" not in body  # bob's post
    assert "only allowed with GET" in json.loads(body)["message"]
    # a self read through a read-only POST is refused the same way
    status, _, body, _ = proxy.request("POST", "/posts/_lookup", headers, body=b"{}")
    assert (status, error_of(body)) == (403, "PERMISSION_DENIED"), body
    # the GET list still gives alice her own posts
    status, _, body, _ = proxy.request("GET", "/v1/data/posts", as_user("alice"))
    assert status == 200 and sorted(r["id"] for r in json.loads(body)) == [1, 3]


def _held_back_read(proxy: Keyproxy, path: str, user: str, body: bytes) -> socket.socket:
    """A GET whose head is sent now and whose (announced) body comes later."""
    head = (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {APP_KEY}\r\n"
        f"Authorization: Bearer {token(user)}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    sock.sendall(head)
    return sock


def test_a_self_read_held_back_by_its_body_never_serves_a_record_that_changed_hands(
    proxy: Keyproxy,
):
    """Alice's read of her post 3 passes the owner check on its head; she holds the body
    back, deletes post 3, bob creates a post that gets id 3, and the read goes on."""
    body = b"wait."
    sock = _held_back_read(proxy, "/v1/data/posts/3", "alice", body)
    try:
        time.sleep(0.3)  # the owner check has run on the head (or refused it)
        assert proxy.request("DELETE", "/v1/data/posts/3", as_user("alice"))[0] == 204
        status, _, created, _ = proxy.request(
            "POST", "/v1/data/posts", as_user("bob"), body=b'{"title": "bob private"}'
        )
        assert status == 201 and json.loads(created)["id"] == 3  # the backend reuses the id
        with contextlib.suppress(OSError):  # refused on the head: it may have closed already
            sock.sendall(body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    finally:
        sock.close()
    assert b"bob private" not in answer
    assert answer.startswith(b"HTTP/1.1 403"), answer[:300]
    assert b"PERMISSION_DENIED" in answer


@pytest.mark.parametrize("framing", ["Content-Length: 2", "Transfer-Encoding: chunked"])
def test_a_self_list_or_read_with_a_body_is_refused(proxy: Keyproxy, framing: str):
    alice = token("alice")
    for path in ("/v1/data/posts", "/v1/data/posts/1"):
        head = (
            f"GET {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {APP_KEY}\r\n"
            f"Authorization: Bearer {alice}\r\nConnection: close\r\n"
        )
        # the same request without a body first: a remembered verdict must not carry over
        assert proxy.raw(head.encode() + b"\r\n").startswith(b"HTTP/1.1 200")
        data = b"{}" if framing.startswith("Content") else b"2\r\n{}\r\n0\r\n\r\n"
        answer = proxy.raw(f"{head}{framing}\r\n\r\n".encode() + data)
        assert answer.startswith(b"HTTP/1.1 403") and b"PERMISSION_DENIED" in answer, answer
    # an empty body announced as such is no body
    status, _, _, _ = proxy.request("GET", "/v1/data/posts/1", as_user("alice"), body=b"")
    assert status == 200


# --------------------------------------------------------------------------- list filter names

UPSTREAM_SECRET = "upstream-secret-self-attacks-0123456789"


@pytest.fixture(scope="module")
def recording_upstream() -> Iterator[UpstreamServer]:
    with start_upstream(header_secrets={"X-Upstream-Key": UPSTREAM_SECRET}) as server:
        yield server


def filter_config(upstream: UpstreamServer, filter_name: str) -> dict[str, Any]:
    """Alice may list posts only as her own, with the owner filter `filter_name`."""
    config = base_config(upstream.url, upstream.inject())
    config["routes"] = [{"match": "GET /v1/data/{table}", "acl": "search", "op": "list"}]
    config["keys"] = [
        {"id": "app", "hash": digest(APP_KEY), "type": "admin", "roles": ["anonymous"]}
    ]
    config["users"] = {
        "jwt": {"algorithms": ["HS256"], "secret": SECRET, "issuer": "any", "audience": "any"}
    }
    config["roles"] = {"anonymous": {"*": []}, "user": {"posts": ["list:self"]}}
    config["self"] = {"owner_field": "createdBy", "list_filter": {"query": {filter_name: "{user}"}}}
    config["upstream"]["identity_headers"] = {"user": "X-Keyproxy-User"}
    return config


@pytest.fixture(scope="module")
def nested_filter_proxy(
    recording_upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keyproxy]:
    kp = start_keyproxy(
        tmp_path_factory.mktemp("nested"), filter_config(recording_upstream, "filter[createdBy]")
    )
    yield kp
    kp.stop()


@pytest.mark.parametrize(
    "query",
    [
        "filter.createdBy=bob",  # qs with allowDots, Spring binders: filter[createdBy]
        "filter[createdBy][]=bob",  # qs: an array [bob, alice], an IN to many ORMs
        "filter%5BcreatedBy%5D%5B%5D=bob",
        "filter[createdBy][$ne]=nobody",  # Strapi/Mongo-style operator on the owner
        "filter[createdBy]=bob",
        "filter=everything",  # replaces the whole filter object in some parsers
        "filter[]=x",
        "FILTER[CREATEDBY].x=bob",
    ],
)
def test_a_nested_owner_filter_cannot_be_widened_by_another_spelling_of_its_path(
    nested_filter_proxy: Keyproxy, recording_upstream: UpstreamServer, query: str
):
    recording_upstream.reset()
    status, _, body, _ = nested_filter_proxy.request(
        "GET", f"/v1/data/posts?{query}", as_user("alice")
    )
    assert (status, error_of(body)) == (403, "PERMISSION_DENIED"), body
    assert recording_upstream.records() == []


def test_a_nested_owner_filter_leaves_other_filters_alone(
    nested_filter_proxy: Keyproxy, recording_upstream: UpstreamServer
):
    status, _, body, _ = nested_filter_proxy.request(
        "GET", "/v1/data/posts?filter[title]=x&filterx=1", as_user("alice")
    )
    assert status == 200, body
    assert json.loads(body)["query"] == "filter[title]=x&filterx=1&filter%5BcreatedBy%5D=alice"


@pytest.mark.parametrize(
    ("raw", "widens"),
    [
        ("filter[createdBy]", True),
        ("filter.createdBy", True),
        ("filter%5BcreatedBy%5D[]", True),
        ("[filter][createdBy]", True),
        ("filter", True),
        ("filter[createdBy][$in][0]", True),
        ("filter[title]", False),
        ("filterx", False),
        ("createdBy", False),
        ("", False),
    ],
)
def test_widened_by_reads_every_spelling_of_the_filter_path(raw: str, widens: bool):
    records = SelfRecords("createdBy", (("filter[createdBy]", "{user}"),))
    assert records.filter_paths == (("filter", "createdby"),)
    assert records.widened_by(raw) is widens


# --------------------------------------------------------------------------- owner read


@pytest.fixture(scope="module")
def owned_proxy(
    recording_upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keyproxy]:
    config = filter_config(recording_upstream, "createdBy")
    config["routes"] = [
        {"match": "GET /owned/{table}/{id}", "acl": "get", "op": "read"},
        {"match": "PATCH /owned/{table}/{id}", "acl": "get", "op": "update"},
        {"match": "DELETE /owned/{table}/{id}", "acl": "get", "op": "delete"},
    ]
    config["roles"]["user"] = {"posts": ["read:self", "update:self", "delete:self"]}
    kp = start_keyproxy(tmp_path_factory.mktemp("owned"), config)
    yield kp
    kp.stop()


def test_the_owner_read_asks_for_what_the_upstream_will_serve(owned_proxy: Keyproxy):
    """An upstream may let the query pick the record (`$request->id` in Laravel reads
    `?id=` before the route's `{id}`): the owner read must send the same query."""
    status, _, body, _ = owned_proxy.request("GET", "/owned/posts/1", as_user("alice"))
    assert status == 200 and json.loads(body)["createdBy"] == "alice", body
    status, _, body, _ = owned_proxy.request("GET", "/owned/posts/1?id=2", as_user("alice"))
    assert (status, error_of(body)) == (403, "PERMISSION_DENIED"), body
    assert b"bob" not in body
    status, _, body, _ = owned_proxy.request("GET", "/owned/posts/2?id=1", as_user("alice"))
    assert status == 200 and json.loads(body)["createdBy"] == "alice", body


@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
def test_the_owner_read_of_a_write_asks_with_its_query_too(
    owned_proxy: Keyproxy, recording_upstream: UpstreamServer, method: str
):
    recording_upstream.reset()
    status, _, body, _ = owned_proxy.request(method, "/owned/posts/1?id=2", as_user("alice"), b"{}")
    assert (status, error_of(body)) == (403, "PERMISSION_DENIED"), body
    assert [r["method"] for r in recording_upstream.records()] == ["GET"]  # the write never went
    status, _, body, _ = owned_proxy.request(method, "/owned/posts/1", as_user("alice"), b"{}")
    assert status == 200 and json.loads(body)["changed"] is True, body


@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_the_owner_read_carries_the_headers_the_request_carries(
    owned_proxy: Keyproxy, recording_upstream: UpstreamServer, method: str
):
    """A backend may pick the record by a request header (a tenant, PostgREST's
    `Accept-Profile` schema): read without it, bob's record 1 in the other tenant was
    checked as alice's record 1 of the default one, then served or changed."""
    other = [*as_user("alice"), ("X-Tenant", "other")]
    body_sent = None if method == "GET" else b"{}"
    recording_upstream.reset()
    status, _, body, _ = owned_proxy.request(method, "/owned/posts/1", other, body_sent)
    assert (status, error_of(body)) == (403, "PERMISSION_DENIED"), body
    assert b"bob" not in body
    assert [r["method"] for r in recording_upstream.records()] == ["GET"]  # the owner read only
    status, _, body, _ = owned_proxy.request(method, "/owned/posts/2", other, body_sent)
    assert status == 200 and json.loads(body)["createdBy"] == "alice", body


def test_the_owner_read_carries_no_client_credential_or_forwarding(
    owned_proxy: Keyproxy, recording_upstream: UpstreamServer
):
    """What the owner read takes from the client it takes as the request does: no key,
    no token, no forged forwarding or identity header, nothing `Connection` names."""
    sent = [
        *as_user("alice"),
        ("X-Forwarded-For", "10.9.9.9"),
        ("X-Keyproxy-User", "bob"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "dropped"),
        ("X-Tenant", "default"),
    ]
    recording_upstream.reset()
    status, _, body, _ = owned_proxy.request("PATCH", "/owned/posts/1", sent, b"{}")
    assert status == 200, body
    read, write = recording_upstream.records()
    assert read["method"] == "GET" and write["method"] == "PATCH"
    got = {name.lower(): value for name, value in read["headers"]}
    assert got["x-tenant"] == "default"  # the client's own headers go along
    assert got["x-keyproxy-user"] == "alice"  # keyproxy's word, not the client's
    for name in ("x-api-key", "authorization", "x-hop"):
        assert name not in got, name
    assert got.get("x-forwarded-for") != "10.9.9.9"
    assert APP_KEY not in json.dumps(read["headers"])


def test_owner_read_headers_keep_only_what_cannot_change_the_read() -> None:
    kept = owner_read_headers(
        [
            ("x-tenant", "a"),
            ("x-tenant", "b"),
            ("x-http-method-override", "DELETE"),
            ("x-method-override", "PUT"),
            ("if-none-match", '"v1"'),
            ("range", "bytes=0-1"),
            ("accept", "text/csv"),
            ("x-upstream-key", "forged"),
            ("x-forwarded-host", "evil.example"),
            ("connection", "close, X-Hop"),
            ("x-hop", "1"),
        ],
        ["X-Upstream-Key"],
    )
    assert kept == {"x-tenant": "a, b"}


def test_the_owner_read_says_who_asks_as_the_request_does(
    owned_proxy: Keyproxy, recording_upstream: UpstreamServer
):
    """A backend that scopes records by the identity headers (a tenant per key or user)
    must answer the owner read as it will answer the request itself."""
    recording_upstream.reset()
    status, _, body, _ = owned_proxy.request("GET", "/owned/posts/1", as_user("alice"))
    assert status == 200, body
    reads = recording_upstream.records()
    assert [r["method"] for r in reads] == ["GET", "GET"]  # the owner read, then the request
    for read in reads:
        users = [v for n, v in read["headers"] if n.lower() == "x-keyproxy-user"]
        assert users == ["alice"], read["headers"]
        assert [v for n, v in read["headers"] if n.lower() == "x-upstream-key"] == [UPSTREAM_SECRET]
