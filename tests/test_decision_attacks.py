"""Attacks on the decision (steps 1-7) that widen a client's access, each through
`keyproxy serve` against the recording upstream: the request is refused, and the
upstream never sees it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.procs import UpstreamServer
from tests.proxy_process import Keyproxy, base_config, digest, error_of, start_keyproxy

READER = "pk_" + "d" * 64
NARROW = "pk_" + "e" * 64


@pytest.fixture(scope="module")
def kp(upstream: UpstreamServer, tmp_path_factory) -> Iterator[Keyproxy]:
    config = base_config(upstream.url, upstream.inject())
    config["routes"] = [
        {"match": "POST /{index}/_search", "acl": "search", "access": "read", "op": "read"},
        {"match": "GET /{index}/_mapping", "acl": "search", "op": "none"},
    ]
    config["keys"] = [{"id": "reader", "hash": digest(READER), "type": "read"}]
    config["system_tables"] = ["users"]
    proxy = start_keyproxy(tmp_path_factory.mktemp("decision"), config)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def kp_roles(upstream: UpstreamServer, tmp_path_factory) -> Iterator[Keyproxy]:
    """Roles without system tables: a name reaching every table is decided by the roles."""
    config = base_config(upstream.url, upstream.inject())
    config["routes"] = [
        {"match": "POST /{index}/_search", "acl": "search", "access": "read", "op": "read"},
    ]
    config["keys"] = [{"id": "narrow", "hash": digest(NARROW), "type": "read", "roles": ["narrow"]}]
    # `secrets: []` replaces the default for that one table: nothing on it.
    config["roles"] = {"narrow": {"*": ["read", "list"], "secrets": []}}
    proxy = start_keyproxy(tmp_path_factory.mktemp("decision-roles"), config)
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("index", ["posts,secrets", "_all", "*", "sec*", "posts,sec*"])
def test_a_multi_target_name_needs_the_grant_of_every_named_table(
    kp_roles: Keyproxy, upstream: UpstreamServer, index: str
):
    """A table entry narrower than `*` holds for a name that reaches every table too:
    `/_all/_search` must not read the table whose entry grants nothing."""
    kp = kp_roles
    assert kp.request("POST", "/posts/_search", key=NARROW, body=b"{}")[0] == 200  # control
    status, _, body, _ = kp.request("POST", "/secrets/_search", key=NARROW, body=b"{}")
    assert (status, error_of(body)) == (403, "PERMISSION_DENIED"), body
    upstream.reset()
    status, _, body, _ = kp.request("POST", f"/{index}/_search", key=NARROW, body=b"{}")
    assert (status, error_of(body)) == (403, "PERMISSION_DENIED"), body
    assert upstream.records() == []


@pytest.mark.parametrize(
    "index",
    ["posts%2Cusers", "posts%2cusers", "%3Cusers%3E", "remote:users", "posts%2Cus%2A"],
)
def test_an_escaped_list_of_tables_does_not_reach_a_system_table(
    kp: Keyproxy, upstream: UpstreamServer, index: str
):
    """A backend decodes `%2C` before it splits a multi-target name (Elasticsearch reads
    `/posts%2Cusers/_mapping` as posts and users), and reads `<users>` (date math) or
    `cluster:users` as users: the system-table check reads them as it does."""
    assert kp.request("GET", "/posts/_mapping", key=READER)[0] == 200  # control
    upstream.reset()
    status, _, body, _ = kp.request("GET", f"/{index}/_mapping", key=READER)
    assert (status, error_of(body)) == (403, "SYSTEM_TABLE_ACCESS"), body
    assert upstream.records() == []
