"""The canonical request target: hostile spellings refused, benign ones made unique."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from keyproxy.policy.paths import (
    MAX_SEGMENTS,
    MAX_TARGET_LENGTH,
    InvalidPath,
    Target,
    _canonicalize_carefully,
    canonicalize,
)


def refused(raw: str) -> str:
    result = canonicalize(raw)
    assert isinstance(result, InvalidPath), f"{raw!r} was accepted as {result!r}"
    return result.message


def accepted(raw: str) -> Target:
    result = canonicalize(raw)
    assert isinstance(result, Target), f"{raw!r} was refused: {result!r}"
    return result


def _cases(*spellings: str) -> list[str]:
    """Each spelling with its escapes in both hex cases."""
    out: list[str] = []
    for s in spellings:
        for variant in (s, s.lower(), s.upper()):
            if variant not in out:
                out.append(variant)
    return out


HOSTILE = [
    # encoded separators
    *_cases("/v1/data/a%2Fb", "/v1/%2f..%2fadmin", "/v1/data%2F"),
    *_cases("/v1/data/a%5Cb", "/v1/%5c..%5cadmin"),
    # dot segments, raw, encoded, mixed
    "/v1/../admin",
    "/v1/./data",
    "/..",
    "/.",
    "/v1/data/..",
    "/v1/data/.",
    "/v1/data/../",
    *_cases("/v1/%2e%2e/admin", "/v1/.%2e/admin", "/v1/%2e./admin", "/v1/%2e/data", "/%2e%2e"),
    # double encoding
    *_cases("/v1/%252e%252e/admin", "/v1/%252F", "/v1/%25", "/v1/%2541"),
    # empty segments
    "//v1/data",
    "/v1//data",
    "/v1/data//",
    "//",
    "///",
    # path parameters
    "/v1/data;jsessionid=1",
    "/v1/..;/admin",
    "/v1;/data",
    *_cases("/v1/data%3Bx", "/v1/%3b"),
    # backslashes
    "/v1\\admin",
    "/v1/data\\",
    "/\\",
    # controls, raw and encoded
    "/v1/data\x00",
    "/v1/\x00/x",
    "/v1/data\r\nX-Injected: 1",
    "/v1/data\t",
    "/v1/data\x7f",
    "/v1/data?x=\x00",
    *_cases("/v1/data%00", "/v1/%0d%0a", "/v1/%09", "/v1/%1f", "/v1/%7f"),
    "/v1/%C2%85",  # U+0085 NEL, a C1 control
    # space
    "/v1/da ta",
    "/v1/data ",
    "/v1/data?q=a b",
    # fragments
    "/v1/data#x",
    "/v1/data#",
    "/v1/data?x=1#frag",
    "/#",
    # raw non-ASCII (latin-1 decoded wire bytes)
    "/v1/caf\xe9",
    "/v1/\xc3\xa9",
    "/v1/data?q=\xe9",
    "/v1/\u2215admin",
    # malformed escapes
    "/v1/%",
    "/v1/%4",
    "/v1/%zz",
    "/v1/%g0",
    "/v1/%+1",
    "/v1/% 1",
    "/v1/data?x=%",
    "/v1/data?x=%4",
    "/v1/data?x=%zz",
    # escapes that decoders disagree on
    *_cases("/v1/%c0%ae%c0%ae/admin", "/v1/%c0%af", "/v1/%e0%80%ae", "/v1/%c0%80"),
    "/v1/%ED%A0%80",  # an encoded surrogate
    "/v1/%FF",
    "/v1/%C3",
    "/v1/%EF%BC%8F",  # U+FF0F FULLWIDTH SOLIDUS
    "/v1/%EF%BC%8E%EF%BC%8E/admin",  # U+FF0E FULLWIDTH FULL STOP, twice
    "/v1/%EF%BC%BC",  # U+FF3C FULLWIDTH REVERSE SOLIDUS
    "/v1/%EF%BC%85",  # U+FF05 FULLWIDTH PERCENT SIGN
    # other request-target forms
    "http://evil.example/v1/data",
    "HTTPS://evil.example/v1/data",
    "evil.example:443",
    "*",
    "",
    "v1/data",
    "?x=1",
    # too long, too many segments
    "/" + "a" * MAX_TARGET_LENGTH,
    "/v1?" + "x" * MAX_TARGET_LENGTH,
    "/a" * (MAX_SEGMENTS + 1),
    "/%41" * (MAX_SEGMENTS + 1),
]


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_targets_are_refused(raw: str) -> None:
    message = refused(raw)
    assert 10 < len(message) < 120


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("/v1/a%2Fb", "%2F"),
        ("/v1/a%5cb", "%5C"),
        ("/v1/%252e", "%25"),
        ("/v1/%3b", "%3B"),
        ("/v1/%2e%2e/x", "'..'"),
        ("/v1//x", "'//'"),
        ("/v1;x", "';'"),
        ("/v1\\x", "backslash"),
        ("/v1\x00", "control"),
        ("/v1#x", "'#'"),
        ("/v1 x", "space"),
        ("/v1/\xe9", "non-ASCII"),
        ("/v1/%zz", "malformed"),
        ("http://h/x", "absolute-form"),
        ("*", "asterisk"),
    ],
)
def test_refusals_say_what_is_wrong(raw: str, fragment: str) -> None:
    assert fragment in refused(raw)


def test_messages_do_not_echo_client_input() -> None:
    secret = "sk_" + "ab12" * 16
    for raw in (f"/v1/{secret}%2F", f"/v1/{secret}\x00", f"http://x/{secret}", f"/{secret}#"):
        assert "ab12" not in refused(raw)


@pytest.mark.parametrize(
    ("raw", "path", "query", "segments"),
    [
        ("/", "/", "", ()),
        ("/?", "/", "", ()),
        ("/?a=1", "/", "a=1", ()),
        (
            "/v1/data/posts/123?limit=10",
            "/v1/data/posts/123",
            "limit=10",
            ("v1", "data", "posts", "123"),
        ),
        ("/v1/data/", "/v1/data/", "", ("v1", "data", "")),
        ("/v1", "/v1", "", ("v1",)),
        # unreserved escapes decoded, in either hex case
        ("/v1/%41%62%63", "/v1/Abc", "", ("v1", "Abc")),
        ("/v1/%2d%2E%5f%7E", "/v1/-._~", "", ("v1", "-._~")),
        ("/v1/a%2eb", "/v1/a.b", "", ("v1", "a.b")),
        ("/v1/%2e%2e%2e", "/v1/...", "", ("v1", "...")),
        ("/v1/%30", "/v1/0", "", ("v1", "0")),
        # reserved and other escapes kept, hex upper-cased
        ("/v1/a%3ab", "/v1/a%3Ab", "", ("v1", "a%3Ab")),
        ("/v1/a%20b", "/v1/a%20b", "", ("v1", "a%20b")),
        ("/v1/%3f%23", "/v1/%3F%23", "", ("v1", "%3F%23")),
        ("/v1/%c3%a9", "/v1/%C3%A9", "", ("v1", "%C3%A9")),
        ("/v1/%E2%82%AC", "/v1/%E2%82%AC", "", ("v1", "%E2%82%AC")),
        # characters that are never valid raw are encoded: one spelling
        ("/v1/{x}", "/v1/%7Bx%7D", "", ("v1", "%7Bx%7D")),
        ("/v1/a|b", "/v1/a%7Cb", "", ("v1", "a%7Cb")),
        ('/v1/"<>[]^`', "/v1/%22%3C%3E%5B%5D%5E%60", "", ("v1", "%22%3C%3E%5B%5D%5E%60")),
        # sub-delims, ':' and '@' stay raw
        ("/v1/a:b@c!$&'()*+,=", "/v1/a:b@c!$&'()*+,=", "", ("v1", "a:b@c!$&'()*+,=")),
        # dots that are not dot segments
        ("/.well-known/jwks.json", "/.well-known/jwks.json", "", (".well-known", "jwks.json")),
        ("/v1/.../x", "/v1/.../x", "", ("v1", "...", "x")),
        ("/v1/..a", "/v1/..a", "", ("v1", "..a")),
        # the query is validated, never rewritten
        ("/v1?a=%2f&b=%2e%2E&c=/x/../?d", "/v1", "a=%2f&b=%2e%2E&c=/x/../?d", ("v1",)),
        ("/v1?a=\\;{}|", "/v1", "a=\\;{}|", ("v1",)),
        ("/v1??", "/v1", "?", ("v1",)),
    ],
)
def test_canonical_forms(raw: str, path: str, query: str, segments: tuple[str, ...]) -> None:
    assert canonicalize(raw) == Target(path, query, segments)


def test_limits_are_inclusive() -> None:
    longest = "/" + "a" * (MAX_TARGET_LENGTH - 1)
    assert accepted(longest).path == longest
    deepest = "/a" * MAX_SEGMENTS
    assert len(accepted(deepest).segments) == MAX_SEGMENTS
    assert len(accepted("/a" * (MAX_SEGMENTS - 1) + "/").segments) == MAX_SEGMENTS


def test_spellings_of_one_path_give_one_target() -> None:
    spellings = [
        "/v1/data/posts",
        "/v1/%64ata/posts",
        "/v1/data/%70%6F%73%74%73",
        "/%76%31/data/posts",
    ]
    assert {canonicalize(s) for s in spellings} == {
        Target("/v1/data/posts", "", ("v1", "data", "posts"))
    }


# --- properties ------------------------------------------------------------------------

FRAGMENTS = [
    "/", "/", "/", "a", "A", "z", "0", "-", "_", "~", ".", "..", "?", "=", "&", ":", "@", "!",
    "%", "%2e", "%2E", "%2f", "%2F", "%5c", "%25", "%41", "%61", "%3a", "%3A", "%3b", "%20",
    "%00", "%7f", "%C3%A9", "%c0%ae", "%EF%BC%8F", "%EF%BC%8E", "%E2%82%AC", "%zz", "%4",
    "{", "}", "|", "^", "`", '"', "<", "[", "\\", ";", "#", " ", "\x00", "\t", "\xe9", "\x7f",
]  # fmt: skip

BENIGN = [
    "a",
    "B",
    "0",
    "-",
    ".",
    "~",
    ":",
    "@",
    "+",
    "%41",
    "%2e",
    "%3a",
    "%C3%A9",
    "%e2%82%ac",
    "{",
    "|",
]
benign_targets = st.builds(
    lambda segments, query: "/" + "/".join(segments) + query,
    st.lists(st.lists(st.sampled_from(BENIGN), min_size=1, max_size=4).map("".join), max_size=6),
    st.sampled_from(["", "?", "?a=1&b=%2F", "?x=../..;\\"]),
)

targets = st.one_of(
    benign_targets,
    st.lists(st.sampled_from(FRAGMENTS), max_size=24).map("".join),
    st.lists(st.sampled_from(FRAGMENTS), max_size=24).map(lambda parts: "/" + "".join(parts)),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=40).map(
        lambda s: "/" + s
    ),
)


def _reassemble(target: Target) -> str:
    return target.path + ("?" + target.query if target.query else "")


@settings(max_examples=1000, deadline=None)
@given(targets)
@example("/v1/%2e%2e/x")
@example("/v1/%41/%3a?q=%2F")
def test_canonical_form_is_a_fixed_point_and_clean(raw: str) -> None:
    result = canonicalize(raw)
    if isinstance(result, InvalidPath):
        return
    assert canonicalize(_reassemble(result)) == result
    assert result.path == "/" + "/".join(result.segments)
    for bad in ("//", "%2F", "%2f", "\\", "%5C", "%25", ";", "#", "%00"):
        assert bad not in result.path
    assert "." not in result.segments and ".." not in result.segments
    assert "/./" not in result.path + "/" and "/../" not in result.path + "/"
    assert all(0x21 <= ord(c) < 0x7F for c in _reassemble(result))


@settings(max_examples=1000, deadline=None)
@given(targets)
def test_fast_path_agrees_with_the_full_rules(raw: str) -> None:
    assert canonicalize(raw) == _canonicalize_carefully(raw)
