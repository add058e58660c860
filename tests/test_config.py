"""The configuration loader: what a valid file becomes, and how every mistake is reported.

Each refusal is checked with the line it points at, because a message without
a line is what makes a 100k-key file impossible to fix.
"""

from __future__ import annotations

import gc
import hashlib
import textwrap
from datetime import UTC, datetime
from ipaddress import ip_address
from pathlib import Path

import pytest
import trustme
import yaml

from keyproxy.config import Config, ConfigError, ConfigIssue, load, load_config, parse_config
from keyproxy.config.model import Access, HostPort, KeyType, Rate
from keyproxy.policy.allowlists import IpAllowlist
from keyproxy.policy.routes import RouteTable

ENV = {"UPSTREAM_SECRET": "s3cr3t-upstream-value", "TOKEN": "tok-123"}

BASE = """\
upstream:
  url: http://127.0.0.1:3000
routes:
  - {match: "GET /v1/data/{table}", acl: search}
  - {match: "GET /v1/data/{table}/{id}", acl: get}
  - {match: "POST /v1/data/{table}", acl: index}
  - {match: "DELETE /v1/data/{table}/{id}", acl: delete}
  - {match: "POST /{index}/_search", acl: search, access: read}
"""


def digest_of(seed: object) -> str:
    return hashlib.sha256(str(seed).encode()).hexdigest()


def hash_of(seed: object) -> str:
    return "sha256:" + digest_of(seed)


def parse(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), "test.yaml", ENV if env is None else env)


def issues_of(text: str, env: dict[str, str] | None = None) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        parse(text, env)
    return caught.value.issues


def the_issue(text: str, env: dict[str, str] | None = None) -> ConfigIssue:
    issues = issues_of(text, env)
    assert len(issues) == 1, issues
    return issues[0]


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the first line containing `needle` (so tests never count by hand)."""
    for number, line in enumerate(textwrap.dedent(text).splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in text")


def with_keys(keys: str, base: str = BASE) -> str:
    return base + "keys:\n" + textwrap.indent(textwrap.dedent(keys), "  ")


def key(extra: str = "", *, id: str = "k1", type: str = "read", seed: object = 1) -> str:
    """One key in block style; `extra` holds further field lines."""
    body = f"- id: {id}\n  hash: {hash_of(seed)}\n  type: {type}\n"
    return body + textwrap.indent(textwrap.dedent(extra), "  ")


# --------------------------------------------------------------------------- a full file

FULL = f"""\
server:
  listen: 0.0.0.0:8080
  admin_listen: 127.0.0.1:9901      # /metrics, /healthz, /readyz; never on the public port
  trusted_proxies: [10.0.0.0/8, 192.0.2.10, "2001:db8::/32"]
  max_body: 10MiB
  credential_sources: [header, basic, query]
  query_param: apikey
  max_header_size: 16KiB
  header_timeout: 5s
  keepalive_timeout: 60s
  drain_timeout: 20s

upstream:
  url: https://api.internal:8443/base/
  timeout: 20s
  connect_timeout: 2s
  max_connections: 64
  inject:
    headers:
      X-API-Key: ${{UPSTREAM_SECRET}}
      X-Client: "Bearer ${{TOKEN}}"
    query: {{apikey: "${{UPSTREAM_SECRET}}"}}

routes:                              # first match wins
  - {{match: "GET /v1/data/{{table}}",         acl: search, op: list}}
  - {{match: "GET /v1/data/{{table}}/{{id}}",    acl: get,    op: read}}
  - {{match: "POST /v1/data/{{table}}",        acl: index,  op: create}}
  - {{match: "PATCH /v1/data/{{table}}/{{id}}",  acl: index,  op: update}}
  - {{match: "DELETE /v1/data/{{table}}/{{id}}", acl: delete, op: delete}}
  - {{match: "POST /{{index}}/_search",        acl: search, access: read}}
  - {{match: "POST /_bulk",                  acl: bulk}}
  - {{match: "GET /_stream/**",              acl: stream}}
  - {{match: "GET|PUT /{{index}}/_settings",   acl: settings, allow_method_override: true}}

keys:
  - id: website
    hash: {hash_of("website")}
    type: read
    acls: [get, search]
    referers: ["https://*.example.com/*"]
    ips: ["0.0.0.0/0", "::/0"]
    expires: 2027-01-01T00:00:00Z
    rate_limit: 1000/hour
    quota: 100000
    revoked: false
    description: the public web app
  - id: batch-writer
    hash: {hash_of("batch")}
    type: write
    created: 2026-01-01T00:00:00Z
    ttl: 7d
  - id: ops
    hash: {hash_of("ops")}
    type: admin
    revoked: true
  - id: reader
    hash: {hash_of("reader")}
    type: read

rate_limits:
  store: redis://cache.internal:6379/0
  on_store_error: allow
  timeout: 250ms
  max_buckets: 50000
