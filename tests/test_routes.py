"""Route patterns and the route table: first match wins, and no lenient reading disagrees."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyproxy.config.model import ROUTE_METHODS, Route
from keyproxy.policy.paths import Target, canonicalize
from keyproxy.policy.routes import AmbiguousMatch, RouteTable, fold_segment, parse_pattern


def table(*patterns: str) -> RouteTable:
    routes = []
    for i, text in enumerate(patterns):
        methods, segments = parse_pattern(text)
        routes.append(Route(index=i, match=text, methods=methods, segments=segments, acl=f"acl{i}"))
    return RouteTable(routes)


def segs(path: str) -> tuple[str, ...]:
    target = canonicalize(path)
    assert isinstance(target, Target), target
    return target.segments


def hit(t: RouteTable, method: str, path: str) -> tuple[str, dict[str, str]] | None:
    """The matching pattern and its params; fails the test on an ambiguity."""
    segments = segs(path)
    found = t.resolve(method, segments)
    assert not isinstance(found, AmbiguousMatch), found
    return None if found is None else (found.match, found.params(segments))


# --- parse_pattern -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "methods", "segments"),
    [
        ("GET /v1/data/{table}", {"GET", "HEAD"}, ("v1", "data", "{table}")),
        ("GET|PUT /{index}/_settings", {"GET", "HEAD", "PUT"}, ("{index}", "_settings")),
        ("GET /_stream/**", {"GET", "HEAD"}, ("_stream", "**")),
        ("* /x", set(ROUTE_METHODS), ("x",)),
        ("POST /_bulk", {"POST"}, ("_bulk",)),
        ("HEAD /x", {"HEAD"}, ("x",)),
        ("DELETE|PATCH /a/*/b", {"DELETE", "PATCH"}, ("a", "*", "b")),
        ("GET /", {"GET", "HEAD"}, ()),
        ("GET /**", {"GET", "HEAD"}, ("**",)),
        ("GET /v1/data/", {"GET", "HEAD"}, ("v1", "data", "")),
        ("  GET   /a/{x}/{y}  ", {"GET", "HEAD"}, ("a", "{x}", "{y}")),
        (
            "GET /.well-known/a:b@c/%C3%A9/%20",
            {"GET", "HEAD"},
            (".well-known", "a:b@c", "%C3%A9", "%20"),
        ),
    ],
)
def test_patterns(text: str, methods: set[str], segments: tuple[str, ...]) -> None:
    assert parse_pattern(text) == (frozenset(methods), segments)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "METHODS /path"),
        ("GET", "METHODS /path"),
        ("GET /a /b", "METHODS /path"),
        ("get /a", "upper case: 'GET'"),
        ("FETCH /a", "unknown method 'FETCH'"),
        ("GET||PUT /a", "empty method"),
        ("GET|* /a", "stand alone"),
        ("GET|GET /a", "listed twice"),
        ("GET a/b", "start with '/'"),
        ("GET /a?x=1", "query"),
        ("GET /a//b", "empty segment"),
        ("GET //", "empty segment"),
        ("GET /**/a", "'**' must be the last"),
        ("GET /a/**/", "'**' must be the last"),
        ("GET /{x}/{x}", "appears twice"),
        ("GET /{}", "parameter is a name"),
        ("GET /{1x}", "parameter is a name"),
        ("GET /{a-b}", "parameter is a name"),
        ("GET /v{version}", "not supported"),
        ("GET /{table}.json", "not supported"),
        ("GET /a{", "not supported"),
        ("GET /a*", "not supported"),
        ("GET /***", "not supported"),
        ("GET /a/../b", "'..'"),
        ("GET /a/./b", "'.'"),
        ("GET /a/%2e%2e", "'..'"),
        ("GET /a%2Fb", "%2F"),
        ("GET /a;b", "';'"),
        ("GET /a\\b", "backslash"),
        ("GET /a#b", "'#'"),
        ("GET /a%zz", "malformed"),
        ("GET /%41", "write it as 'A'"),
        ("GET /a%3ab", "write it as 'a%3Ab'"),
        ("GET /a|b", "write it as 'a%7Cb'"),
        ("GET /caf\xe9", "non-ASCII"),
        ("GET " + "/a" * 129, "more than 128"),
    ],
)
def test_pattern_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_pattern(text)
    assert fragment in str(info.value)


def test_pattern_must_be_a_string() -> None:
    with pytest.raises(ValueError):
        parse_pattern(None)  # type: ignore[arg-type]


# --- matching ----------------------------------------------------------------------------

EXAMPLE = table(
    "GET /v1/data/{table}",
    "GET /v1/data/{table}/{id}",
    "POST /v1/data/{table}",
    "PATCH /v1/data/{table}/{id}",
    "DELETE /v1/data/{table}/{id}",
    "POST /{index}/_search",
    "POST /_bulk",
    "GET /_stream/**",
    "GET|PUT /{index}/_settings",
)


def test_the_example_routes() -> None:
    assert hit(EXAMPLE, "GET", "/v1/data/posts") == ("GET /v1/data/{table}", {"table": "posts"})
    assert hit(EXAMPLE, "GET", "/v1/data/posts/7?x=1") == (
        "GET /v1/data/{table}/{id}",
        {"table": "posts", "id": "7"},
    )
    assert hit(EXAMPLE, "DELETE", "/v1/data/posts/7")[0] == "DELETE /v1/data/{table}/{id}"
    assert hit(EXAMPLE, "POST", "/logs/_search") == ("POST /{index}/_search", {"index": "logs"})
    assert hit(EXAMPLE, "PUT", "/logs/_settings")[0] == "GET|PUT /{index}/_settings"
    assert hit(EXAMPLE, "GET", "/logs/_settings")[0] == "GET|PUT /{index}/_settings"
    assert hit(EXAMPLE, "DELETE", "/v1/data/posts") is None
    assert hit(EXAMPLE, "GET", "/v1/data") is None
    assert hit(EXAMPLE, "GET", "/v1/data/posts/7/x") is None
    assert hit(EXAMPLE, "POST", "/_bulk") == ("POST /_bulk", {})
    assert hit(EXAMPLE, "GET", "/_bulk") is None
    assert hit(EXAMPLE, "GET", "/") is None


def test_unknown_and_lower_case_methods_match_nothing() -> None:
    t = table("* /x")
    for method in ROUTE_METHODS:
        assert hit(t, method, "/x") is not None
    for method in ("get", "TRACE", "CONNECT", "PROPFIND", "", "GET "):
        assert hit(t, method, "/x") is None


def test_head_comes_with_get_only() -> None:
    t = table("GET /a", "POST /b", "HEAD /c")
    assert hit(t, "HEAD", "/a") == ("GET /a", {})
    assert hit(t, "HEAD", "/b") is None
    assert hit(t, "GET", "/c") is None
    # Route objects built without parse_pattern get the same rule.
    bare = RouteTable(
        [Route(index=0, match="GET /a", methods=frozenset({"GET"}), segments=("a",), acl="x")]
    )
    assert bare.resolve("HEAD", ("a",)) is not None


def test_first_match_wins_across_kinds() -> None:
    t = table(
        "GET /v1/{x}/literal",
        "GET /v1/data/literal",
        "GET /v1/**",
        "GET /v1/data/{y}",
    )
    assert hit(t, "GET", "/v1/data/literal") == ("GET /v1/{x}/literal", {"x": "data"})
    assert hit(t, "GET", "/v1/data/other") == ("GET /v1/**", {})
    t = table("GET /v1/data/{y}", "GET /v1/**", "GET /v1/data/literal")
    assert hit(t, "GET", "/v1/data/literal") == ("GET /v1/data/{y}", {"y": "literal"})
    t = table("GET /v1/data/literal", "GET /v1/data/{y}")
    assert hit(t, "GET", "/v1/data/literal") == ("GET /v1/data/literal", {})
    assert hit(t, "GET", "/v1/data/other") == ("GET /v1/data/{y}", {"y": "other"})


def test_a_later_route_is_found_when_an_earlier_branch_fails() -> None:
    t = table("GET /a/{x}/c", "GET /a/b/d", "GET /{p}/b/c/d", "GET /a/b/**")
    assert hit(t, "GET", "/a/b/d")[0] == "GET /a/b/d"
    assert hit(t, "GET", "/a/b/c/d")[0] == "GET /{p}/b/c/d"
    assert hit(t, "GET", "/a/b/e/f")[0] == "GET /a/b/**"


def test_methods_are_filtered_per_route() -> None:
    t = table("DELETE /v1/data/{t}/{id}", "GET /v1/data/{t}/{id}", "* /v1/data/{t}/{id}")
    assert hit(t, "GET", "/v1/data/a/1")[0] == "GET /v1/data/{t}/{id}"
    assert hit(t, "DELETE", "/v1/data/a/1")[0] == "DELETE /v1/data/{t}/{id}"
    assert hit(t, "PATCH", "/v1/data/a/1")[0] == "* /v1/data/{t}/{id}"


def test_double_star_matches_zero_or_more_segments() -> None:
    t = table("GET /_stream/**")
    assert hit(t, "GET", "/_stream") == ("GET /_stream/**", {})
    assert hit(t, "GET", "/_stream/") == ("GET /_stream/**", {})
    assert hit(t, "GET", "/_stream/a") is not None
    assert hit(t, "GET", "/_stream/a/b/c/d/e/f/g/") is not None
    assert hit(t, "GET", "/_streams") is None
    assert hit(t, "GET", "/") is None
    everything = table("GET /**")
    assert hit(everything, "GET", "/") is not None
    assert hit(everything, "GET", "/a" * 128) is not None


def test_params_capture_canonical_segments_and_never_empty_ones() -> None:
    t = table("GET /v1/{table}/{id}", "GET /v1/*")
    assert hit(t, "GET", "/v1/%70osts/a%3ab") == (
        "GET /v1/{table}/{id}",
        {"table": "posts", "id": "a%3Ab"},
    )
    assert hit(t, "GET", "/v1/x") == ("GET /v1/*", {})
    assert hit(t, "GET", "/v1/") is None
    assert t.resolve("GET", ("v1", "posts", "")) is None


def test_trailing_slash_is_its_own_route() -> None:
    t = table("GET /v1/data/", "GET /v1/data/{table}/")
    assert hit(t, "GET", "/v1/data/") == ("GET /v1/data/", {})
    assert hit(t, "GET", "/v1/data/posts/") == ("GET /v1/data/{table}/", {"table": "posts"})
    assert t.resolve("GET", segs("/v1/data/posts")) is None


def test_empty_table() -> None:
    assert RouteTable([]).resolve("GET", ()) is None
    assert RouteTable([]).resolve("GET", ("a",)) is None


def test_double_star_must_be_last_in_route_objects_too() -> None:
    with pytest.raises(ValueError, match="last"):
        RouteTable(
            [Route(index=0, match="x", methods=frozenset({"GET"}), segments=("**", "a"), acl="x")]
        )


# --- lenient readings --------------------------------------------------------------------

AUDIT = table("GET /v1/data/audit_log", "GET /v1/data/{table}")


def is_ambiguous(t: RouteTable, method: str, path: str) -> bool:
    return isinstance(t.resolve(method, segs(path)), AmbiguousMatch)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/data/AUDIT_LOG",
        "/v1/data/Audit_log",
        "/v1/DATA/audit_log",
        "/v1/data/audit%5Flog",  # canonicalised to audit_log: exact, not ambiguous
    ],
)
def test_case_variants_of_a_guarded_literal(path: str) -> None:
    found = AUDIT.resolve("GET", segs(path))
    if path in ("/v1/data/audit%5Flog",):
        assert isinstance(found, Route) and found.match == "GET /v1/data/audit_log"
    elif path == "/v1/DATA/audit_log":
        # No route matches as written, but the guarded one does in another letter case:
        # ambiguous (400), as every case variant of a literal route is.
        assert isinstance(found, AmbiguousMatch) and found.route is None
        assert found.other is not None and found.other.match == "GET /v1/data/audit_log"
    else:
        assert isinstance(found, AmbiguousMatch)
        assert found.route is not None and found.route.match == "GET /v1/data/{table}"
        assert found.other is not None and found.other.match == "GET /v1/data/audit_log"
        assert "audit" not in found.message and "{table}" not in found.message


@pytest.mark.parametrize(
    "path",
    [
        "/v1/data/audit%3Alog",  # reserved escapes are kept, but upstreams decode them
        "/v1/data/%C3%80udit",  # U+00C0, upper case of the literal's U+00E0
        "/v1/data/audit:log/",  # trailing slash dropped by lenient upstreams
        "/v1/data/AUDIT%3alog",
        "/v1/data/%EF%BD%81udit:log",  # U+FF41 FULLWIDTH a, NFKC folds to 'a'
    ],
)
def test_escape_and_slash_variants_of_a_guarded_literal(path: str) -> None:
    t = table(
        "GET /v1/data/audit:log",
        "GET /v1/data/%C3%A0udit",
        "GET /v1/data/{table}",
        "GET /v1/data/{table}/**",
    )
    assert is_ambiguous(t, "GET", path)


def test_upper_case_literal_makes_plain_paths_ambiguous() -> None:
    t = table("GET /Admin", "GET /{page}")
    assert is_ambiguous(t, "GET", "/admin")
    assert hit(t, "GET", "/Admin") == ("GET /Admin", {})
    assert hit(t, "GET", "/other") == ("GET /{page}", {"page": "other"})
    t = table("GET /v1/data/", "GET /v1/{a}")
    assert is_ambiguous(t, "GET", "/v1/data")


def test_lenient_reading_that_finds_the_same_route_is_fine() -> None:
    assert hit(AUDIT, "GET", "/v1/data/Posts") == ("GET /v1/data/{table}", {"table": "Posts"})
    assert hit(AUDIT, "GET", "/v1/data/%C3%A9t%C3%A9") is not None
    t = table("GET /_stream/**", "GET /{x}")
    assert hit(t, "GET", "/_stream/") == ("GET /_stream/**", {})
    assert hit(t, "GET", "/Other") == ("GET /{x}", {"x": "Other"})
    assert is_ambiguous(t, "GET", "/_STREAM")  # leniently, `/_stream/**` comes first
    t = table("GET /v1/data/{table}", "GET /v1/data/{table}/**")
    assert is_ambiguous(t, "GET", "/v1/data/posts/")  # upstreams may serve either: refuse


def test_lenient_readings_are_per_method() -> None:
    t = table("DELETE /v1/data/audit_log", "GET /v1/data/{table}")
    assert hit(t, "GET", "/v1/data/AUDIT_LOG") == ("GET /v1/data/{table}", {"table": "AUDIT_LOG"})
    # DELETE: no route as written, its literal in another case: ambiguous, not unrouted.
    assert is_ambiguous(t, "DELETE", "/v1/data/AUDIT_LOG")


def test_fold_segment_for_comparing_params_with_config_names() -> None:
    assert fold_segment("AUDIT_LOG") == "audit_log"
    assert fold_segment("audit%3Alog") == "audit:log"
    assert fold_segment("%EF%BD%81udit") == "audit"  # U+FF41 FULLWIDTH a
    assert fold_segment("%C3%89T%C3%89") == "\xe9t\xe9"
    assert fold_segment("posts") == "posts"


def test_many_routes() -> None:
    patterns = [f"GET|POST /api/r{i}/{{id}}/sub{i % 7}" for i in range(150)]
    patterns += [f"GET /v{i}/data/{{table}}/**" for i in range(2, 50)]
    patterns += ["GET /v1/data/audit_log", "GET /v1/data/{table}/{id}"]
    t = table(*patterns)
    assert hit(t, "GET", "/v1/data/posts/1")[0] == "GET /v1/data/{table}/{id}"
    assert hit(t, "POST", "/api/r149/7/sub2") == ("GET|POST /api/r149/{id}/sub2", {"id": "7"})
    assert hit(t, "GET", "/v49/data/t") == ("GET /v49/data/{table}/**", {"table": "t"})
    assert hit(t, "GET", "/api/r149/7/sub3") is None


# --- against a plain reference -----------------------------------------------------------


def _ref_match(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    for i, p in enumerate(pattern):
        if p == "**":
            return True
        if i >= len(path):
            return False
        if p == "*" or p.startswith("{"):
            if not path[i]:
                return False
        elif p != path[i]:
            return False
    return len(pattern) == len(path)


def _ref_fold(segments: tuple[str, ...], wild: bool) -> tuple[str, ...]:
    import unicodedata

    out = []
    for s in segments:
        if wild and (s in ("*", "**") or s.startswith("{")):
            out.append(s)
        else:
            out.append(
                unicodedata.normalize("NFKC", unquote(s, errors="surrogateescape")).casefold()
            )
    if out and out[-1] == "":
        out.pop()
    return tuple(out)


def _ref_resolve(patterns: list[str], method: str, path: tuple[str, ...]) -> str | None:
    parsed = [parse_pattern(p) for p in patterns]
    exact = next(
        (i for i, (m, s) in enumerate(parsed) if method in m and _ref_match(s, path)), None
    )
    folded = _ref_fold(path, wild=False)
    if exact is None and folded == (path[:-1] if path and path[-1] == "" else path):
        return None  # no route, and no other reading than without a trailing slash
    loose = next(
        (
            i
            for i, (m, s) in enumerate(parsed)
            if method in m and _ref_match(_ref_fold(s, wild=True), folded)
        ),
        None,
    )
    if exact is None:  # a route in another letter case or spelling: ambiguous
        return None if loose is None else "ambiguous"
    return "ambiguous" if loose != exact else patterns[exact]


PATTERN_SEGMENTS = ["a", "b", "A", "%3A", ":", "{p}", "{q}", "*", "**", ""]
PATH_SEGMENTS = ["a", "b", "A", "B", "%3A", "%3a", ":", "c", "", "%C3%A9", "%C3%89"]


@st.composite
def pattern(draw: st.DrawFn) -> str:
    method = draw(st.sampled_from(["GET", "POST", "GET|POST", "*"]))
    segments = draw(st.lists(st.sampled_from(PATTERN_SEGMENTS), max_size=4))
    text = f"{method} /" + "/".join(segments)
    try:
        parse_pattern(text)
    except ValueError:
        return f"{method} /"
    return text


@settings(max_examples=800, deadline=None)
@given(
    st.lists(pattern(), min_size=1, max_size=8),
    st.sampled_from(["GET", "HEAD", "POST", "PUT"]),
    st.lists(st.lists(st.sampled_from(PATH_SEGMENTS), max_size=5), min_size=1, max_size=6),
)
def test_table_agrees_with_a_linear_scan(
    patterns: list[str], method: str, paths: list[list[str]]
) -> None:
    """Several paths through one table, twice: answers remembered by path shape must
    be right for every other path of that shape too."""
    t = table(*patterns)
    for path_segments in paths + paths:
        target = canonicalize("/" + "/".join(path_segments))
        if not isinstance(target, Target):
            continue
        found = t.resolve(method, target.segments)
        got = (
            None
            if found is None
            else "ambiguous"
            if isinstance(found, AmbiguousMatch)
            else patterns[found.index]
        )
        assert got == _ref_resolve(patterns, method, target.segments), path_segments


@pytest.mark.parametrize("cache_size", [0, 1, 2])
def test_answers_stay_right_when_the_shape_cache_is_small_or_off(
    monkeypatch: pytest.MonkeyPatch, cache_size: int
) -> None:
    import keyproxy.policy.routes

    monkeypatch.setattr(keyproxy.policy.routes, "SHAPE_CACHE_SIZE", cache_size)
    t = table("GET /v1/data/audit_log", "GET /v1/data/{table}", "GET /v1/{a}/{b}/{c}", "GET /**")
    expected = {
        "/v1/data/posts": ("GET /v1/data/{table}", {"table": "posts"}),
        "/v1/data/audit_log": ("GET /v1/data/audit_log", {}),
        "/v1/x/y/z": ("GET /v1/{a}/{b}/{c}", {"a": "x", "b": "y", "c": "z"}),
        "/v1/data/y/z": ("GET /v1/{a}/{b}/{c}", {"a": "data", "b": "y", "c": "z"}),
        "/other": ("GET /**", {}),
    }
    for _ in range(2):
        for path, answer in expected.items():
            assert hit(t, "GET", path) == answer
