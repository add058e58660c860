"""Field filtering of JSON bodies: paths, shapes, envelopes, duplicates, and failing closed."""

from __future__ import annotations

import gzip
import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyproxy.config.errors import ConfigIssue
from keyproxy.config.response_sections import read_fields
from keyproxy.config.yaml_reader import Reader
from keyproxy.response.codings import DecodeFailed, decode
from keyproxy.response.fields import (
    FieldFilter,
    FilterFailed,
    FilterLimits,
    body_kind,
    compile_fields,
    filter_body,
    parse_document_path,
    parse_field_path,
)

RECORD = {
    "id": 1,
    "title": "hello",
    "email": "a@example.com",
    "author": {"name": "Ann", "phone": "555", "email": "ann@example.com"},
    "comments": [
        {"by": "bob", "email": "bob@example.com"},
        {"by": "cy", "email": "cy@example.com"},
    ],
}


def exclude(*paths: str) -> FieldFilter:
    return compile_fields("exclude", paths)


def include(*paths: str) -> FieldFilter:
    return compile_fields("include", paths)


def run(flt: FieldFilter, value: object, ctype: str = "application/json", at: tuple = ()) -> object:
    return json.loads(filter_body(json.dumps(value).encode(), ctype, flt, at))


# ------------------------------------------------------------------------- paths


def test_exclude_top_level_and_dotted_paths() -> None:
    out = run(exclude("email", "author.phone"), RECORD)
    assert "email" not in out and "phone" not in out["author"]
    assert out["author"] == {"name": "Ann", "email": "ann@example.com"}
    assert out["comments"] == RECORD["comments"] and out["title"] == "hello"


def test_paths_walk_through_arrays_and_star_matches_any_key_or_item() -> None:
    through = run(exclude("comments.email"), RECORD)
    assert through["comments"] == [{"by": "bob"}, {"by": "cy"}]
    star_item = run(exclude("comments.*.email"), RECORD)
    assert star_item["comments"] == [{"by": "bob"}, {"by": "cy"}]
    every_email = run(exclude("*.email"), RECORD)
    assert every_email["author"] == {"name": "Ann", "phone": "555"}
    assert every_email["comments"] == [{"by": "bob"}, {"by": "cy"}]
    assert every_email["email"] == "a@example.com"  # `*.email` is one level down
    assert run(exclude("comments.*"), RECORD)["comments"] == []


def test_include_keeps_only_the_paths() -> None:
    out = run(include("id", "author.name", "comments.by"), RECORD)
    assert out == {
        "id": 1,
        "author": {"name": "Ann"},
        "comments": [{"by": "bob"}, {"by": "cy"}],
    }
    assert run(include("author"), RECORD) == {"author": RECORD["author"]}
    assert run(include("*.name"), RECORD) == {"author": {"name": "Ann"}, "comments": [{}, {}]}


def test_a_key_named_and_matched_by_star_follows_both_paths() -> None:
    value = {"a": {"x": 1, "y": 2, "z": 3}, "b": {"x": 1, "y": 2}}
    assert run(include("a.x", "*.y"), value) == {"a": {"x": 1, "y": 2}, "b": {"y": 2}}
    assert run(exclude("a.x", "*.y"), value) == {"a": {"z": 3}, "b": {"x": 1}}


def test_top_level_array_of_objects() -> None:
    out = run(exclude("email", "author.phone"), [RECORD, RECORD])
    assert len(out) == 2 and all("email" not in r and "phone" not in r["author"] for r in out)
    assert run(include("id"), [RECORD, {"x": 1}]) == [{"id": 1}, {}]


def test_include_drops_scalars_off_the_paths() -> None:
    assert run(include("a.b"), {"a": [1, {"b": 2}], "c": 3}) == {"a": [{"b": 2}]}


@pytest.mark.parametrize(
    "bad", ["", " email", "a..b", ".a", "a.", "a b", "a[0]", "a*", "**", "a." + ".".join("x" * 40)]
)
def test_invalid_field_paths_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_field_path(bad)


def test_fields_config_reader_compiles_or_names_the_problem() -> None:
    from keyproxy.config.load import _compose

    def read(text: str) -> tuple[FieldFilter | None, list[ConfigIssue]]:
        node = _compose(text)
        r = Reader({})
        return read_fields(r, node, "keys[0].fields"), r.issues

    flt, issues = read("{exclude: [email, 'author.phone']}")
    assert issues == [] and flt is not None and flt.mode == "exclude"
    assert flt.paths == ("email", "author.phone")
    for text, problem in [
        ("{include: [a], exclude: [b]}", "exactly one"),
        ("{}", "exactly one"),
        ("{exclude: []}", "empty list"),
        ("{exclude: ['a..b']}", "separated by single dots"),
        ("{hide: [a]}", "unknown field"),
        ("[a]", "expected a mapping"),
    ]:
        flt, issues = read(text)
        assert flt is None and any(problem in i.message for i in issues), (text, issues)