"""


def test_full_file_server() -> None:
    server = parse(FULL).server
    assert server.listen == HostPort("0.0.0.0", 8080)
    assert server.admin_listen == HostPort("127.0.0.1", 9901)
    proxies = server.trusted_proxies
    assert proxies is not None and proxies.texts == ("10.0.0.0/8", "192.0.2.10", "2001:db8::/32")
    assert proxies.contains(ip_address("10.9.8.7")) and proxies.contains(ip_address("2001:db8::1"))
    assert not proxies.contains(ip_address("192.0.2.11"))
    assert server.max_body == 10 * 1024 * 1024
    assert server.credential_sources == frozenset({"header", "basic", "query"})
    assert server.query_param == "apikey"
    assert server.max_header_size == 16 * 1024
    assert (server.header_timeout, server.keepalive_timeout, server.drain_timeout) == (5, 60, 20)


def test_full_file_upstream() -> None:
    upstream = parse(FULL).upstream
    assert upstream.url == "https://api.internal:8443/base"
    assert (upstream.scheme, upstream.host, upstream.port) == ("https", "api.internal", 8443)
    assert upstream.base_path == "/base"
    assert upstream.host_header == "api.internal:8443"
    assert (upstream.timeout, upstream.connect_timeout, upstream.max_connections) == (20, 2, 64)
    assert upstream.inject_headers == (
        ("X-API-Key", "s3cr3t-upstream-value"),
        ("X-Client", "Bearer tok-123"),
    )
    assert upstream.inject_query == (("apikey", "s3cr3t-upstream-value"),)
    assert upstream.inject_basic is None


def test_full_file_routes() -> None:
    config = parse(FULL)
    assert len(config.routes) == 9
    first, search, settings = config.routes[0], config.routes[5], config.routes[8]
    assert first.index == 0 and first.acl == "search" and first.op == "list"
    assert first.methods == frozenset({"GET", "HEAD"})
    assert first.segments == ("v1", "data", "{table}")
    assert first.line == line_of(FULL, 'GET /v1/data/{table}"')
    assert search.access is Access.READ and search.access_for("POST") is Access.READ
    assert settings.allow_method_override is True
    assert settings.methods == frozenset({"GET", "HEAD", "PUT"})
    assert isinstance(config.route_table, RouteTable)


def test_full_file_keys() -> None:
    config = parse(FULL)
    website, batch, ops, reader = config.keys
    assert website.id == "website" and website.type is KeyType.READ
    assert website.digest == bytes.fromhex(digest_of("website"))
    assert website.acls == frozenset({"get", "search"})
    assert website.referers is not None and len(website.referers) == 1
    assert isinstance(website.ips, IpAllowlist)
    assert website.expires_at == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert website.rate_limit == Rate(1000, 3600.0, "1000/hour")
    assert website.quota == 100000 and website.revoked is False
    assert website.line == line_of(FULL, "id: website")
    assert batch.expires_at == datetime(2026, 1, 8, tzinfo=UTC).timestamp()
    assert batch.acls == frozenset({"index", "delete", "bulk", "settings"})
    assert ops.acls == frozenset({"search", "get", "index", "delete", "bulk", "stream", "settings"})
    assert ops.revoked is True
    assert reader.acls == frozenset({"search", "get", "stream", "settings"})
    assert reader.referers is None and reader.ips is None and reader.expires_at is None
    assert config.keys_by_digest[bytes.fromhex(digest_of("ops"))] is ops
    assert len(config.keys_by_digest) == 4
    assert config.summary() == "4 keys, 9 routes"


def test_full_file_rate_limits() -> None:
    limits = parse(FULL).rate_limits
    assert limits.store == "redis://cache.internal:6379/0"
    assert limits.on_store_error == "allow"
    assert limits.timeout == pytest.approx(0.25)
    assert limits.max_buckets == 50000


def test_a_hop_count_is_refused_with_the_list_form_as_the_hint() -> None:
    issue = the_issue("server:\n  trusted_proxies: 1\n" + BASE)
    assert issue.line == 2 and issue.where == "server.trusted_proxies"
    assert issue.hint is not None and "10.0.0.0/8" in issue.hint and "directly" in issue.hint


@pytest.mark.parametrize("text", ["  trusted_proxies: 0\n", ""])
def test_no_trusted_proxies_means_none(text: str) -> None:
    assert parse("server:\n  listen: 0.0.0.0:8080\n" + text + BASE).server.trusted_proxies is None


def test_rate_limit_prefixes() -> None:
    limits = parse(BASE + "rate_limits:\n  ipv4_prefix: 24\n  ipv6_prefix: 48\n").rate_limits
    assert (limits.ipv4_prefix, limits.ipv6_prefix) == (24, 48)
    defaults = parse(BASE).rate_limits
    assert (defaults.ipv4_prefix, defaults.ipv6_prefix) == (32, 64)


def test_defaults() -> None:
    config = parse(BASE)
    assert config.server == type(config.server)()
    assert config.upstream.timeout == 30 and config.upstream.connect_timeout == 5
    assert config.upstream.max_connections == 512
    assert config.upstream.host_header == "127.0.0.1:3000" and config.upstream.base_path == ""
    assert config.rate_limits == type(config.rate_limits)()
    assert config.keys == () and config.source == "test.yaml"


def test_secrets_do_not_appear_in_repr() -> None:
    config = parse(FULL)
    assert "s3cr3t" not in repr(config.keys) and digest_of("website") not in repr(config.keys)


# --------------------------------------------------------------------------- YAML itself


def test_yaml_syntax_error_has_its_line() -> None:
    text = BASE + "keys:\n  - id: a\n    hash: [unclosed\n"
    issue = the_issue(text)
    assert issue.message.startswith("invalid YAML")
    assert issue.line is not None and issue.line >= line_of(text, "hash: [unclosed")


def test_control_characters_are_refused_with_their_line() -> None:
    issue = the_issue(BASE + "keys:\n  - id: a\x01b\n")
    assert issue.line == 10 and "control character" in (issue.hint or "")


def test_pure_python_yaml_gives_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where libyaml is missing, the fallback loader must read files identically."""
    expected = parse(FULL)
    monkeypatch.setattr(load, "_Loader", load._untyped(yaml.SafeLoader))
    assert parse(FULL) == expected
    assert parse(FULL).keys_by_digest == expected.keys_by_digest
    assert [(i.line, i.message) for i in issues_of(FULL, {})] == [
        (line_of(FULL, "X-API-Key"), "environment variable UPSTREAM_SECRET is not set"),
        (line_of(FULL, "X-Client"), "environment variable TOKEN is not set"),
        (line_of(FULL, "query:"), "environment variable UPSTREAM_SECRET is not set"),
    ]


def test_tabs_get_a_hint() -> None:
    issue = the_issue("upstream:\n\turl: http://x\n")
    assert issue.line == 2 and issue.hint == "indent with spaces, not tabs"


def test_unquoted_ipv6_listen_gets_a_quoting_hint() -> None:
    issue = the_issue("server:\n  listen: [::]:8080\n" + BASE)
    assert issue.line == 2 and "quote" in (issue.hint or "")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(text: str) -> None:
    issue = the_issue(text)
    assert issue.message == "the file is empty"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    issue = the_issue(text)
    assert "top level must be a mapping" in issue.message and issue.line == 1


def test_two_documents_are_refused() -> None:
    issue = the_issue(BASE + "---\n" + BASE)
    assert "single document" in issue.message


def test_duplicate_top_level_section() -> None:
    text = BASE + "upstream:\n  url: http://10.0.0.1\n"
    issue = the_issue(text)
    assert issue.line == line_of(text, "url: http://10.0.0.1") - 1
    assert issue.where == "upstream"
    assert "appears twice" in issue.message and "line 1" in issue.message


def test_duplicate_field_in_a_key_is_refused_not_last_wins() -> None:
    text = with_keys(key("type: admin\n"))
    issue = the_issue(text)
    assert issue.where == "keys[0].type"
    assert issue.line == line_of(text, "type: admin")
    assert f"first on line {line_of(text, 'type: read')}" in issue.message


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "True", "FALSE", "1", "0", "y"])
def test_booleans_are_only_true_and_false(word: str) -> None:
    text = with_keys(key(f"revoked: {word}\n"))
    issue = the_issue(text)
    assert issue.where == "keys[0].revoked"
    assert issue.line == line_of(text, "revoked:")
    assert "expected true or false" in issue.message and issue.hint == "write true or false"


@pytest.mark.parametrize("word", ["true", "false", "yes"])
def test_ints_are_never_booleans(word: str) -> None:
    text = with_keys(key(f"quota: {word}\n"))
    issue = the_issue(text)
    assert issue.where == "keys[0].quota" and "whole number" in issue.message


def test_octal_looking_numbers_are_refused() -> None:
    issue = the_issue("rate_limits:\n  max_buckets: 010000\n" + BASE)
    assert issue.line == 2 and "leading zero" in issue.message


def test_plain_text_stays_text() -> None:
    # YAML 1.1 would read these as a boolean, a number and a sexagesimal int.
    text = with_keys(key(id="no") + key(id="0100", seed=2) + key(id="1_000", seed=3))
    assert [k.id for k in parse(text).keys] == ["no", "0100", "1_000"]


def test_null_values_are_missing_values() -> None:
    text = with_keys(key("rate_limit:\n"))
    issue = the_issue(text)
    assert issue.where == "keys[0].rate_limit" and issue.message == "has no value"
    assert issue.line == line_of(text, "rate_limit:")


def test_explicit_tags_are_refused_except_str() -> None:
    text = with_keys(key("quota: !!int 5\n"))
    issue = the_issue(text)
    assert "explicit YAML tags" in issue.message and issue.line == line_of(text, "quota")
    assert parse(with_keys(key(id="!!str 123"))).keys[0].id == "123"


def test_merge_keys_share_settings_and_explicit_fields_win() -> None:
    text = with_keys(
        f"""\
        - &reader {{id: a, hash: {hash_of("a")}, type: read, acls: [get], rate_limit: 5/second}}
        - <<: *reader
          id: b
          hash: {hash_of("b")}
          acls: [search]
        """
    )
    a, b = parse(text).keys
    assert b.type is KeyType.READ and b.rate_limit == Rate(5, 1.0, "5/second")
    assert (a.acls, b.acls) == (frozenset({"get"}), frozenset({"search"}))


