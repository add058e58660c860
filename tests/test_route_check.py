"""The route step decides on the method the upstream acts on, refuses every framework
spelling of `_method`, and applies a route's query allow/deny list (pure, no network)."""

from __future__ import annotations

import hashlib
import time

import pytest

from keyproxy.checks import Pipeline, build_checks
from keyproxy.checks.route import METHOD_OVERRIDE_PARAMS, param_readings
from keyproxy.config import ConfigError, parse_config
from keyproxy.ratelimit import open_limiter
from keyproxy.request import Headers, RequestContext

KEYS = {name: f"pk_{name}_" + "0" * 40 for name in ("reader", "writer", "admin")}


def _hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


CONFIG = f"""\
upstream:
  url: http://127.0.0.1:3000
routes:
  - {{match: "GET|DELETE /comments/{{id}}", acl: comments, allow_method_override: true}}
  - {{match: "POST|PUT /users/{{id}}", acl: users, allow_method_override: true}}
  - {{match: "DELETE /guarded/{{id}}", acl: guarded}}
  - {{match: "POST|DELETE /guarded/{{id}}", acl: open, allow_method_override: true}}
  - {{match: "GET /posts/{{id}}", acl: comments, query: {{deny: [_embed, _expand, select]}}}}
  - {{match: "GET /items", acl: comments, query: {{allow: [page, limit]}}}}
  - {{match: "GET /plain/**", acl: comments}}
  - {{match: "POST /{{index}}/_search", acl: comments, access: read}}
keys:
  - {{id: reader, hash: {_hash(KEYS["reader"])}, type: read, acls: [comments]}}
  - {{id: writer, hash: {_hash(KEYS["writer"])}, type: write, acls: [comments, users, open]}}
  - {{id: admin, hash: {_hash(KEYS["admin"])}, type: admin}}
"""


@pytest.fixture(scope="module")
def decide():
    config = parse_config(CONFIG, "override.yaml", {})
    pipeline = Pipeline(build_checks(open_limiter(config.rate_limits)))

    def run(key: str, method: str, target: str, headers: tuple[tuple[str, str], ...] = ()) -> str:
        items = [("x-api-key", KEYS[key]), *headers]
        ctx = RequestContext(
            config, method, target, Headers.from_lowered(items), "127.0.0.1", time.time(), "t"
        )
        deny = pipeline.decide(ctx)
        if deny is None:
            return f"allowed as {ctx.effective_method}"
        return f"{deny.status} {deny.code}"  # type: ignore[union-attr]

    return run


OVERRIDE = (("x-http-method-override", "DELETE"),)


@pytest.mark.parametrize(
    ("key", "method", "target", "headers", "expected"),
    [
        # a read key cannot delete by asking for DELETE through GET
        ("reader", "GET", "/comments/1", OVERRIDE, "403 PERMISSION_DENIED"),
        ("reader", "GET", "/comments/1?_method=DELETE", (), "403 PERMISSION_DENIED"),
        ("reader", "GET", "/comments/1?_method=delete", (), "403 PERMISSION_DENIED"),
        ("reader", "GET", "/comments/1", (), "allowed as GET"),
        # a write key cannot read by asking for GET through POST
        (
            "writer",
            "POST",
            "/users/1",
            (("x-http-method-override", "GET"),),
            "403 ROUTE_NOT_ALLOWED",
        ),
        ("writer", "POST", "/users/1?_method=GET", (), "403 ROUTE_NOT_ALLOWED"),
        ("writer", "POST", "/users/1", (("x-http-method-override", "PUT"),), "allowed as PUT"),
        # the write key may not have it either way: GET reads, DELETE writes
        ("writer", "GET", "/comments/1", OVERRIDE, "403 PERMISSION_DENIED"),
        # an admin key may do both, and the decision records what the upstream will do
        ("admin", "GET", "/comments/1", OVERRIDE, "allowed as DELETE"),
        # the effective method leads to an earlier route: refused, never decided on the later
        ("writer", "POST", "/guarded/1", OVERRIDE, "400 METHOD_OVERRIDE_NOT_ALLOWED"),
        # two overrides that disagree, an unknown method, a URL override
        (
            "admin",
            "POST",
            "/users/1?_method=PUT",
            (("x-http-method-override", "POST"),),
            "400 METHOD_OVERRIDE_NOT_ALLOWED",
        ),
        ("admin", "POST", "/users/1?_method=PURGE", (), "400 METHOD_OVERRIDE_NOT_ALLOWED"),
        (
            "admin",
            "POST",
            "/users/1",
            (("x-original-url", "/x"),),
            "400 METHOD_OVERRIDE_NOT_ALLOWED",
        ),
        # on an override route only the plain spelling is decidable
        ("admin", "POST", "/users/1?%5B_method%5D=PUT", (), "400 METHOD_OVERRIDE_NOT_ALLOWED"),
        ("admin", "POST", "/users/1?_method[]=PUT", (), "400 METHOD_OVERRIDE_NOT_ALLOWED"),
        # on a route without overrides, any override is refused
        ("admin", "GET", "/plain/x?_method=GET", (), "400 METHOD_OVERRIDE_NOT_ALLOWED"),
    ],
)
def test_the_effective_method_decides(decide, key, method, target, headers, expected):
    assert decide(key, method, target, headers) == expected


FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (FORM, "400 METHOD_OVERRIDE_NOT_ALLOWED"),
        ("Application/X-WWW-Form-Urlencoded; charset=utf-8", "400 METHOD_OVERRIDE_NOT_ALLOWED"),
        ("multipart/form-data; boundary=x", "400 METHOD_OVERRIDE_NOT_ALLOWED"),
        ("multipart/mixed; boundary=x", "400 METHOD_OVERRIDE_NOT_ALLOWED"),
        ("application/json", "allowed as POST"),
        (None, "allowed as POST"),
    ],
)
def test_a_form_body_on_a_read_only_post_route_is_refused(decide, content_type, expected):
    headers = (("content-type", content_type),) if content_type else ()
    assert decide("reader", "POST", "/posts/_search", headers) == expected


def test_a_second_content_type_cannot_hide_a_form(decide):
    headers = (("content-type", "application/json"), ("content-type", FORM))
    assert decide("reader", "POST", "/posts/_search", headers) == "400 METHOD_OVERRIDE_NOT_ALLOWED"


SPELLINGS = [
    "_method",
    "_METHOD",
    "%5Fmethod",
    "_%6Dethod",
    "%255Fmethod",  # decoded twice by a stacked upstream
    ".method",  # PHP: '.' in a name reads as '_'
    "+_method",  # PHP drops leading spaces
    "%20_method",
    "_method[]",  # qs, Rack, PHP: an array of that name
    "_method%5B%5D",
    "_method[x]",
    "_method[",  # PHP: an unbalanced '[' ends the name
    "[_method]",  # qs: a leading bracket group is the name; Rack 2 skips leading brackets
    "%5B_method%5D",
    "[_method][]",
    "[[_method]]",
    "]_method",
    "]]_method",
    "_method]",
    "_method.x",  # qs with allowDots, Spring's nested binding
    "_method%2Ex",
    "_method%00",
]


@pytest.mark.parametrize("raw", SPELLINGS)
def test_every_framework_reading_of_method_is_seen(raw: str) -> None:
    assert param_readings(raw) & METHOD_OVERRIDE_PARAMS


@pytest.mark.parametrize("raw", ["method", "x_method", "_methods", "_method_x", "a[_method]"])
def test_other_names_are_not_method(raw: str) -> None:
    assert not param_readings(raw) & METHOD_OVERRIDE_PARAMS


