"""Table names read strictly when they grant, leniently only when they deny; routes
without `op:` once roles, users or system tables are configured; `op:` fitting methods."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from keyproxy.commands.demo import DEMO_KEYS
from keyproxy.config import ConfigError, parse_config
from keyproxy.policy.permissions import (
    ANY_TABLE,
    DENIED,
    FULL,
    NOT_A_TABLE,
    Permissions,
    build_roles,
    request_name,
    scope_allows,
)
from tests.procs import UpstreamServer, free_port, spawn
from tests.proxy_process import Keyproxy, base_config, digest, error_of, start_keyproxy

READER = "pk_" + "a" * 64
SCOPED = "sk_" + "b" * 64
WRITER = "sk_" + "c" * 64


# --- unit: the strict reading -------------------------------------------------------------


@pytest.mark.parametrize("segment", ["posts", "audit_log", "a-b", "v2"])
def test_an_exact_name_is_one_table(segment: str):
    assert request_name(segment) == segment


@pytest.mark.parametrize("segment", ["posts,users", "use*", "*", "_all", "_search", "a,b"])
def test_a_multi_target_name_is_every_table(segment: str):
    assert request_name(segment) == ANY_TABLE


@pytest.mark.parametrize(
    "segment",
    [
        "POSTS",
        "posts.private",
        "posts:drafts",
        "posts~old",
        "posts!x",
        "Posts.json",
        "posts%2Cusers",
        "",
    ],
)
def test_any_other_spelling_is_no_table(segment: str):
    assert request_name(segment) == NOT_A_TABLE


def test_every_table_needs_a_grant_on_every_table_and_loses_to_any_deny():
    assert not scope_allows(frozenset({"posts:read"}), ANY_TABLE, "read")
    assert scope_allows(frozenset({"*:read"}), ANY_TABLE, "read")
    roles = build_roles({"r": {"*": ["read"], "!users": []}, "s": {"*": ["read"]}})
    permissions = Permissions(roles=roles, roles_enabled=True)
    assert permissions.allows(("s",), ANY_TABLE, "read") == FULL
    assert permissions.allows(("r",), ANY_TABLE, "read") == DENIED
    assert permissions.allows(("r",), "posts", "read") == FULL


# --- unit: the loader -----------------------------------------------------------------------

BASE = """
server: {listen: "127.0.0.1:0"}
upstream: {url: "http://127.0.0.1:9"}
keys:
  - {id: k, type: read,
     hash: "sha256:0000000000000000000000000000000000000000000000000000000000000000"}
