"""What the product promises, checked against the real commands and a real `keyproxy serve`.

Each test holds one promise of the README (commands, the configuration, metrics, errors)
that an audit found broken, and fails without its fix.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.procs import UpstreamServer
from tests.proxy_process import CRUD_ROUTES, KEYS, Keyproxy, base_config, digest, start_keyproxy

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"
ADMIN_KEY = "sk_a91ce2de0b0d34b3b3cd268c3b2778d61fca5039eabde514c8bb41c54333fce5"
REPORT_KEY = "pk_" + "f" * 64


def keyproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyproxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"UPSTREAM_SECRET": "example-secret-value", "PATH": "/usr/bin:/bin"},
    )


def metrics(proxy: Keyproxy) -> list[str]:
    url = f"http://{proxy.admin_host}:{proxy.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode().splitlines()


# -- explain: a request no client could send is bad input (exit 2), never decided ----------


@pytest.mark.parametrize("header", ["X-Trace", ": no-name", "X Trace: 1", "Bad\tName: 1"])
def test_explain_refuses_a_header_that_is_not_name_colon_value(header: str) -> None:
    done = keyproxy(
        "explain", "-c", str(EXAMPLE), "--key", ADMIN_KEY, "--header", header, "GET", "/v1/data/x"
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("--header:"), done.stderr


@pytest.mark.parametrize(
    "url",
    [
        "http://[bad/v1/data/posts",
        "ftp://example.com/v1/data/posts",
        "http://example.com:99999/v1/data/posts",
        "http:///v1/data/posts",
    ],
)
def test_explain_refuses_a_url_it_cannot_send(url: str) -> None:
    done = keyproxy("explain", "-c", str(EXAMPLE), "--key", ADMIN_KEY, "GET", url)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("URL:"), done.stderr
    assert "Traceback" not in done.stderr


def test_explain_still_decides_a_valid_absolute_url_and_header() -> None:
    done = keyproxy(
        "explain", "-c", str(EXAMPLE), "--key", ADMIN_KEY, "--header", "X-Trace: 1",
        "GET", "https://api.example.com:8443/v1/data/posts?page=2",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verdict: ALLOW" in done.stdout


def test_explain_help_names_every_exit_status() -> None:
    done = keyproxy("explain", "--help")
    assert done.returncode == 0
    assert "2 bad input" in " ".join(done.stdout.split())


# -- a command that cannot start says so in one line, never a traceback ----------------------


@pytest.mark.parametrize(
    "command", [["serve", "-c", str(EXAMPLE)], ["demo"], ["demo-backend"]], ids=lambda c: c[0]
)
@pytest.mark.parametrize("port", ["65536", "99999", "-1"])
def test_a_port_out_of_range_is_one_line(command: list[str], port: str) -> None:
    done = keyproxy(*command, "--port", port)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr == f"--port {port}: expected a port from 0 to 65535 (0: any free one)\n"


# -- cache.routes: a pattern stands for the GET routes it covers -----------------------------


def _cache_config(tmp_path: Path, routes: list[str]) -> Path:
    config = yaml.safe_load(EXAMPLE.read_text())
    config["cache"]["routes"] = routes
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_check_takes_a_cache_pattern_covering_routes(tmp_path: Path) -> None:
    done = keyproxy("check", "-c", str(_cache_config(tmp_path, ["GET /v1/data/**"])))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK:")


@pytest.mark.parametrize(
    "pattern", ["GET /v1/nothing/**", "DELETE /v1/data/**", "GET /v1/data/{table}/{id}/x"]
)
def test_check_refuses_a_cache_pattern_covering_no_get_route(tmp_path: Path, pattern: str) -> None:
    done = keyproxy("check", "-c", str(_cache_config(tmp_path, [pattern])))
    assert done.returncode == 1, done.stdout
    assert "cache.routes[0]" in done.stdout and "is not one of the routes" in done.stdout
    assert ".yaml:" in done.stdout.split("cache.routes[0]")[0]  # names the file and line


@pytest.mark.parametrize(
    ("pattern", "covered"),
    [
        ("GET /v1/data/**", ["GET /v1/data/{table}", "GET /v1/data/{table}/{id}"]),
        ("GET /v1/data/*", ["GET /v1/data/{table}"]),
        ("GET /v1/data/{t}/{id}", ["GET /v1/data/{table}/{id}"]),
        ("GET /**", ["GET /v1/data/{table}", "GET /v1/data/{table}/{id}", "GET /_stream/**",
                     "GET|PUT /{index}/_settings"]),
        ("GET /_stream/x", []),  # a literal covers only that literal, never `**`
        ("GET /v1/data", []),
        ("POST /v1/data/**", []),
        ("not a pattern", []),
    ],
)  # fmt: skip
def test_a_cache_pattern_covers_exactly_the_get_routes_under_it(
    monkeypatch: pytest.MonkeyPatch, pattern: str, covered: list[str]
) -> None:
    from keyproxy.config import load_config
    from keyproxy.config.response_sections import _covered_routes

    monkeypatch.setenv("UPSTREAM_SECRET", "example-secret-value")
    routes = load_config(str(EXAMPLE)).routes
    assert [route.match for route in _covered_routes(pattern, routes)] == covered


@pytest.fixture(scope="module")
def cached(
    upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keyproxy]:
    config = base_config(upstream.url, upstream.inject())
    other = {"match": "GET /other/{id}", "acl": "get", "op": "none"}
    config["routes"] = [*copy.deepcopy(CRUD_ROUTES), other]
    config["cache"] = {"backend": "memory", "ttl": "30s", "routes": ["GET /v1/data/**"]}
    proxy = start_keyproxy(tmp_path_factory.mktemp("cached"), config)
    yield proxy
    proxy.stop()


def _upstream_hits(upstream: UpstreamServer, path: str) -> int:
    return sum(1 for record in upstream.records() if record["raw_path"] == path)


def test_a_cache_pattern_caches_the_routes_it_covers_and_no_other(
    cached: Keyproxy, upstream: UpstreamServer
) -> None:
    upstream.reset()
    for path in ("/v1/data/posts/7", "/v1/data/posts", "/other/7"):
        for _ in range(2):
            status, _, _, _ = cached.request("GET", path, key=KEYS["admin"])
            assert status == 200
    assert _upstream_hits(upstream, "/v1/data/posts/7") == 1  # GET /v1/data/{table}/{id}
    assert _upstream_hits(upstream, "/v1/data/posts") == 1  # GET /v1/data/{table}
    assert _upstream_hits(upstream, "/other/7") == 2  # not under the pattern


# -- check: every error names its line and says how to fix it -------------------------------


def _edit(config: dict[str, Any], change: str) -> None:
    """Apply one named breakage to the example configuration."""
    website, admin = config["keys"][0], config["keys"][3]
    match change:
        case "too many referers":
            website["referers"] = [f"https://h{i}.example.com" for i in range(101)]
        case "too many ips":
            admin["ips"] = [f"10.0.{i}.0/24" for i in range(101)]
        case "expires and ttl":
            website["expires"], website["ttl"] = "2030-01-01T00:00:00Z", "7d"
        case "bad role name":
            website["roles"] = ["not a role!"]
        case "role not a mapping":
            config["roles"]["guest"] = ["read"]
        case "acl listed twice":
            website["acls"] = ["get", "get"]
        case "injected value with spaces":
            config["upstream"]["inject"]["headers"]["X-Extra"] = " padded "
        case "cache entry over the cache":
            config["cache"].update(max_bytes="1MiB", max_entry_bytes="2MiB")
        case "cache route without GET":
            config["cache"]["routes"] = ["DELETE /v1/data/{table}/{id}"]
        case "zero timeout":
            config["upstream"]["timeout"] = "0s"
        case "empty owner field":
            config["self"]["owner_field"] = ""
        case "list filter without query":
            config["self"]["list_filter"] = {}
        case "trusted proxy not an address":
            config["server"]["trusted_proxies"] = ["proxy.internal"]
        case "basic user with a colon":
            config["upstream"]["inject"]["basic"] = {"username": "a:b", "password": "p"}
        case "identity header keyproxy sets":
            config["upstream"]["identity_headers"]["user"] = "X-Forwarded-For"
        case "fields_at not a path":
            config["routes"][0]["fields_at"] = ["data[*"]
        case "injected header name twice":
            config["upstream"]["inject"]["query"] = {"k": "1"}
            config["upstream"]["inject"]["headers"]["x-api-key"] = "again"
        case _:
            raise AssertionError(change)


BREAKAGES = [
    "too many referers", "too many ips", "expires and ttl", "bad role name", "role not a mapping",
    "acl listed twice", "injected value with spaces",
    "cache entry over the cache", "cache route without GET", "zero timeout", "empty owner field",
    "list filter without query", "trusted proxy not an address", "basic user with a colon",
    "identity header keyproxy sets", "fields_at not a path", "injected header name twice",
]  # fmt: skip


@pytest.mark.parametrize("change", BREAKAGES)
def test_check_gives_every_error_its_line_and_a_hint(tmp_path: Path, change: str) -> None:
    config = yaml.safe_load(EXAMPLE.read_text())
    _edit(config, change)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = keyproxy("check", "-c", str(path))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines, done.stderr
    for line in lines:
        assert line.startswith(f"{path}:"), line
        assert line.split(":", 2)[1].isdigit(), line  # the YAML line
        assert "(hint: " in line and line.endswith(")"), line


@pytest.mark.parametrize(
    "text", ["routes: [unclosed\n", "upstream:\n  url: x\n routes: []\n", "- a list\n"]
)
def test_check_gives_a_hint_for_broken_yaml_too(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    done = keyproxy("check", "-c", str(path))
    assert done.returncode == 1
    assert all("(hint: " in line for line in done.stdout.splitlines()), done.stdout


# -- report mode's metrics and letter-case variants of routes ---------------------------------


def _report_config(upstream: UpstreamServer) -> dict[str, Any]:
    config = base_config(upstream.url, upstream.inject())
    config["routes"].append({"match": "GET /health", "acl": "get"})
    config["keys"].append(
        {"id": "rollout", "hash": digest(REPORT_KEY), "type": "read", "mode": "report",
         "ips": ["10.0.0.0/8"]}
    )  # fmt: skip
    return config


@pytest.fixture(scope="module")
def reporting(
    upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keyproxy]:
    proxy = start_keyproxy(tmp_path_factory.mktemp("report"), _report_config(upstream))
    yield proxy
    proxy.stop()


def test_a_report_mode_refusal_is_forwarded_and_labelled_would_deny(reporting: Keyproxy) -> None:
    """The half of the promise that holds: the request passes and is logged as would_deny."""
    status, _, _, _ = reporting.request("GET", "/v1/data/posts", key=REPORT_KEY)
    assert status == 200
    assert any(
        line.startswith("keyproxy_requests_total{")
        and 'decision="would_deny"' in line
        and 'key="rollout"' in line
        for line in metrics(reporting)
    )


def test_a_report_mode_refusal_counts_in_would_deny_total(reporting: Keyproxy) -> None:
    status, _, _, _ = reporting.request("GET", "/v1/data/posts", key=REPORT_KEY)
    assert status == 200
    lines = metrics(reporting)
    assert any(
        line.startswith('keyproxy_would_deny_total{key="rollout",reason="IP_NOT_ALLOWED"}')
        for line in lines
    ), [line for line in lines if "would_deny" in line]


def test_keys_gauge_counts_report_mode_keys(reporting: Keyproxy) -> None:
    assert 'keyproxy_keys{state="report"} 1.0' in metrics(reporting)


def test_a_letter_case_variant_of_a_literal_route_is_ambiguous(reporting: Keyproxy) -> None:
    status, _, body, _ = reporting.request("GET", "/HEALTH", key=KEYS["admin"])
    assert (status, json.loads(body)["error"]) == (400, "AMBIGUOUS_PATH")
