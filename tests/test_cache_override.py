"""The response cache decides on the method the upstream acts on, through `keyproxy serve`:
on a cached route that allows method overrides, a GET that asks for DELETE is a write. It
must reach the upstream (never be answered from the cache), its answer must never be
stored as the resource's GET answer, and it evicts the cached reads like any write."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.procs import UpstreamServer, start_upstream
from tests.proxy_process import Keyproxy, base_config, digest, start_keyproxy

ADMIN = "sk_" + "8" * 64
ROUTE = "GET|DELETE /echo/**"


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with start_upstream(header_secrets={"X-Upstream-Key": "cache-override-secret-0123"}) as up:
        yield up


@pytest.fixture(scope="module")
def kp(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyproxy]:
    config: dict[str, Any] = base_config(upstream.url, upstream.inject())
    config["routes"] = [
        {"match": ROUTE, "acl": "echo", "op": "none", "allow_method_override": True}
    ]
    config["keys"] = [{"id": "admin", "hash": digest(ADMIN), "type": "admin"}]
    config["cache"] = {"backend": "memory", "ttl": "60s", "routes": [ROUTE]}
    proxy = start_keyproxy(tmp_path_factory.mktemp("cache-override"), config)
    yield proxy
    proxy.stop()


def upstream_count(upstream: UpstreamServer, path: str) -> int:
    return len([r for r in upstream.records() if r["raw_path"] == path])


def settle(upstream: UpstreamServer, path: str, count: int) -> None:
    """The cache stores in the background: wait until the upstream saw `count` requests."""
    deadline = time.monotonic() + 5
    while upstream_count(upstream, path) < count:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.1)  # the store's write lands after the answer has left


def test_a_get_that_asks_for_delete_is_never_answered_from_the_cache(
    kp: Keyproxy, upstream: UpstreamServer
) -> None:
    path = "/echo/posts/1"
    upstream.reset()
    assert kp.request("GET", path, key=ADMIN)[0] == 200  # a plain read, stored
    settle(upstream, path, 1)
    assert kp.request("GET", path, key=ADMIN)[0] == 200
    assert upstream_count(upstream, path) == 1  # the cache answered the repeat
    status, _, _, _ = kp.request("GET", path, [("X-HTTP-Method-Override", "DELETE")], key=ADMIN)
    assert status == 200
    # The delete reached the upstream, and evicted the stored read of the resource.
    assert upstream_count(upstream, path) == 2
    settle(upstream, path, 2)
    assert kp.request("GET", path, key=ADMIN)[0] == 200
    assert upstream_count(upstream, path) == 3


def test_the_answer_to_a_delete_asked_by_override_is_never_stored_as_the_read(
    kp: Keyproxy, upstream: UpstreamServer
) -> None:
    path = "/echo/posts/2"
    upstream.reset()
    status, _, body, _ = kp.request("GET", path, [("X-HTTP-Method-Override", "DELETE")], key=ADMIN)
    assert status == 200
    settle(upstream, path, 1)
    status, _, body, _ = kp.request("GET", path, key=ADMIN)
    assert status == 200
    assert upstream_count(upstream, path) == 2  # the read went upstream itself
    sent = [name.lower() for name, _ in json.loads(body)["headers"]]
    assert "x-http-method-override" not in sent  # its own answer, not the delete's