def test_merge_of_something_else_is_refused() -> None:
    text = with_keys(key("<<: [1, 2]\n"))
    issues = issues_of(text)
    assert {i.message for i in issues} == {"'<<' must name a mapping or a list of mappings"}


def test_a_mapping_merged_into_itself_is_refused() -> None:
    text = with_keys(f"- &me {{id: a, hash: {hash_of(1)}, type: read, <<: {{<<: *me}}}}\n")
    issue = the_issue(text)
    assert issue.message == "'<<' merges a mapping into itself"


def test_anchors_and_aliases_for_lists() -> None:
    text = with_keys(key("ips: &office [10.0.0.0/8]\n") + key("ips: *office\n", id="k2", seed=2))
    first, second = parse(text).keys
    assert first.ips is second.ips  # parsed once, shared


# --------------------------------------------------------------------------- ${VAR}


def test_env_whole_and_embedded() -> None:
    text = BASE.replace(
        "  url: http://127.0.0.1:3000\n",
        "  url: ${URL}\n  inject:\n"
        "    headers: {Authorization: 'Bearer ${TOKEN}', X-A: '${A}${B}'}\n",
    )
    upstream = parse(text, {"URL": "http://h:1", "TOKEN": "t", "A": "x", "B": "y"}).upstream
    assert upstream.host_header == "h:1"
    assert upstream.inject_headers == (("Authorization", "Bearer t"), ("X-A", "xy"))


def test_env_escape_is_a_literal() -> None:
    text = with_keys(key("description: 'costs $$5 and $${NOT_A_VAR} and $$${TOKEN}'\n"))
    parse(text, {"TOKEN": "t"})  # no missing-variable error for NOT_A_VAR
    text = BASE.replace("3000\n", "3000\n  inject: {headers: {X-A: 'a$${B}c$$d'}}\n")
    assert parse(text, {}).upstream.inject_headers == (("X-A", "a${B}c$$d"),)


def test_missing_env_var() -> None:
    text = FULL
    issues = issues_of(text, {"TOKEN": "t"})
    assert [i.where for i in issues] == [
        "upstream.inject.headers.X-API-Key",
        "upstream.inject.query.apikey",
    ]
    assert issues[0].line == line_of(text, "X-API-Key:")
    assert issues[0].message == "environment variable UPSTREAM_SECRET is not set"


def test_empty_env_var_is_an_error() -> None:
    text = BASE.replace("3000\n", "3000\n  inject: {headers: {X-Key: '${SECRET}'}}\n")
    issue = the_issue(text, {"SECRET": ""})
    assert issue.message == "environment variable SECRET is empty"
    assert "empty secret" in (issue.hint or "")


def test_empty_env_var_embedded_is_an_error_too() -> None:
    text = BASE.replace("3000\n", "3000\n  inject: {headers: {X-Key: 'Bearer ${SECRET}'}}\n")
    assert the_issue(text, {"SECRET": ""}).message == "environment variable SECRET is empty"


@pytest.mark.parametrize("value", ["${}", "${1ABC}", "${A-B}", "${UNCLOSED", "x${ A}"])
def test_malformed_env_references(value: str) -> None:
    text = with_keys(key(f"description: '{value}'\n"))
    issue = the_issue(text, {"A": "a", "UNCLOSED": "u"})
    assert "must be followed by a variable name" in issue.message
    assert issue.line == line_of(text, "description")


def test_env_values_are_never_printed() -> None:
    secret = "hunter2-very-secret"
    text = BASE.replace("3000\n", "3000\n  inject: {headers: {X-Key: '${S}'}}\n  timeout: ${S}\n")
    with pytest.raises(ConfigError) as caught:
        parse(text, {"S": secret + "\n"})
    assert secret not in str(caught.value)
    assert len(caught.value.issues) == 2
    assert "${S}" in str(caught.value)  # the reference as written is shown instead


# --------------------------------------------------------------------------- unknown fields


def test_unknown_field_with_suggestion() -> None:
    text = with_keys(key("acl: [get]\n"))
    issue = the_issue(text)
    assert issue.where == "keys[0].acl" and issue.message == "unknown field 'acl'"
    assert issue.hint == "did you mean 'acls'?" and issue.line == line_of(text, "acl: [get]")


def test_unknown_section_with_suggestion() -> None:
    text = BASE + "rate_limit:\n  store: memory\n"
    issue = the_issue(text)
    assert issue.where == "rate_limit" and issue.hint == "did you mean 'rate_limits'?"


def test_unknown_field_without_a_close_match_lists_the_known_ones() -> None:
    issue = the_issue("server:\n  zzz: 1\n" + BASE)
    assert issue.line == 2 and issue.hint is not None and "listen" in issue.hint


def test_the_sqlite_cache_backend_is_not_supported_yet() -> None:
    text = (
        BASE
        + "cache:\n  backend: sqlite:///tmp/c.db\n  ttl: 1s\n  routes: ['GET /v1/data/{table}']\n"
    )
    issue = the_issue(text)
    assert issue.where == "cache.backend" and "not supported yet" in issue.message
    assert issue.line == line_of(text, "backend:")


def test_a_cache_section_is_read() -> None:
    text = BASE + "cache:\n  backend: memory\n  ttl: 5s\n  routes: ['GET /v1/data/{table}']\n"
    cache = parse(text).cache
    assert cache is not None and cache.ttl == 5.0
    assert [route.match for route in cache.routes] == ["GET /v1/data/{table}"]


def test_a_key_field_filter_is_compiled() -> None:
    config = parse(with_keys(key("fields: {exclude: [email, author.phone]}\n")))
    flt = config.keys[0].fields
    assert flt is not None and flt.mode == "exclude"
    assert flt.apply({"email": 1, "author": {"phone": 2, "n": 3}}) == {"author": {"n": 3}}


@pytest.mark.parametrize(
    ("field", "problem"),
    [
        ("fields: {exclude: []}", "empty list"),
        ("fields: {include: [a], exclude: [b]}", "exactly one"),
        ("fields: {hide: [a]}", "unknown field"),
        ("fields: {exclude: ['a..b']}", "separated by single dots"),
    ],
)
def test_bad_key_field_filters_are_refused(field: str, problem: str) -> None:
    text = with_keys(key(field + "\n"))
    assert any(problem in issue.message for issue in issues_of(text)), issues_of(text)


# --------------------------------------------------------------------------- server


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8080", HostPort("127.0.0.1", 8080)),
        ("'[::]:8080'", HostPort("::", 8080)),
        ("'[::1]:0'", HostPort("::1", 0)),
        ("localhost:80", HostPort("localhost", 80)),
        ("Proxy.Internal:8080", HostPort("proxy.internal", 8080)),
        (":8080", HostPort("0.0.0.0", 8080)),  # no host: every interface, as Go writes it
    ],
)
def test_listen_forms(value: str, expected: HostPort) -> None:
    assert parse(f"server:\n  listen: {value}\n" + BASE).server.listen == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("8080", "expected host:port"),
        ("[a]", "found a list"),
        ("':'", "not a port number"),
        ("::1:8080", "must be written in brackets"),
        ("'[::1]8080'", "expected [address]:port"),
        ("'[nope]:80'", "not an IPv6 address"),
        ("127.0.0.1:70000", "not a port number"),
        ("127.0.0.1:http", "not a port number"),
        ("300.1.1.1:80", "not an IP address or host name"),
        ("bad_host!:80", "not an IP address or host name"),
    ],
)
def test_listen_refusals(value: str, problem: str) -> None:
    issue = the_issue(f"server:\n  listen: {value}\n" + BASE)
    assert issue.line == 2 and issue.where == "server.listen"
    assert problem in issue.message and "0.0.0.0:8080" in (issue.hint or "")