@pytest.mark.parametrize("raw", SPELLINGS)
def test_every_spelling_is_refused_on_a_route_without_overrides(decide, raw: str) -> None:
    assert decide("admin", "GET", f"/plain/x?a=1&{raw}=DELETE") == (
        "400 METHOD_OVERRIDE_NOT_ALLOWED"
    )


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/posts/1?_embed=audit_log", "403 QUERY_NOT_ALLOWED"),
        ("/posts/1?%5Fembed=audit_log", "403 QUERY_NOT_ALLOWED"),
        ("/posts/1?select=*,other(*)", "403 QUERY_NOT_ALLOWED"),
        ("/posts/1?select[x]=1", "403 QUERY_NOT_ALLOWED"),
        ("/posts/1?SELECT=1", "403 QUERY_NOT_ALLOWED"),
        ("/posts/1?a=1;_expand=user", "403 QUERY_NOT_ALLOWED"),
        ("/posts/1?q=select", "allowed as GET"),
        ("/posts/1?embed=1", "allowed as GET"),
        ("/posts/1", "allowed as GET"),
        ("/items?page=2&limit=10", "allowed as GET"),
        ("/items?page=2&_embed=x", "403 QUERY_NOT_ALLOWED"),
        ("/items?page[x]=2", "403 QUERY_NOT_ALLOWED"),
        ("/items?pag%65=2", "allowed as GET"),
        ("/items", "allowed as GET"),
    ],
)
def test_route_query_lists(decide, target: str, expected: str) -> None:
    assert decide("reader", "GET", target) == expected


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("{allow: [a], deny: [b]}", "exactly one of allow or deny"),
        ("{only: [a]}", "unknown field 'only'"),
        ("{allow: []}", "empty list"),
        ("{deny: ['select[]']}", "not a query parameter name"),
        ("[a, b]", "expected a mapping"),
    ],
)
def test_query_rule_refusals(query: str, problem: str) -> None:
    text = (
        f'upstream: {{url: "http://b"}}\nroutes:\n  - {{match: "GET /a", acl: a, query: {query}}}\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "q.yaml", {})
    assert any(problem in i.message for i in info.value.issues), info.value.issues
    assert all(i.line == 3 for i in info.value.issues)


def test_an_override_route_needs_two_methods() -> None:
    text = (
        'upstream: {url: "http://b"}\nroutes:\n'
        '  - {match: "POST /a", acl: a, allow_method_override: true}\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "q.yaml", {})
    (issue,) = info.value.issues
    assert issue.where == "routes[0].allow_method_override" and "one method" in issue.message


def _route_issues(*matches: str) -> list:
    lines = "".join(f'  - {{match: "{m}", acl: a{i}}}\n' for i, m in enumerate(matches))
    try:
        parse_config(f'upstream: {{url: "http://b"}}\nroutes:\n{lines}', "r.yaml", {})
    except ConfigError as error:
        return error.issues
    return []


@pytest.mark.parametrize(
    ("matches", "shadowed", "by_lines"),
    [
        (("GET /v1/data/{table}", "GET /v1/data/admin"), 1, (3,)),
        (("* /**", "GET /anything"), 1, (3,)),
        (("GET /**", "GET /"), 1, (3,)),
        (("GET /a/**", "GET /a/b/{c}/**"), 1, (3,)),
        (("GET|PUT /x/*", "PUT /x/{id}"), 1, (3,)),
        (("GET /x/{id}", "PUT /x/*", "GET|PUT /x/7"), 2, (3, 4)),
        (("GET /a/{b}", "POST /c", "HEAD /a/z"), 2, (3,)),
    ],
)
def test_shadowed_routes_of_any_shape(matches, shadowed: int, by_lines) -> None:
    (issue,) = _route_issues(*matches)
    assert issue.where == f"routes[{shadowed}].match" and issue.line == 3 + shadowed
    assert "can never match" in issue.message
    for line in by_lines:
        assert f"line {line}" in issue.message
    assert f"move it above line {by_lines[0]}" in issue.hint


@pytest.mark.parametrize(
    "matches",
    [
        ("GET /v1/data/admin", "GET /v1/data/{table}"),
        ("GET /a/{b}", "GET /a/"),  # `{b}` never matches the empty segment of a trailing slash
        ("GET /a/{b}", "GET /a/b/c"),
        ("GET /a/*", "GET /a/**"),  # `/a` itself still reaches the second
        ("GET /x", "GET|POST /x"),  # POST still reaches it
    ],
)
def test_routes_that_can_still_match_are_fine(matches) -> None:
    assert _route_issues(*matches) == []