# ------------------------------------------------------------------------- shapes


def test_ndjson_one_object_per_line() -> None:
    body = b'{"id":1,"email":"a"}\n\n{"id":2,"email":"b"}\r\n'
    out = filter_body(body, "application/x-ndjson", exclude("email"))
    assert out == b'{"id":1}\n{"id":2}\n'


@pytest.mark.parametrize(
    ("at", "body", "expected"),
    [
        (
            ("data[*]",),
            {"data": [{"id": 1, "email": "x"}], "total": 1, "email": "meta"},
            {"data": [{"id": 1}], "total": 1, "email": "meta"},
        ),
        (
            ("hits.hits[*]._source",),
            {"hits": {"total": 2, "hits": [{"_id": "1", "_source": {"id": 1, "email": "x"}}]}},
            {"hits": {"total": 2, "hits": [{"_id": "1", "_source": {"id": 1}}]}},
        ),
        (("data",), {"data": {"id": 1, "email": "x"}}, {"data": {"id": 1}}),
    ],
)
def test_envelopes_filter_the_documents_only(at: tuple, body: dict, expected: dict) -> None:
    paths = tuple(parse_document_path(p) for p in at)
    assert run(exclude("email"), body, at=paths) == expected


def test_a_body_without_the_envelope_is_filtered_whole() -> None:
    """An error body or another shape: nothing escapes because it sat elsewhere."""
    at = (parse_document_path("data[*]"),)
    assert run(exclude("email"), {"email": "x", "error": "e"}, at=at) == {"error": "e"}
    assert run(include("id"), {"message": "boom"}, at=at) == {}


@pytest.mark.parametrize("bad", ["", "data[0]", "a..b", "[*]", "data[*", "a.*"])
def test_invalid_document_paths_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_document_path(bad)


@pytest.mark.parametrize(
    ("ctype", "kind"),
    [
        ("application/json", "json"),
        ("application/json; charset=utf-8", "json"),
        ("application/vnd.api+json", "json"),
        ("APPLICATION/JSON", "json"),
        ("application/x-ndjson", "ndjson"),
        ("text/html", None),
        ("text/plain", None),
        (None, None),
    ],
)
def test_body_kind_by_content_type(ctype: str | None, kind: str | None) -> None:
    assert body_kind(ctype) == kind


# ------------------------------------------------------------------------- duplicates


def test_an_excluded_field_cannot_survive_as_a_duplicate_key() -> None:
    """The parsed object keeps one copy (the last, as JSON.parse does); the re-serialised
    body holds each key once, so a second, hidden copy cannot reach the client."""
    body = b'{"email":"hidden-1","id":1,"email":"hidden-2"}'
    out = filter_body(body, "application/json", exclude("email"))
    assert out == b'{"id":1}' and b"hidden" not in out
    nested = b'{"author":{"phone":"1","phone":"2"},"author":{"phone":"3","name":"n"}}'
    assert filter_body(nested, "application/json", exclude("author.phone")) == (
        b'{"author":{"name":"n"}}'
    )


def test_include_with_duplicates_agrees_with_json_parse() -> None:
    body = b'{"name":"first","email":"x","name":"last"}'
    assert filter_body(body, "application/json", include("name")) == b'{"name":"last"}'


# ------------------------------------------------------------------------- failing closed


@pytest.mark.parametrize(
    ("body", "ctype", "reason"),
    [
        (b"<html>secret</html>", "text/html", "not JSON"),
        (b'{"a":1}', None, "not JSON"),
        (b'{"a":1', "application/json", "not valid JSON"),
        (b'{"a":NaN}', "application/json", "not valid JSON"),
        (b'{"a":1}\n{"b":', "application/x-ndjson", "not valid JSON"),
        (b"[" * 255 + b"]" * 255, "application/json", "deeper than 254"),
        (b'{"a":' * 300 + b"1" + b"}" * 300, "application/json", "deeper than 254"),
        (b"[" * 5000 + b"]" * 5000, "application/json", "not valid JSON"),  # orjson's own cap
    ],
)
def test_unfilterable_bodies_fail(body: bytes, ctype: str | None, reason: str) -> None:
    with pytest.raises(FilterFailed) as caught:
        filter_body(body, ctype, exclude("email"))
    assert reason in caught.value.reason