@pytest.mark.parametrize(
    ("listen", "admin"),
    [
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("127.0.0.1:9000", "0.0.0.0:9000"),
        ("'[::]:8080'", "127.0.0.1:8080"),
        ("127.0.0.1:8080", "'[::]:8080'"),
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("localhost:8080", "127.0.0.1:8080"),
        ("0.0.0.0:9901", None),  # the admin default is 127.0.0.1:9901
    ],
)
def test_admin_listener_never_shares_the_public_port(listen: str, admin: str | None) -> None:
    admin_line = f"  admin_listen: {admin}\n" if admin else ""
    text = f"server:\n  listen: {listen}\n{admin_line}" + BASE
    issue = the_issue(text)
    assert "shares port" in issue.message and "own port" in (issue.hint or "")
    assert issue.line == (3 if admin else 2)


@pytest.mark.parametrize(
    ("listen", "admin"),
    [
        ("0.0.0.0:8080", "127.0.0.1:9901"),
        ("10.0.0.1:8080", "127.0.0.1:8080"),
        ("127.0.0.1:0", "127.0.0.1:0"),
    ],
)
def test_separate_listeners_are_fine(listen: str, admin: str) -> None:
    parse(f"server:\n  listen: {listen}\n  admin_listen: {admin}\n" + BASE)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("trusted_proxies", "1", "a hop count (1) is not accepted"),
        ("trusted_proxies", "2", "a hop count (2) is not accepted"),
        ("trusted_proxies", "-1", "expected 0 or a list of proxy addresses"),
        ("trusted_proxies", "10.0.0.0/8", "expected 0 or a list of proxy addresses"),
        ("trusted_proxies", "[]", "empty list"),
        ("trusted_proxies", "[10.1.2.3/8]", "has host bits set: write 10.0.0.0/8"),
        ("trusted_proxies", "[proxy.internal]", "not an IP address or CIDR"),
        ("trusted_proxies", "[10.0.0.1, 10.0.0.1]", "listed twice"),
        ("max_body", "10", "a number needs a unit"),
        ("max_body", "0B", "at least 1 bytes"),
        ("max_header_size", "100B", "between 1024 and 1048576 bytes"),
        ("header_timeout", "0s", "longer than zero"),
        ("header_timeout", "10", "a number needs a unit"),
        ("keepalive_timeout", "-1s", "cannot be negative"),
        ("query_param", "'api key'", "not a valid query parameter name"),
        ("credential_sources", "[]", "empty list"),
        ("credential_sources", "header", "expected a list"),
        ("credential_sources", "[header, header]", "listed twice"),
        ("credential_sources", "[header, cookie]", "unknown credential source 'cookie'"),
    ],
)
def test_server_refusals(field: str, value: str, problem: str) -> None:
    issue = the_issue(f"server:\n  {field}: {value}\n" + BASE)
    assert issue.line == 2 and issue.where.startswith(f"server.{field}")
    assert problem in issue.message


def test_duration_refusal_has_the_fix_hint() -> None:
    issue = the_issue("server:\n  drain_timeout: 30 seconds\n" + BASE)
    assert issue.message.startswith("'30 seconds' is not a valid duration")
    assert issue.hint is not None and "30s or 7d" in issue.hint


def test_keepalive_and_drain_may_be_zero() -> None:
    server = parse("server:\n  keepalive_timeout: 0s\n  drain_timeout: 0s\n" + BASE).server
    assert server.keepalive_timeout == 0 and server.drain_timeout == 0


# --------------------------------------------------------------------------- upstream


def upstream(text: str) -> str:
    return BASE.replace("upstream:\n  url: http://127.0.0.1:3000\n", "upstream:\n" + text)


@pytest.mark.parametrize(
    ("url", "host", "port", "host_header", "base_path"),
    [
        ("http://127.0.0.1:3000", "127.0.0.1", 3000, "127.0.0.1:3000", ""),
        ("http://backend", "backend", 80, "backend", ""),
        ("HTTPS://API.example.com:443/", "api.example.com", 443, "api.example.com", ""),
        ("https://api.example.com:80/v1/", "api.example.com", 80, "api.example.com:80", "/v1"),
        ("http://[::1]:8080/a/b", "::1", 8080, "[::1]:8080", "/a/b"),
        ("http://[2001:db8::1]", "2001:db8::1", 80, "[2001:db8::1]", ""),
        ("http://my_service:3000", "my_service", 3000, "my_service:3000", ""),
    ],
)
def test_upstream_url_forms(
    url: str, host: str, port: int, host_header: str, base_path: str
) -> None:
    result = parse(upstream(f"  url: {url}\n")).upstream
    assert (result.host, result.port, result.host_header, result.base_path) == (
        host,
        port,
        host_header,
        base_path,
    )
    assert result.url == f"{result.scheme}://{host_header}{base_path}"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://files", "must start with http:// or https://"),
        ("127.0.0.1:3000", "must start with http:// or https://"),
        ("http://user:pw@backend", "must not carry credentials"),
        ("http://backend/?key=1", "must not have a query"),
        ("http://backend/#top", "must not have a fragment"),
        ("http:///path", "needs a valid host"),
        ("http://backend:0", "port 0"),
        ("http://backend:99999", "not a valid URL"),
        ("http://backend/a/../b", "'..'"),
        ("http://backend/a//b", "empty"),
        ("http://backend/a%2Fb", "escapes"),
        ("'http://backend/a b'", "spaces"),
    ],
)
def test_upstream_url_refusals(url: str, problem: str) -> None:
    text = upstream(f"  url: {url}\n")
    issue = the_issue(text)
    assert issue.where == "upstream.url" and issue.line == 2
    assert problem in issue.message
    assert "pw" not in str(issue)  # a URL may carry a password: never echoed


def test_upstream_credentials_in_the_url_point_to_inject_basic() -> None:
    issue = the_issue(upstream("  url: http://user:pw@backend\n"))
    assert issue.hint == "use upstream.inject.basic instead"


def test_upstream_url_is_required() -> None:
    issue = the_issue(upstream("  timeout: 5s\n"))
    assert issue.where == "upstream.url" and issue.line == 2


def test_upstream_section_is_required() -> None:
    text = BASE.replace("upstream:\n  url: http://127.0.0.1:3000\n", "")
    issue = the_issue(text)
    assert issue.where == "upstream" and "required" in issue.message


