"""The `keyproxy` command through real subprocesses (README, Commands)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from keyproxy.commands.demo import DEMO_KEYS, example_config_text
from tests.proxy_process import KEYS, base_config

ROOT = Path(__file__).resolve().parent.parent


def keyproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "keyproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


@pytest.mark.parametrize("command", ["serve", "demo", "check", "keygen", "explain"])
def test_every_command_has_help(command):
    result = keyproxy(command, "--help")
    assert result.returncode == 0
    assert "usage: keyproxy " + command in result.stdout


def test_top_level_help_and_version():
    assert keyproxy("--help").returncode == 0
    assert keyproxy("--version").stdout.startswith("keyproxy ")


def test_check_ok(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_config("http://127.0.0.1:1", {"headers": {"K": "v"}})))
    result = keyproxy("check", "-c", str(path))
    assert result.returncode == 0, result.stdout
    assert re.fullmatch(r"OK: 6 keys, \d+ routes\n", result.stdout)


def test_check_reports_every_error_with_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "server:\n"
        "  listen: 0.0.0.0:8080\n"
        "  max_bdoy: 10MiB\n"  # line 3: typo
        "upstream:\n"
        "  url: http://127.0.0.1:3000\n"
        "  timeout: 30 seconds\n"  # line 6: bad duration
        "  inject:\n"
        "    headers: {X-API-Key: '${NOT_SET_ANYWHERE_123}'}\n"  # line 8
        "routes:\n"
        "  - {match: 'GET /v1/{table}', acl: search}\n"
        "keys:\n"
        "  - {id: a, hash: 'sha256:abc', type: read}\n"  # line 12: bad hash
        "cache:\n"
        "  backend: sqlite:///tmp/c.db\n"  # line 14: not supported yet
        "  ttl: 5s\n"
        "  routes: ['GET /v1/{table}']\n"
    )
    result = keyproxy("check", "-c", str(path), env={"NOT_SET_ANYWHERE_123": ""})
    assert result.returncode == 1
    out = result.stdout
    for line, words in [
        (3, "max_bdoy"),
        (6, "timeout"),
        (8, "NOT_SET_ANYWHERE_123"),
        (12, "hash"),
        (14, "not supported yet"),
    ]:
        assert re.search(rf":{line}:.*{words}|:{line}:.*\n?.*{words}", out), (line, out)
    assert "max_body" in out  # the did-you-mean hint


def test_check_missing_file():
    result = keyproxy("check", "-c", "/nonexistent/keyproxy.yaml")
    assert result.returncode == 1
    assert "nonexistent" in result.stdout


@pytest.mark.parametrize(
    ("kind", "prefix", "type_"), [("publishable", "pk_", "read"), ("secret", "sk_", "write")]
)
def test_keygen_prints_a_key_once_and_only_its_hash_in_yaml(kind, prefix, type_):
    result = keyproxy("keygen", "--kind", kind, "--id", "my-app")
    assert result.returncode == 0
    keys = re.findall(rf"\b{prefix}[0-9a-f]{{64}}\b", result.stdout)
    assert len(keys) == 1
    key = keys[0]
    digest = hashlib.sha256(key.encode()).hexdigest()
    yaml_part = result.stdout.split("Paste this entry", 1)[1].split("\n", 1)[1]
    entry = yaml.safe_load(yaml_part)[0]
    assert entry["id"] == "my-app"
    assert entry["hash"] == f"sha256:{digest}"
    assert entry["type"] == type_
    assert key not in yaml_part


def test_two_keygens_differ():
    a, b = keyproxy("keygen").stdout, keyproxy("keygen").stdout
    assert a != b


def test_explain_allow_and_deny(tmp_path):
    path = tmp_path / "c.yaml"
    inject = {"headers": {"K": "k-upstream-secret-value"}}
    path.write_text(yaml.safe_dump(base_config("http://127.0.0.1:3000", inject)))
    allow = keyproxy(
        "explain",
        "-c",
        str(path),
        "--key",
        KEYS["reader"],
        "GET",
        "http://localhost:8080/v1/data/posts?limit=2",
    )
    assert allow.returncode == 0, allow.stdout
    assert "verdict: ALLOW -> GET http://127.0.0.1:3000/v1/data/posts?limit=2" in allow.stdout
    assert "key 'reader'" in allow.stdout
    assert "injected: K" in allow.stdout
    deny = keyproxy(
        "explain", "-c", str(path), "--key", KEYS["reader"], "DELETE", "/v1/data/posts/1"
    )
    assert deny.returncode == 1
    assert "DENY" in deny.stdout and "PERMISSION_DENIED" in deny.stdout
    assert "verdict: DENY 403 PERMISSION_DENIED" in deny.stdout
    unknown = keyproxy("explain", "-c", str(path), "--key", "pk_" + "0" * 64, "GET", "/v1/data/x")
    assert unknown.returncode == 1 and "INVALID_TOKEN" in unknown.stdout


def test_explain_and_check_name_a_route_the_same_way(tmp_path):
    """`check` reports an error in the second route as routes[1]; `explain` must name the
    route it matched the same way, or an operator reading both looks at the wrong one."""
    head = (
        "upstream: {url: 'http://127.0.0.1:3000'}\n"
        "routes:\n"
        "  - {match: 'GET /v1/health', acl: public}\n"
        "  - {match: 'GET /v1/data/{table}', acl: search%s}\n"  # line 4
        "keys:\n"
        f"  - {{id: reader, hash: 'sha256:{hashlib.sha256(KEYS['reader'].encode()).hexdigest()}'"
        ", type: read}\n"
    )
    path = tmp_path / "c.yaml"
    path.write_text(head % ", acl_typo: 1")
    checked = keyproxy("check", "-c", str(path))
    assert checked.returncode == 1 and "routes[1]" in checked.stdout, checked.stdout
    path.write_text(head % "")
    explained = keyproxy("explain", "-c", str(path), "--key", KEYS["reader"], "GET", "/v1/data/x")
    assert explained.returncode == 0, explained.stdout
    assert "routes[1] 'GET /v1/data/{table}' (line 4)" in explained.stdout, explained.stdout


def test_explain_decides_for_the_address_given_with_ip(tmp_path):
    config = base_config("http://127.0.0.1:3000", {"headers": {"K": "k-upstream-secret-value"}})
    for key in config["keys"]:
        key["ips"] = ["10.0.0.0/8"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ("explain", "-c", str(path), "--key", KEYS["reader"])
    inside = keyproxy(*args, "--ip", "10.1.2.3", "GET", "/v1/data/posts")
    assert inside.returncode == 0 and "client 10.1.2.3" in inside.stdout, inside.stdout
    outside = keyproxy(*args, "GET", "/v1/data/posts")  # the default, 127.0.0.1
    assert outside.returncode == 1 and "IP_NOT_ALLOWED" in outside.stdout, outside.stdout


@pytest.mark.parametrize(
    ("inject", "shown"),
    [
        ({"headers": {"X-K": "very-secret-upstream-value-123"}}, "injected: X-K"),
        ({"query": {"apikey": "very-secret-upstream-value-123"}}, "/echo/a?x=1&apikey=[REDACTED]"),
    ],
)
def test_explain_never_prints_the_upstream_secret(tmp_path, inject, shown):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_config("http://127.0.0.1:3000", inject)))
    result = keyproxy("explain", "-c", str(path), "--key", KEYS["admin"], "GET", "/echo/a?x=1")
    assert result.returncode == 0, result.stdout
    assert "very-secret-upstream-value-123" not in result.stdout
    assert shown in result.stdout


def test_example_config_holds_the_demo_keys_hashes():
    text = example_config_text()
    for key in DEMO_KEYS.values():
        assert hashlib.sha256(key.encode()).hexdigest() in text
    assert (ROOT / "config.example.yaml").read_text() == text


def test_example_config_checks_ok():
    result = keyproxy("check", "-c", "config.example.yaml", env={"UPSTREAM_SECRET": "s" * 32})
    assert result.returncode == 0, result.stdout
    assert result.stdout == "OK: 4 keys, 9 routes\n"


def _sources_config(tmp_path, sources, **key_changes):
    config = base_config("http://127.0.0.1:3000", {"headers": {"K": "k-upstream-secret-value"}})
    config["server"]["credential_sources"] = sources
    for key in config["keys"]:
        if key["id"] == "reader":
            key.update(key_changes)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("source", ["query", "basic"])
def test_explain_sends_the_key_through_the_only_enabled_source(tmp_path, source):
    path = _sources_config(tmp_path, [source])
    result = keyproxy("explain", "-c", path, "--key", KEYS["reader"], "GET", "/v1/data/posts?a=1")
    assert result.returncode == 0, result.stdout
    assert f"key 'reader' (read) via {source}" in result.stdout
    # The client's key never reaches the upstream, whichever way it came.
    assert "verdict: ALLOW -> GET http://127.0.0.1:3000/v1/data/posts?a=1\n" in result.stdout
    assert KEYS["reader"] not in result.stdout


@pytest.mark.parametrize("source", ["header", "basic", "query"])
def test_explain_via_names_the_source(tmp_path, source):
    path = _sources_config(tmp_path, ["header", "basic", "query"])
    args = ("explain", "-c", path, "--key", KEYS["reader"], "--via", source, "--json")
    result = keyproxy(*args, "GET", "/v1/data/posts")
    assert result.returncode == 0, result.stdout
    steps = json.loads(result.stdout)["steps"]
    assert f"via {source};" in steps[0]["detail"]


def test_explain_via_a_source_the_deployment_refuses_is_denied_as_live(tmp_path):
    path = _sources_config(tmp_path, ["query"])
    result = keyproxy(
        "explain", "-c", path, "--key", KEYS["reader"], "--via", "header", "GET", "/v1/data/posts"
    )
    assert result.returncode == 1, result.stdout
    assert "verdict: DENY 401 INVALID_TOKEN" in result.stdout
    assert "not accepted here: send it as the ?api_key=<key> query parameter" in result.stdout


def test_explain_basic_with_an_unknown_key_is_refused(tmp_path):
    path = _sources_config(tmp_path, ["basic"])
    result = keyproxy("explain", "-c", path, "--key", "pk_" + "0" * 64, "GET", "/v1/data/posts")
    assert result.returncode == 1 and "INVALID_TOKEN" in result.stdout, result.stdout


def test_explain_via_needs_a_key(tmp_path):
    path = _sources_config(tmp_path, ["query"])
    result = keyproxy("explain", "-c", path, "--key-id", "reader", "--via", "query", "GET", "/")
    assert result.returncode == 2
    assert result.stderr.strip() == "--via says how --key travels: give --key too"
    bad = keyproxy("explain", "-c", path, "--key", KEYS["reader"], "--via", "cookie", "GET", "/")
    assert bad.returncode == 2 and "invalid choice: 'cookie'" in bad.stderr


def test_explain_key_id_and_report_mode_on_a_query_only_deployment(tmp_path):
    path = _sources_config(tmp_path, ["query"], mode="report", ips=["10.0.0.0/8"])
    by_id = keyproxy("explain", "-c", path, "--key-id", "reader", "GET", "/v1/data/posts")
    assert by_id.returncode == 0, by_id.stdout
    assert "via --key-id" in by_id.stdout
    reported = keyproxy("explain", "-c", path, "--key", KEYS["reader"], "GET", "/v1/data/posts")
    assert reported.returncode == 0, reported.stdout
    assert "via query" in reported.stdout
    assert "would deny (report mode): 403 IP_NOT_ALLOWED" in reported.stdout


def test_explain_header_adds_a_request_header(tmp_path):
    """`--header` reaches the decision: a second X-API-Key makes the credential ambiguous."""
    path = _sources_config(tmp_path, ["header"])
    args = ("explain", "-c", path, "--key", KEYS["reader"])
    alone = keyproxy(*args, "GET", "/v1/data/posts")
    assert alone.returncode == 0, alone.stdout
    doubled = keyproxy(*args, "--header", f"X-API-Key: {KEYS['writer']}", "GET", "/v1/data/posts")
    assert doubled.returncode == 1, doubled.stdout
    assert "verdict: DENY 400 AMBIGUOUS_CREDENTIALS" in doubled.stdout