def test_size_and_depth_caps_are_configurable() -> None:
    body = json.dumps({"a": [{"b": 1}] * 100}).encode()
    with pytest.raises(FilterFailed):
        filter_body(body, "application/json", exclude("x"), limits=FilterLimits(max_bytes=100))
    with pytest.raises(FilterFailed):
        filter_body(body, "application/json", exclude("x"), limits=FilterLimits(max_depth=2))
    assert filter_body(body, "application/json", exclude("x"), limits=FilterLimits(max_depth=3))
    deep = b"[" * 65 + b"]" * 65
    with pytest.raises(FilterFailed) as caught:
        filter_body(deep, "application/json", exclude("x"), limits=FilterLimits(max_depth=64))
    assert "deeper than 64" in caught.value.reason
    assert filter_body(deep, "application/json", exclude("x")) == deep  # under the default


def test_a_compressed_bomb_is_stopped_at_the_cap() -> None:
    bomb = gzip.compress(b"[" + b"0," * (20 * 1024 * 1024) + b"0]")
    assert len(bomb) < 200_000
    with pytest.raises(DecodeFailed) as caught:
        decode(bomb, "gzip", 8 * 1024 * 1024)
    assert caught.value.too_large


def test_empty_json_body_passes_as_empty() -> None:
    assert filter_body(b"", "application/json", exclude("email")) == b""


# ------------------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["a", "b", "email", "x"]), children, max_size=4)
    ),
    max_leaves=20,
)
#: Up to four dotted paths over a few names, `*` included.
field_paths = st.lists(
    st.lists(st.sampled_from(["a", "b", "email", "x", "*"]), min_size=1, max_size=3),
    min_size=1,
    max_size=4,
)