@pytest.mark.parametrize(
    ("field", "problem"),
    [
        ("max_connections: 0", "between 1 and 100000"),
        ("max_connections: 100001", "between 1 and 100000"),
        ("timeout: 0s", "longer than zero"),
        ("connect_timeout: 5", "a number needs a unit"),
    ],
)
def test_upstream_settings_refusals(field: str, problem: str) -> None:
    issue = the_issue(upstream(f"  url: http://b\n  {field}\n"))
    assert issue.line == 3 and problem in issue.message


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "content-length",
        "Transfer-Encoding",
        "Connection",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Upgrade",
        "Proxy-Authorization",
        "X-Forwarded-For",
        "x-forwarded-host",
        "Forwarded",
        "X-Request-Id",
        "X-HTTP-Method-Override",
    ],
)
def test_framing_and_forwarding_headers_cannot_be_injected(name: str) -> None:
    text = upstream(f"  url: http://b\n  inject:\n    headers:\n      {name}: value\n")
    issue = the_issue(text)
    assert issue.line == 5 and "cannot inject" in issue.message
    assert issue.where == f"upstream.inject.headers.{name}"


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("'Bad Name': v", "not a valid header name"),
        ("'X-A:b': v", "not a valid header name"),
        ("X-Key: ''", "is empty"),
        ('X-Key: "a\\r\\nX-Evil: 1"', "line break"),
        ('X-Key: "a\\u0000b"', "control character"),
        ("X-Key: ' padded'", "whitespace"),
        ("X-Key: 'caf\u00e9'", "non-ASCII"),
        ("X-Key:", "has no value"),
    ],
)
def test_injected_header_refusals(header: str, problem: str) -> None:
    text = upstream(f"  url: http://b\n  inject:\n    headers:\n      {header}\n")
    issue = the_issue(text)
    assert issue.line == 5 and problem in issue.message


def test_injected_header_names_are_case_insensitive_duplicates() -> None:
    text = upstream("  url: http://b\n  inject:\n    headers:\n      X-Key: a\n      x-key: b\n")
    issue = the_issue(text)
    assert issue.line == 6 and "set twice" in issue.message and "line 5" in issue.message


def test_injected_value_from_env_with_a_newline() -> None:
    text = upstream("  url: http://b\n  inject:\n    headers:\n      X-Key: ${K}\n")
    issue = the_issue(text, {"K": "secret\n"})
    assert "line break" in issue.message and "secret" not in str(issue)


def test_inject_basic_and_query() -> None:
    text = upstream(
        "  url: http://b\n  inject:\n    basic: {username: svc, password: '${P}'}\n"
        "    query: {key: abc, token: '${P}'}\n"
    )
    result = parse(text, {"P": "pw"}).upstream
    assert result.inject_basic == ("svc", "pw")
    assert result.inject_query == (("key", "abc"), ("token", "pw"))
    assert set(result.secrets) == {"pw", "abc"}


def test_inject_basic_allows_a_literally_empty_password() -> None:
    text = upstream("  url: http://b\n  inject:\n    basic: {username: sk_live_x, password: ''}\n")
    assert parse(text).upstream.inject_basic == ("sk_live_x", "")


@pytest.mark.parametrize(
    ("basic", "problem"),
    [
        ("{username: svc}", "'password' is required"),
        ("{password: pw}", "'username' is required"),
        ("{username: 'a:b', password: pw}", "without ':'"),
        ("{username: svc, password: pw, realm: x}", "unknown field 'realm'"),
    ],
)
def test_inject_basic_refusals(basic: str, problem: str) -> None:
    issue = the_issue(upstream(f"  url: http://b\n  inject:\n    basic: {basic}\n"))
    assert issue.line == 4 and problem in issue.message


def test_inject_basic_and_an_authorization_header_conflict() -> None:
    text = upstream(
        "  url: http://b\n  inject:\n    headers: {Authorization: x}\n"
        "    basic: {username: a, password: b}\n"
    )
    issue = the_issue(text)
    assert issue.line == 5 and "both set Authorization" in issue.message


def test_inject_query_refusals() -> None:
    text = upstream("  url: http://b\n  inject:\n    query:\n      'a b': x\n      ok: ''\n")
    issues = issues_of(text)
    assert [(i.line, i.message) for i in issues] == [
        (5, "'a b' is not a valid query parameter name"),
        (6, "is empty"),
    ]


def test_inject_unknown_part() -> None:
    issue = the_issue(upstream("  url: http://b\n  inject:\n    header: {X-A: b}\n"))
    assert issue.hint == "did you mean 'headers'?" and issue.line == 4