routes:
"""


def issues(routes: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + routes, "t.yaml", {})
    return [f"{i.line}: {i.where}: {i.message}" for i in info.value.issues]


def test_an_op_that_does_not_fit_the_methods_is_a_config_error():
    found = issues('  - {match: "GET|DELETE /v1/data/{table}/{id}", acl: get, op: read}\n')
    assert len(found) == 1 and found[0].startswith("8: routes[0].op:"), found
    assert "DELETE" in found[0]
    found = issues('  - {match: "POST /v1/data/{table}", acl: get, op: delete}\n')
    assert "POST" in found[0]
    found = issues('  - {match: "POST /{index}/_search", acl: s, op: read}\n')
    assert "POST" in found[0]


def test_fitting_ops_load():
    config = parse_config(
        BASE
        + '  - {match: "POST /{index}/_search", acl: s, access: read, op: read}\n'
        + '  - {match: "PUT|PATCH /v1/{collection}/{id}", acl: u, op: update}\n'
        + '  - {match: "GET /health", acl: h, op: none}\n',
        "t.yaml",
        {},
    )
    routes = config.routes.routes if hasattr(config.routes, "routes") else config.routes
    health = next(r for r in routes if r.match == "GET /health")
    assert health.op is None and health.no_table_op


def test_two_table_parameters_are_a_config_error():
    found = issues('  - {match: "GET /{index}/{table}", acl: g, op: read}\n')
    assert "more than one table parameter" in found[0]


# --- through `keyproxy serve` -------------------------------------------------------------


@pytest.fixture(scope="module")
def kp(upstream: UpstreamServer, tmp_path_factory) -> Iterator[Keyproxy]:
    config = base_config(upstream.url, upstream.inject())
    config["routes"] = [
        {"match": "GET /v1/data/{table}/{id}", "acl": "get", "op": "read"},
        {"match": "POST /{index}/_search", "acl": "search", "access": "read", "op": "read"},
        {"match": "GET /{table}/_doc/{id}", "acl": "get", "op": "read"},
        {"match": "POST /_bulk", "acl": "bulk"},
        {"match": "GET /health", "acl": "get", "op": "none"},
    ]
    config["keys"] = [
        {"id": "reader", "hash": digest(READER), "type": "read"},
        {"id": "scoped", "hash": digest(SCOPED), "type": "admin", "scopes": ["posts:read"]},
        {"id": "writer", "hash": digest(WRITER), "type": "write"},
    ]
    config["system_tables"] = ["users"]
    proxy = start_keyproxy(tmp_path_factory.mktemp("tables"), config)
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("index", ["posts,users", "use*", "u*", "_all", "*", "posts,us*"])
def test_multi_target_names_do_not_reach_system_tables(kp: Keyproxy, upstream, index: str):
    upstream.reset()
    status, _, body, _ = kp.request("POST", f"/{index}/_search", key=READER, body=b"{}")
    assert (status, error_of(body)) == (403, "SYSTEM_TABLE_ACCESS"), body
    assert upstream.records() == []
    assert kp.request("POST", "/posts/_search", key=READER, body=b"{}")[0] == 200  # control


@pytest.mark.parametrize(
    "table",
    ["posts,users", "posts.private", "POSTS", "posts:drafts", "posts~old", "posts!x", "Posts.json"],
)
def test_a_table_scope_covers_that_exact_name_only(kp: Keyproxy, upstream, table: str):
    upstream.reset()
    status, _, body, _ = kp.request("GET", f"/{table}/_doc/1", key=SCOPED)
    assert (status, error_of(body)) in ((400, "INVALID_PATH"), (403, "SCOPE_INSUFFICIENT")), body
    assert upstream.records() == []
    assert kp.request("GET", "/posts/_doc/1", key=SCOPED)[0] == 200  # control


def test_a_route_without_op_is_admin_only_and_op_none_opts_out(kp: Keyproxy, upstream):
    upstream.reset()
    lines = b'{"table": "users", "doc": {"name": "mallory"}}\n'
    status, _, body, _ = kp.request("POST", "/_bulk", key=WRITER, body=lines)
    assert (status, error_of(body)) == (403, "PERMISSION_DENIED"), body
    assert "names no op" in json.loads(body)["message"]
    assert upstream.records() == []
    assert kp.request("GET", "/health", key=READER)[0] == 200


def backend_table(port: int, table: str, secret: str) -> list[dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/data/{table}", headers={"X-API-Key": secret}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def test_the_example_config_keeps_bulk_writes_off_system_tables(tmp_path: Path):
    secret = "example-backend-secret-0123456789"
    root = Path(__file__).resolve().parents[1]
    backend, match = spawn(
        [sys.executable, str(root / "tests" / "demo_upstream.py"), secret],
        ready=r"READY (\d+)",
        name="demo-backend",
    )
    assert match is not None
    port = int(match.group(1))
    config = yaml.safe_load((root / "keyproxy" / "config.example.yaml").read_text())
    config["server"]["listen"] = f"127.0.0.1:{free_port()}"
    config["server"]["admin_listen"] = f"127.0.0.1:{free_port()}"
    config["upstream"]["url"] = f"http://127.0.0.1:{port}"
    kp = start_keyproxy(tmp_path, config, env={"UPSTREAM_SECRET": secret})
    try:
        lines = b'{"table": "users", "doc": {"name": "mallory", "role": "admin"}}\n'
        status, _, body, _ = kp.request("POST", "/_bulk", key=DEMO_KEYS["batch-writer"], body=lines)
        assert status == 403, body
        assert not any(u.get("name") == "mallory" for u in backend_table(port, "users", secret))
    finally:
        kp.stop()
        backend.stop()
