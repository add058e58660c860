"""Attacks on self records by a logged-in user with a valid key and token, through the
real `keyproxy serve` in front of the real demo backend: each test is a way of reading
or listing another user's records that the owner filter or the owner read must stop."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import start_demo_backend
from tests.proxy_process import Keyproxy, error_of, start_keyproxy
from tests.test_self_identity import APP_KEY, DEMO_SECRET, as_user, self_config, token

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