@pytest.fixture(scope="module")
def pem_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, a server certificate it signed, and files that are not CA bundles."""
    folder = tmp_path_factory.mktemp("pem")
    ca = trustme.CA()
    files = {name: folder / f"{name}.pem" for name in ("ca", "leaf", "key", "text")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    leaf = ca.issue_cert("api.internal")
    leaf.cert_chain_pems[0].write_to_path(str(files["leaf"]))
    leaf.private_key_pem.write_to_path(str(files["key"]))
    files["text"].write_text("not a certificate\n")
    return files


def test_upstream_ca_file_is_kept_as_an_absolute_path(pem_files: dict[str, Path]) -> None:
    result = parse(upstream(f"  url: https://api.internal\n  ca_file: {pem_files['ca']}\n"))
    assert result.upstream.ca_file == str(pem_files["ca"])
    assert parse(BASE).upstream.ca_file is None


def test_a_relative_ca_file_is_read_from_the_config_files_directory(
    pem_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = pem_files["ca"].parent / "keyproxy.yaml"
    path.write_text(upstream("  url: https://api.internal\n  ca_file: ca.pem\n"))
    monkeypatch.chdir(tmp_path)  # elsewhere: the working directory must not matter
    assert load_config(path, ENV).upstream.ca_file == str(pem_files["ca"])


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("missing", "no such file"),
        ("text", "does not load as PEM certificates (no certificate or crl found)"),
        ("key", "does not load as PEM certificates"),
        ("leaf", "holds no CA certificate"),
        ("folder", "is not a file"),
    ],
)
def test_upstream_ca_file_refusals(pem_files: dict[str, Path], name: str, problem: str) -> None:
    folder = pem_files["ca"].parent
    path = folder if name == "folder" else pem_files.get(name, folder / "missing.pem")
    issue = the_issue(upstream(f"  url: https://api.internal\n  ca_file: {path}\n"))
    assert (issue.where, issue.line) == ("upstream.ca_file", 3)
    assert problem in issue.message and str(path) in issue.message
    assert issue.hint


def test_upstream_ca_file_needs_an_https_url(pem_files: dict[str, Path]) -> None:
    issue = the_issue(upstream(f"  url: http://api.internal\n  ca_file: {pem_files['ca']}\n"))
    assert (issue.where, issue.line) == ("upstream.ca_file", 3)
    assert "only applies to an https:// upstream" in issue.message
    assert issue.hint == "use an https:// url, or remove ca_file"


def test_upstream_ca_file_must_not_be_empty() -> None:
    issue = the_issue(upstream("  url: https://api.internal\n  ca_file: ''\n"))
    assert issue.line == 3 and issue.message == "is empty"


# --------------------------------------------------------------------------- routes


def routes(text: str) -> str:
    return "upstream:\n  url: http://b\nroutes:\n" + textwrap.dedent(text)


def test_routes_section_is_required() -> None:
    issue = the_issue("upstream:\n  url: http://b\n")
    assert issue.where == "routes" and "required" in issue.message


def test_routes_must_not_be_empty() -> None:
    issue = the_issue("upstream:\n  url: http://b\nroutes: []\n")
    assert issue.line == 3 and "empty list" in issue.message


@pytest.mark.parametrize(
    ("route", "where", "problem"),
    [
        ("{acl: a}", "routes[0]", "'match' is required"),
        ('{match: "GET /a"}', "routes[0]", "'acl' is required"),
        ('{match: "GET /a", acl: Read}', "routes[0].acl", "not a valid ACL name"),
        ('{match: "GET /a", acl: "a b"}', "routes[0].acl", "not a valid ACL name"),
        ('{match: "FETCH /a", acl: a}', "routes[0].match", "unknown method 'FETCH'"),
        ('{match: "GET a", acl: a}', "routes[0].match", "must start with '/'"),
        ('{match: "GET /a", acl: a, op: remove}', "routes[0].op", "expected one of create"),
        ('{match: "GET /a", acl: a, access: admin}', "routes[0].access", "expected one of"),
        ('{match: "GET /a", acl: a, allow_method_override: yes}', "routes[0]", "true or false"),
        ('{match: "GET /a", acl: a, methods: [GET]}', "routes[0].methods", "unknown field"),
        ('{match: "DELETE /a", acl: a, op: delete, access: read}', "routes[0].access", "op: del"),
        (
            '{match: "POST /a", acl: a, access: read, allow_method_override: true}',
            "routes[0].allow_method_override",
            "cannot allow method overrides",
        ),
        ("GET /a", "routes[0]", "expected a mapping"),
    ],
)
def test_route_refusals(route: str, where: str, problem: str) -> None:
    issue = the_issue(routes(f"  - {route}\n"))
    assert issue.line == 4 and issue.where.startswith(where) and problem in issue.message


def test_duplicate_route_can_never_match() -> None:
    text = routes(
        """\
          - {match: "GET /v1/{table}", acl: a}
          - {match: "POST /v1/{table}", acl: b}
          - {match: "GET /v1/{name}", acl: c}
        """
    )
    issue = the_issue(text)
    assert issue.line == 6 and issue.where == "routes[2].match"
    assert issue.message == "route 2 duplicates route 0 (line 4) and can never match"


def test_route_covered_by_earlier_routes_can_never_match() -> None:
    text = routes(
        """\
          - {match: "GET /x/*", acl: a}
          - {match: "POST /x/{id}", acl: b}
          - {match: "HEAD|POST /x/{id}", acl: c}
        """
    )
    issue = the_issue(text)
    assert issue.line == 6 and "route 2 can never match" in issue.message
    assert "(0, 1)" in issue.message


def test_partly_overlapping_routes_are_fine() -> None:
    config = parse(
        routes(
            """\
              - {match: "GET /x", acl: a}
              - {match: "GET|POST /x", acl: b}
              - {match: "GET /x/**", acl: c}
            """
        )
    )
    assert [r.acl for r in config.routes] == ["a", "b", "c"]


# --------------------------------------------------------------------------- keys


def test_key_required_fields() -> None:
    text = with_keys("- {description: nothing else}\n")
    issues = issues_of(text)
    assert [i.message for i in issues] == [
        "'id' is required",
        "'hash' is required",
        "'type' is required",
    ]
    assert {i.line for i in issues} == {line_of(text, "nothing else")}


@pytest.mark.parametrize("key_id", ["'has space'", "a/b", "'" + "x" * 65 + "'", "''"])
def test_invalid_key_ids(key_id: str) -> None:
    text = with_keys(key(id=key_id))
    issue = the_issue(text)
    assert issue.where == "keys[0].id" and "not a valid key id" in issue.message


def test_duplicate_key_ids() -> None:
    text = with_keys(key(id="web") + key(id="other", seed=2) + key(id="web", seed=3))
    issue = the_issue(text)
    assert issue.where == "keys[2].id"
    assert issue.line == line_of(text, f"hash: {hash_of(3)}") - 1
    assert issue.message == f"key id 'web' is already used by keys[0] (line {line_of(text, 'web')})"


def test_duplicate_hashes() -> None:
    text = with_keys(key(id="a", seed=1) + key(id="b", seed=1))
    issue = the_issue(text)
    assert issue.where == "keys[1].hash" and "already used by keys[0]" in issue.message


@pytest.mark.parametrize(
    "value",
    [
        "md5:" + "a" * 32,
        "sha256:" + "a" * 63,
        "sha256:" + "g" * 64,
        "'sha256: " + "a" * 64 + "'",
        "a" * 64,
    ],
)
def test_invalid_hashes(value: str) -> None:
    text = with_keys(f"- {{id: a, type: read, hash: {value}}}\n")
    issue = the_issue(text)
    assert issue.where == "keys[0].hash" and "64 hexadecimal" in issue.message


def test_a_pasted_key_is_never_echoed() -> None:
    pasted = "pk_" + "ab" * 32
    issue = the_issue(with_keys(f"- {{id: a, type: read, hash: {pasted}}}\n"))
    assert pasted not in str(issue) and "looks like a key itself" in (issue.hint or "")


def test_upper_case_hex_is_accepted() -> None:
    text = with_keys(f"- {{id: a, type: read, hash: sha256:{'AB' * 32}}}\n")
    assert parse(text).keys[0].digest == bytes.fromhex("ab" * 32)


def test_invalid_key_type() -> None:
    issue = the_issue(with_keys(key(type="reader")))
    assert issue.where == "keys[0].type" and issue.hint == "did you mean 'read'?"


def test_acls_are_checked_even_when_the_type_is_invalid() -> None:
    issues = issues_of(with_keys(key("acls: [get, nope]\n", type="reader")))
    assert [i.where for i in issues] == ["keys[0].type", "keys[0].acls[1]"]


def test_default_acls_follow_the_key_type() -> None:
    config = parse(
        with_keys(
            key(type="read") + key(id="w", type="write", seed=2) + key(id="x", type="admin", seed=3)
        )
    )
    read, write, admin = config.keys
    assert read.acls == frozenset({"search", "get"})  # POST /_search is access: read
    assert write.acls == frozenset({"index", "delete"})
    assert admin.acls == frozenset({"search", "get", "index", "delete"})


def test_unknown_acl_lists_the_known_ones() -> None:
    text = with_keys(key("acls: [get, serch]\n"))
    issue = the_issue(text)
    assert issue.where == "keys[0].acls[1]" and issue.line == line_of(text, "acls:")
    assert issue.message == "no route uses the ACL 'serch'"
    assert issue.hint == "did you mean 'search'? the routes use: delete, get, index, search"


def test_read_key_cannot_list_a_write_only_acl() -> None:
    issue = the_issue(with_keys(key("acls: [get, delete]\n", type="read")))
    assert issue.where == "keys[0].acls[1]"
    assert "a read key can never use ACL 'delete'" in issue.message


def test_write_key_cannot_list_a_read_only_acl() -> None:
    issue = the_issue(with_keys(key("acls: [get]\n", type="write")))
    assert "a write key can never use ACL 'get'" in issue.message


def test_admin_key_may_list_any_acl() -> None:
    config = parse(with_keys(key("acls: [get, delete]\n", type="admin")))
    assert config.keys[0].acls == frozenset({"get", "delete"})


def test_key_type_with_no_usable_route() -> None:
    text = (
        routes('  - {match: "GET /a", acl: a}\n')
        + "keys:\n"
        + textwrap.indent(key(type="write"), "  ")
    )
    issue = the_issue(text)
    assert issue.where == "keys[0]" and "no route grants write access" in issue.message


@pytest.mark.parametrize(
    ("field", "problem"),
    [
        ("acls: []", "empty list"),
        ("acls: [get, get]", "listed twice"),
        ("acls: get", "expected a list"),
        ("referers: []", "empty list"),
        ("ips: []", "empty list"),
        ("ips: [10.0.0.0/8, nonsense]", "not an IP address or CIDR"),
        ("ips: [10.1.2.3/8]", "host bits"),
        ("referers: ['example.com']", "no scheme"),
        ("expires: tomorrow", "not a date or timestamp"),
        ("expires: 2027-02-30", "not a date or timestamp"),
        ("rate_limit: 100/min", "unknown period"),
        ("rate_limit: 100", "expected a count"),
        ("quota: 0", "at least 1"),
        ("quota: 1.5", "whole number"),
        ("ttl: 7d", "ttl counts from created"),
        ("description: [a, b]", "expected a single value"),
    ],
)
def test_key_field_refusals(field: str, problem: str) -> None:
    text = with_keys(key(field + "\n"))
    issue = the_issue(text)
    assert issue.line == line_of(text, field.split(":")[0] + ":")
    assert issue.where.startswith("keys[0]." + field.split(":")[0])
    assert problem in issue.message


def test_the_bad_cidr_is_pointed_at_on_its_own_line() -> None:
    text = with_keys(key("ips:\n  - 10.0.0.0/8\n  - 300.0.0.0/8\n"))
    issue = the_issue(text)
    assert issue.where == "keys[0].ips[1]" and issue.line == line_of(text, "300.0.0.0")


def test_allowlists_are_bounded() -> None:
    many = ", ".join(f"10.0.{i // 250}.{i % 250}" for i in range(101))
    issue = the_issue(with_keys(key(f"ips: [{many}]\n")))
    assert "at most 100" in issue.message
    referers = ", ".join(f"'https://h{i}.example.com/*'" for i in range(101))
    issue = the_issue(with_keys(key(f"referers: [{referers}]\n")))
    assert "at most 100" in issue.message


def test_expires_forms() -> None:
    cases = {
        "2027-01-01": datetime(2027, 1, 1, tzinfo=UTC),
        "2027-01-01T12:30:00": datetime(2027, 1, 1, 12, 30, tzinfo=UTC),
        "2027-01-01 12:30:00+02:00": datetime(2027, 1, 1, 10, 30, tzinfo=UTC),
        "'2027-01-01T00:00:00Z'": datetime(2027, 1, 1, tzinfo=UTC),
    }
    for written, expected in cases.items():
        config = parse(with_keys(key(f"expires: {written}\n")))
        assert config.keys[0].expires_at == expected.timestamp(), written


def test_ttl_counts_from_created() -> None:
    config = parse(with_keys(key("created: 2026-03-01\nttl: 12h\n")))
    assert config.keys[0].expires_at == datetime(2026, 3, 1, 12, tzinfo=UTC).timestamp()


def test_expires_and_ttl_together_is_an_error() -> None:
    text = with_keys(key("expires: 2027-01-01\nttl: 7d\ncreated: 2026-01-01\n"))
    issue = the_issue(text)
    assert issue.where == "keys[0].ttl" and "not both" in issue.message


def test_shared_values_are_parsed_once() -> None:
    text = with_keys(
        key("acls: [get]\nips: [10.0.0.0/8]\nrate_limit: 5/minute\nreferers: ['https://a.b/*']\n")
        + key(
            "acls: [get]\nips: [10.0.0.0/8]\nrate_limit: 5/minute\nreferers: ['https://a.b/*']\n",
            id="k2",
            seed=2,
        )
    )
    first, second = parse(text).keys
    assert first.acls is second.acls and first.ips is second.ips
    assert first.rate_limit is second.rate_limit and first.referers is second.referers


def test_keys_may_be_absent_or_empty() -> None:
    assert parse(BASE).keys == ()
    assert parse(BASE + "keys: []\n").keys == ()


def test_empty_sections_and_entries() -> None:
    text = "server:\n" + BASE + "keys:\n  -\n"
    issues = issues_of(text)
    assert [(i.line, i.where, i.message) for i in issues] == [
        (1, "server", "is empty"),
        (11, "keys[0]", "is empty"),
    ]


def test_keys_must_be_a_list() -> None:
    issue = the_issue(BASE + "keys:\n  id: a\n")
    assert issue.where == "keys" and "expected a list" in issue.message


# --------------------------------------------------------------------------- rate limits


@pytest.mark.parametrize(
    "store", ["memory", "redis://localhost", "redis://:pw@r:6380/2", "rediss://r.example.com:6379"]
)
def test_rate_limit_stores(store: str) -> None:
    assert parse(BASE + f"rate_limits:\n  store: '{store}'\n").rate_limits.store == store


@pytest.mark.parametrize(
    ("field", "problem"),
    [
        ("store: memcached", "expected memory or a redis://"),
        ("store: 'redis://'", "needs a host"),
        ("store: 'redis://:topsecret@r/abc'", "needs a host"),
        ("on_store_error: ignore", "expected one of deny, allow"),
        ("timeout: 6s", "at most 5s"),
        ("timeout: 0ms", "longer than zero"),
        ("max_buckets: 999", "between 1000"),
        ("ipv4_prefix: 8", "between 16 and 32"),
        ("ipv4_prefix: 33", "between 16 and 32"),
        ("ipv6_prefix: 16", "between 32 and 128"),
        ("ipv6_prefix: /48", "whole number"),
    ],
)
def test_rate_limit_refusals(field: str, problem: str) -> None:
    text = BASE + "rate_limits:\n  " + field + "\n"
    issue = the_issue(text)
    assert issue.line == line_of(text, field) and problem in issue.message
    assert "topsecret" not in str(issue)


# --------------------------------------------------------------------------- all at once


def test_every_error_is_reported_at_once_in_file_order() -> None:
    text = f"""\