def _keys(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def _email_depths(value: object, depth: int = 1) -> list[int]:
    """The object depth (1 = the top-level object) of every `email` key."""
    if isinstance(value, dict):
        found = [depth] if "email" in value else []
        return found + [d for v in value.values() for d in _email_depths(v, depth + 1)]
    if isinstance(value, list):
        return [d for v in value for d in _email_depths(v, depth)]
    return []


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_exclude_with_star_prefixes_removes_the_key_at_every_depth_covered(value: object) -> None:
    paths = [".".join(["*"] * n + ["email"]) for n in range(5)]  # depths 1 to 5
    out = orjson.loads(filter_body(orjson.dumps(value), "application/json", exclude(*paths)))
    assert all(depth > 5 for depth in _email_depths(out)), out


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_include_output_is_a_sub_document(value: object) -> None:
    out = orjson.loads(filter_body(orjson.dumps(value), "application/json", include("a", "b.x")))
    assert _keys(out) <= _keys(value) and _keys(out) <= {"a", "b", "x", "email"}


def test_fields_at_and_filter_limits_readers() -> None:
    from keyproxy.config.load import _compose
    from keyproxy.config.response_sections import read_fields_at, read_filter_limits

    r = Reader({})
    paths = read_fields_at(
        r, _compose("['data[*]', 'hits.hits[*]._source']"), "routes[0].fields_at"
    )
    assert r.issues == [] and paths is not None
    assert [p.steps for p in paths] == [("data", None), ("hits", "hits", None, "_source")]
    assert read_fields_at(r, _compose("['data[0]']"), "routes[0].fields_at") is None
    assert r.issues[-1].where == "routes[0].fields_at[0]" and r.issues[-1].line == 1
    assert read_fields_at(r, _compose("[]"), "routes[0].fields_at") is None
    r = Reader({})
    limits = read_filter_limits(r, _compose("2MiB"), _compose("32"))
    assert r.issues == [] and limits == FilterLimits(max_bytes=2 * 1024 * 1024, max_depth=32)
    assert read_filter_limits(r, None, _compose("1000")) is None
    assert "between 2 and 254" in r.issues[-1].message


def test_filter_encoded_decodes_filters_and_encodes_as_the_client_accepts() -> None:
    from keyproxy.response.codings import encode
    from keyproxy.response.fields import FILTER_FAILED, filter_encoded

    body = json.dumps([RECORD, RECORD]).encode()
    flt = exclude("email", "author.phone")
    for upstream_coding in ("gzip", "deflate", "br"):
        for accept, expected in [("br", "br"), ("gzip, br", "gzip"), (None, None), ("zstd", None)]:
            out, coding = filter_encoded(
                encode(body, upstream_coding), "application/json", upstream_coding, accept, flt
            )
            assert coding == expected
            plain = json.loads(decode(out, coding, 1 << 20))
            assert all("email" not in r and "phone" not in r["author"] for r in plain)
    out, coding = filter_encoded(body, "application/json", None, "gzip", flt)
    assert coding is None  # identity stays identity
    assert all("email" not in r for r in json.loads(out))
    bomb = gzip.compress(b"[" + b"0," * (9 * 1024 * 1024) + b"0]")
    with pytest.raises(FilterFailed) as caught:
        filter_encoded(bomb, "application/json", "gzip", "gzip", flt)
    assert "size limit" in caught.value.reason
    with pytest.raises(FilterFailed):
        filter_encoded(b"garbage", "application/json", "br", None, flt)
    assert (FILTER_FAILED.status, FILTER_FAILED.code) == (502, "FILTER_FAILED")


def _reference_exclude(value: object, paths: list[tuple[str, ...]]) -> object:
    """What `exclude` means, written plainly: a key goes when a path ends at it; a named
    path walks through arrays, a `*` stands for any key of an object or item of an array."""
    if isinstance(value, dict):
        out = {}
        for key, child in value.items():
            rest = [p[1:] for p in paths if p[0] in (key, "*")]
            if () in rest:
                continue
            out[key] = _reference_exclude(child, rest) if rest else child
        return out
    if isinstance(value, list):
        rest = [p for p in paths if p[0] != "*"] + [p[1:] for p in paths if p[0] == "*"]
        if () in rest:
            return []
        return [_reference_exclude(v, rest) for v in value] if rest else value
    return value


@settings(max_examples=300, deadline=None)
@given(json_values, field_paths)
def test_exclude_plan_agrees_with_the_plain_meaning(value: object, paths: list[list[str]]) -> None:
    """The precomputed plan (keys dropped, keys losing keys of their own, keys walked
    into, lists of records walked without a call per record) removes what the paths say."""
    flt = exclude(*(".".join(p) for p in paths))
    expected = _reference_exclude(value, [tuple(p) for p in paths])
    assert flt.apply(orjson.loads(orjson.dumps(value))) == expected
    records = [value, {"a": value, "email": 1}, [value]]  # a list of records, as bodies are
    assert flt.apply(orjson.loads(orjson.dumps(records))) == _reference_exclude(
        records, [tuple(p) for p in paths]
    )


_NOTHING = object()


def _reference_include(value: object, paths: list[tuple[str, ...]]) -> object:
    """What `include` means, written plainly (`_NOTHING`: no path reaches this value)."""
    if () in paths:
        return value
    if isinstance(value, dict):
        out = {}
        for key, child in value.items():
            rest = [p[1:] for p in paths if p[0] in (key, "*")]
            if rest:
                kept = _reference_include(child, rest)
                if kept is not _NOTHING:
                    out[key] = kept
        return out
    if isinstance(value, list):
        rest = [p for p in paths if p[0] != "*"] + [p[1:] for p in paths if p[0] == "*"]
        return [k for v in value if (k := _reference_include(v, rest)) is not _NOTHING]
    return _NOTHING


@settings(max_examples=300, deadline=None)
@given(json_values, field_paths)
def test_include_plan_agrees_with_the_plain_meaning(value: object, paths: list[list[str]]) -> None:
    flt = include(*(".".join(p) for p in paths))
    tuples = [tuple(p) for p in paths]
    for body in (value, [value, {"a": value, "email": 1}, [value]]):
        expected = _reference_include(body, tuples)
        assert flt.apply(orjson.loads(orjson.dumps(body))) == (
            {} if expected is _NOTHING else expected
        )


def test_include_keeps_the_order_the_paths_name() -> None:
    flt = include("title", "id", "author.name")
    out = filter_body(json.dumps([RECORD, RECORD]).encode(), "application/json", flt)
    record = b'{"title":"hello","id":1,"author":{"name":"Ann"}}'
    assert out == b"[" + record + b"," + record + b"]"


def test_a_key_spelled_with_escapes_is_the_key_it_spells() -> None:
    """A filter matching key bytes instead of parsed keys would let `em\\u0061il` (or its
    duplicate) through, which the client's JSON.parse reads as `email`."""
    body = (
        b'{"em\\u0061il":"hidden-1","id":1,"\\u0065mail":"hidden-2","author":{"ph\\u006fne":"3"}}'
    )
    out = filter_body(body, "application/json", exclude("email", "author.phone"))
    assert out == b'{"id":1,"author":{}}' and b"hidden" not in out
    assert filter_body(body, "application/json", include("email")) == b'{"email":"hidden-2"}'


def test_the_collector_pause_ends_with_the_filter_whatever_happens() -> None:
    import gc

    assert gc.isenabled()
    body = orjson.dumps([{"id": i, "email": "e"} for i in range(2000)])
    assert orjson.loads(filter_body(body, "application/json", exclude("email")))[0] == {"id": 0}
    assert gc.isenabled()
    with pytest.raises(FilterFailed):
        filter_body(b'[{"id": 1}, {"email": ', "application/json", exclude("email"))
    assert gc.isenabled()
    gc.disable()  # a process that runs without the collector keeps it off
    try:
        filter_body(body, "application/json", exclude("email"))
        assert not gc.isenabled()
    finally:
        gc.enable()