server:
  listen: nowhere
  max_body: 10M
upstream:
  url: ftp://x
routes:
  - {{match: "GET /a", acl: a}}
  - {{match: "GET /a", acl: b}}
keys:
  - {{id: a, hash: {hash_of(1)}, type: reed}}
  - {{id: b, hash: {hash_of(2)}, type: read, acls: [zzz], revoked: yes}}
cache: {{backend: 'sqlite:///x.db', ttl: 1s, routes: ['GET /a']}}
"""
    with pytest.raises(ConfigError) as caught:
        parse(text)
    lines = [issue.line for issue in caught.value.issues]
    assert lines == [2, 3, 5, 8, 10, 11, 12]
    rendered = str(caught.value).splitlines()
    assert len(rendered) == 7
    assert rendered[0].startswith("test.yaml:2: server.listen: 'nowhere' is not a listen address")
    assert rendered[1] == (
        "test.yaml:3: server.max_body: '10M' is not a valid size: unknown unit 'M' "
        "(hint: write a number and a unit, like 512B, 64KiB or 10MiB "
        "(also KB, MB, GB: powers of 1000))"
    )
    assert rendered[-1].startswith(
        "test.yaml:12: cache.backend: the sqlite backend is not supported yet (hint: "
    )


def test_several_errors_in_one_key() -> None:
    text = with_keys(key("quota: -1\nrevoked: on\nrate_limit: lots\n", type="root"))
    issues = issues_of(text)
    assert [(i.line, i.where) for i in issues] == [
        (line_of(text, "type: root"), "keys[0].type"),
        (line_of(text, "quota"), "keys[0].quota"),
        (line_of(text, "revoked"), "keys[0].revoked"),
        (line_of(text, "rate_limit"), "keys[0].rate_limit"),
    ]


def test_issue_format_without_line_or_where() -> None:
    error = ConfigError("f.yaml", [ConfigIssue(None, "", "cannot read", None)])
    assert str(error) == "f.yaml: cannot read"
    issue = ConfigIssue(3, "keys[0]", "bad", "fix it")
    assert issue.format("f.yaml") == "f.yaml:3: keys[0]: bad (hint: fix it)"


# --------------------------------------------------------------------------- load_config


def test_load_config_reads_the_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keyproxy.yaml"
    path.write_text(FULL)
    monkeypatch.setenv("UPSTREAM_SECRET", "from-os-environ")
    monkeypatch.setenv("TOKEN", "t")
    config = load_config(path)
    assert config.upstream.inject_headers[0] == ("X-API-Key", "from-os-environ")
    assert config.source == str(path)
    assert load_config(str(path), env=ENV).upstream.inject_headers[0][1] == ENV["UPSTREAM_SECRET"]


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.yaml", env={})
    assert "cannot read the file" in str(caught.value)
    assert str(caught.value).startswith(str(tmp_path / "nope.yaml"))


def test_load_config_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(BASE.encode() + b"keys:\n  - id: \xff\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.issues == [ConfigIssue(10, "", "the file is not valid UTF-8")]


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE + "cache: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(f"{path}:9: cache: ")


def test_the_example_file_loads() -> None:
    example = Path(__file__).parent.parent / "keyproxy" / "config.example.yaml"
    config = load_config(example, env={"UPSTREAM_SECRET": "x"})
    assert config.keys and config.routes


def test_the_garbage_collector_is_restored() -> None:
    assert gc.isenabled()
    parse(BASE)
    issues_of(BASE + "cors: {}\n")
    assert gc.isenabled()
    gc.disable()
    try:
        parse(BASE)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_loading_leaves_no_reference_cycles() -> None:
    """A cycle would keep the whole YAML tree alive until a full collection: seconds at 100k."""
    parse(FULL)  # warm up caches that live for the process (compiled regexes, imports)
    gc.collect()
    config = parse(FULL)
    assert gc.collect() == 0
    assert config.keys


# --------------------------------------------------------------------------- a large file


def test_a_large_file_loads_correctly() -> None:
    count = 20_000
    types = ("read", "write", "admin")
    lines = [BASE, "keys:\n"]
    for i in range(count):
        lines.append(f"  - id: key-{i}\n    hash: {hash_of(i)}\n    type: {types[i % 3]}\n")
        if i % 2:
            lines.append("    ips: [10.0.0.0/8]\n    rate_limit: 100/minute\n")
    text = "".join(lines)
    config = parse(text)
    assert len(config.keys) == count == len(config.keys_by_digest)
    sample = config.keys_by_digest[bytes.fromhex(digest_of(12_345))]
    assert sample.id == "key-12345" and sample.type is KeyType.READ
    assert sample.rate_limit == Rate(100, 60.0, "100/minute")
    assert sample.line == line_of(text, "id: key-12345")


def test_no_secret_in_the_repr_of_a_loaded_config() -> None:
    """A traceback or a debug print of the configuration must not show the upstream's secrets."""
    text = (
        "upstream:\n"
        "  url: https://api.example.com\n"
        "  inject:\n"
        "    headers: {X-API-Key: header-secret-123456}\n"
        "    basic: {username: svc, password: basic-secret-123456}\n"
        "    query: {apikey: query-secret-123456}\n"
        "routes: [{match: 'GET /x', acl: get}]\n"
        "rate_limits: {store: 'redis://:redis-secret-123456@127.0.0.1:6379/0'}\n"
    )
    config = parse_config(text, "c.yaml", {})
    shown = repr(config)
    for secret in ("header-secret", "basic-secret", "query-secret", "redis-secret"):
        assert secret not in shown


def test_a_number_python_cannot_convert_is_a_refusal_not_a_crash() -> None:
    issue = the_issue(with_keys(key("    quota: " + "9" * 5000 + "\n")))
    assert "cannot be read" in issue.message


def test_merges_nested_too_deeply_are_a_refusal_not_a_crash() -> None:
    anchors = ["a0: &a0 {type: read}"]
    for i in range(1, 1200):
        anchors.append(f"a{i}: &a{i} {{<<: *a{i - 1}}}")
    text = BASE + "x-anchors:\n" + "".join(f"  {a}\n" for a in anchors)
    text += f"keys:\n  - {{<<: *a1199, id: k1, hash: '{hash_of(1)}'}}\n"
    issues = issues_of(text)
    assert any("too deeply" in i.message for i in issues), issues


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ('acls: ["get"]', "acls: [!!binary get]", "tags"),
        ('ips: ["10.0.0.0/8"]', "ips: [~]", "has no value"),
        ('ips: ["10.0.0.0/8"]', "ips: [!!binary 10.0.0.0/8]", "tags"),
        ('referers: ["https://a.example/*"]', "referers: [!!binary https://a.example/*]", "tags"),
    ],
)
def test_a_list_read_earlier_never_excuses_a_bad_spelling_of_it(
    first: str, second: str, message: str
) -> None:
    """Parsed lists are shared between keys by their text; a null or a tagged item
    must still be refused when an earlier key wrote the same text cleanly."""
    text = with_keys(key(first + "\n", id="k1", seed=1) + key(second + "\n", id="k2", seed=2))
    issue = the_issue(text)
    assert issue.where.startswith("keys[1]"), issue
    assert message in issue.message, issue


def test_a_secret_mistaken_for_a_tag_is_never_printed() -> None:
    """Unquoted, `!Sup3r-secret` is a YAML tag; the refusal must not show it (it ends
    up in logs and /readyz)."""
    text = upstream("  url: http://b\n  inject:\n    headers:\n      X-K: !Sup3r-secret-v4lue\n")
    issue = the_issue(text)
    assert "Sup3r" not in str(issue) and "quote the value" in (issue.hint or "")


def test_a_blank_query_secret_is_refused() -> None:
    issue = the_issue(upstream("  url: http://b\n  inject:\n    query: {apikey: '  '}\n"))
    assert issue.message == "is empty"


@pytest.mark.parametrize(
    "field",
    [
        "ips: !!python/tuple [10.0.0.0/8]",
        "acls: !!python/list [get]",
        "referers: !custom [https://a.example/*]",
    ],
)
def test_tagged_lists_are_refused_even_after_the_same_list_untagged(field: str) -> None:
    plain = field.split(": ", 1)[0] + ': ["10.0.0.0/8"]' if field.startswith("ips") else ""
    text = with_keys(key(plain + "\n", id="k1", seed=1) + key(field + "\n", id="k2", seed=2))
    issues = issues_of(text)
    assert any(i.where.startswith("keys[1]") and "tag" in i.message for i in issues), issues


def test_a_merge_bomb_is_refused_quickly() -> None:
    """Each level merges the previous anchor twice: 2**40 merges unbounded."""
    lines = ["x-a0: &a0 {type: read}"]
    for i in range(1, 41):
        lines.append(f"x-a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}]}}")
    text = "\n".join(lines) + "\n" + BASE
    text += f"keys:\n  - {{<<: *a40, id: k1, hash: '{hash_of(1)}'}}\n"
    issues = issues_of(text)
    assert any("'<<' merges in the file" in i.message for i in issues), issues


def test_route_body_options_are_read() -> None:
    text = BASE.replace(
        "acl: search}\n",
        'acl: search, scrub_body: false, fields_at: ["data[*]", "hits.hits[*]._source"]}\n',
        1,
    )
    route = parse(text).routes[0]
    assert route.scrub_body is False
    assert [p.text for p in route.fields_at] == ["data[*]", "hits.hits[*]._source"]
    assert parse(BASE).routes[0].scrub_body is True


def test_filter_caps_are_server_fields() -> None:
    config = parse("server:\n  filter_max_body: 1MiB\n  filter_max_depth: 20\n" + BASE)
    assert (config.server.filter_max_body, config.server.filter_max_depth) == (1024 * 1024, 20)
    issue = the_issue("server:\n  filter_max_depth: 999\n" + BASE)
    assert issue.where == "server.filter_max_depth"
