"""Credential extraction and key lookup (decision step 1, docs/decision.md)."""

from __future__ import annotations

import base64
import re

import pytest
import yaml

from keyproxy.config.model import Key, KeyType
from keyproxy.policy.credentials import (
    Presented,
    extract,
    generate_key,
    lookup,
    sha256_digest,
    strip_query_param,
    yaml_entry,
)
from keyproxy.request import Deny, Headers

KEY = "pk_" + "a" * 64
OTHER = "sk_" + "b" * 64
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJl"
ALL = frozenset({"header", "basic", "query"})
DEFAULT = frozenset({"header", "basic"})
NOW = 1_800_000_000.0


def basic(key_id: str, key: str) -> str:
    return "Basic " + base64.b64encode(f"{key_id}:{key}".encode()).decode()


def run(
    headers: list[tuple[str, str]] | None = None,
    query: str = "",
    sources: frozenset[str] = ALL,
    query_param: str = "api_key",
) -> Presented | Deny:
    return extract(Headers(headers or []), query, sources, query_param)


def assert_deny(result: Presented | Deny, status: int, code: str) -> Deny:
    assert isinstance(result, Deny), result
    assert (result.status, result.code) == (status, code)
    for secret in (KEY, OTHER, JWT):
        assert secret not in result.message
    return result


# --- extract: the three sources --------------------------------------------------------


def test_header_key():
    assert run([("X-API-Key", KEY)]) == Presented("header", KEY, None, None)


def test_header_name_is_case_insensitive():
    assert run([("x-api-KEY", KEY)]) == Presented("header", KEY)


def test_basic_key():
    assert run([("Authorization", basic("website", KEY))]) == Presented("basic", KEY, "website")


def test_basic_scheme_is_case_insensitive():
    value = basic("website", KEY).replace("Basic", "bAsIc")
    assert run([("Authorization", value)]) == Presented("basic", KEY, "website")


def test_basic_key_may_contain_colon_after_the_first():
    key = "abc:defghijklmnopq"
    assert run([("Authorization", basic("id", key))]) == Presented("basic", key, "id")


def test_query_key():
    assert run(query=f"a=1&api_key={KEY}&b=2") == Presented("query", KEY)


def test_query_param_name_is_percent_decoded():
    assert run(query=f"%61pi_key={KEY}") == Presented("query", KEY)
    assert run(query=f"api%5Fkey={KEY}") == Presented("query", KEY)


def test_query_value_is_percent_decoded():
    assert run(query="api_key=" + KEY[:5] + "%21" + KEY[5:]) == Presented(
        "query", KEY[:5] + "!" + KEY[5:]
    )


def test_custom_query_param():
    assert run(query=f"key={KEY}", query_param="key") == Presented("query", KEY)
    assert_deny(run(query=f"api_key={KEY}", query_param="key"), 401, "UNAUTHORIZED")


def test_bearer_alongside_header_key():
    result = run([("X-API-Key", KEY), ("Authorization", f"Bearer {JWT}")])
    assert result == Presented("header", KEY, None, JWT)


def test_bearer_alone_is_returned_for_the_caller_to_decide():
    assert run([("Authorization", f"Bearer {JWT}")]) == Presented("bearer", "", None, JWT)


# --- extract: refusals -------------------------------------------------------------------


def test_nothing_is_unauthorized_with_a_hint():
    deny = assert_deny(run(sources=DEFAULT), 401, "UNAUTHORIZED")
    assert "X-API-Key" in deny.message and "Basic" in deny.message
    assert "api_key" not in deny.message
    deny = assert_deny(run(sources=ALL), 401, "UNAUTHORIZED")
    assert "?api_key=" in deny.message


def test_unrelated_query_is_not_a_credential():
    assert_deny(run(query="apikey=x&api_keys=y"), 401, "UNAUTHORIZED")


@pytest.mark.parametrize(
    "headers, query",
    [
        ([("X-API-Key", KEY), ("X-API-Key", OTHER)], ""),
        ([("X-API-Key", KEY), ("x-api-key", KEY)], ""),  # even the same key twice
        ([("X-API-Key", f"{KEY},{OTHER}")], ""),
        ([("X-API-Key", f"{KEY}, {OTHER}")], ""),
        ([("Authorization", basic("id", KEY)), ("Authorization", basic("id", OTHER))], ""),
        ([("Authorization", f"Bearer {JWT}"), ("Authorization", f"Bearer {JWT}")], ""),
        ([("X-API-Key", KEY), ("Authorization", basic("id", OTHER))], ""),
        ([("X-API-Key", KEY)], f"api_key={OTHER}"),
        ([("Authorization", basic("id", KEY))], f"api_key={OTHER}"),
        ([], f"api_key={KEY}&api_key={OTHER}"),
        ([], f"api_key={KEY}&%61pi_key={KEY}"),
        ([], f"api_key={KEY},{OTHER}"),
    ],
)
def test_ambiguous_credentials(headers, query):
    assert_deny(run(headers, query), 400, "AMBIGUOUS_CREDENTIALS")


def test_ambiguity_counts_disabled_sources_too():
    # A second key must never ride along unnoticed because its source is switched off.
    result = run([("X-API-Key", KEY)], f"api_key={OTHER}", sources=DEFAULT)
    assert_deny(result, 400, "AMBIGUOUS_CREDENTIALS")


@pytest.mark.parametrize(
    "headers, query, enabled, named",
    [
        ([("X-API-Key", KEY)], "", frozenset({"basic"}), "Basic"),
        ([("Authorization", basic("id", KEY))], "", frozenset({"header"}), "X-API-Key"),
        ([], f"api_key={KEY}", DEFAULT, "X-API-Key"),
    ],
)
def test_source_not_enabled(headers, query, enabled, named):
    deny = assert_deny(run(headers, query, sources=enabled), 401, "INVALID_TOKEN")
    assert "not accepted" in deny.message and named in deny.message


@pytest.mark.parametrize(
    "value",
    [
        "Digest username=x",
        "Token " + KEY,
        KEY,  # a bare key in Authorization
        "Bearer",
        "Bearer ",
        "Bearer a b",
        "Bearer tok*en",
    ],
)
def test_unknown_scheme_or_malformed_authorization(value):
    assert_deny(run([("Authorization", value)]), 401, "INVALID_TOKEN")


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "!!!notbase64",
        "a===",
        "YWJj=ZGVm",
        base64.b64encode(f"web:{KEY}".encode()).decode().rstrip("="),  # padding removed
        base64.b64encode(f"website:{KEY}".encode()).decode() + "\x00",
        base64.b64encode(KEY.encode()).decode(),  # no colon
        base64.b64encode(f":{KEY}".encode()).decode(),  # no key id
        base64.b64encode(b"id:\xff\xfe" + b"a" * 20).decode(),  # not UTF-8
    ],
)
def test_malformed_basic(payload):
    deny = assert_deny(run([("Authorization", f"Basic {payload}")]), 401, "INVALID_TOKEN")
    assert "Basic" in deny.message


def test_unpadded_base64_needs_padding_to_be_wrong():
    # The padding test above only means something if the encoding needs padding.
    assert base64.b64encode(f"web:{KEY}".encode()).endswith(b"=")


@pytest.mark.parametrize(
    "key",
    [
        "",
        "short",
        "a" * 15,
        "a" * 257,
        "a" * 20 + " " + "a" * 20,
        "a" * 10 + "\t" + "a" * 10,
        "a" * 20 + "é",
        "a" * 20 + "\x7f",
    ],
)
def test_malformed_key(key):
    for result in (
        run([("X-API-Key", key)]),
        run([("Authorization", basic("id", key))]),
        run(query="api_key=" + key.replace(" ", "%20").replace("\t", "%09")),
    ):
        deny = assert_deny(result, 401, "INVALID_TOKEN")
        assert "malformed key" in deny.message


def test_header_value_whitespace_is_not_part_of_the_key():
    # Leading and trailing spaces are HTTP whitespace, not key characters.
    assert run([("X-API-Key", f" {KEY}\t")]) == Presented("header", KEY)


def test_key_length_bounds_are_inclusive():
    assert isinstance(run([("X-API-Key", "a" * 16)]), Presented)
    assert isinstance(run([("X-API-Key", "~" * 256)]), Presented)


def test_messages_never_hold_the_credential():
    secretish = "x" * 300  # too long: refused, and its text must not be echoed
    results = [
        run([("X-API-Key", secretish)]),
        run([("Authorization", "Weird " + secretish)]),
        run([("Authorization", "Basic " + secretish)]),
        run([("X-API-Key", secretish), ("X-API-Key", secretish)]),
    ]
    for result in results:
        assert isinstance(result, Deny)
        assert secretish not in result.message


def test_repr_hides_key_and_token():
    presented = Presented("basic", KEY, "website", JWT)
    text = repr(presented)
    assert KEY not in text and JWT not in text and "website" in text
    assert KEY not in str(presented)


# --- strip_query_param --------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, expected",
    [
        ("", ""),
        (f"api_key={KEY}", ""),
        (f"a=1&api_key={KEY}&b=%2F+x", "a=1&b=%2F+x"),
        (f"%61pi_key={KEY}&b=2", "b=2"),
        ("api_key=1&api_key=2&c", "c"),
        ("api_keys=1&xapi_key=2", "api_keys=1&xapi_key=2"),
        ("a=%41&&b", "a=%41&&b"),
        ("api_key", ""),
    ],
)
def test_strip_query_param(query, expected):
    assert strip_query_param(query, "api_key") == expected


# --- lookup ----------------------------------------------------------------------------------


def make_key(key: str = KEY, **fields) -> Key:
    return Key(
        id=fields.pop("id", "website"),
        digest=sha256_digest(key),
        type=KeyType.READ,
        acls=frozenset({"get"}),
        **fields,
    )


def index(*keys: Key) -> dict[bytes, Key]:
    return {k.digest: k for k in keys}


def test_lookup_header_key():
    key = make_key()
    assert lookup(Presented("header", KEY), index(key), NOW) is key


def assert_lookup_deny(result: Key | Deny, code: str) -> Deny:
    assert isinstance(result, Deny), result
    assert (result.status, result.code) == (401, code)
    assert KEY not in result.message
    return result


def test_lookup_unknown_key():
    deny = assert_lookup_deny(
        lookup(Presented("header", OTHER), index(make_key()), NOW), "INVALID_TOKEN"
    )
    assert deny.message == "unknown API key"


def test_lookup_unknown_and_basic_mismatch_look_the_same():
    keys = index(make_key())
    unknown = assert_lookup_deny(lookup(Presented("header", OTHER), keys, NOW), "INVALID_TOKEN")
    mismatch = assert_lookup_deny(
        lookup(Presented("basic", KEY, "other-id"), keys, NOW), "INVALID_TOKEN"
    )
    assert unknown == mismatch


def test_lookup_basic_requires_matching_id():
    key = make_key()
    assert lookup(Presented("basic", KEY, "website"), index(key), NOW) is key
    assert_lookup_deny(lookup(Presented("basic", KEY, "Website"), index(key), NOW), "INVALID_TOKEN")
    assert_lookup_deny(lookup(Presented("basic", KEY, "websit"), index(key), NOW), "INVALID_TOKEN")


def test_lookup_bearer_only_is_not_a_key():
    assert_lookup_deny(
        lookup(Presented("bearer", "", None, JWT), index(make_key()), NOW), "INVALID_TOKEN"
    )


def test_lookup_revoked():
    deny = assert_lookup_deny(
        lookup(Presented("header", KEY), index(make_key(revoked=True)), NOW), "TOKEN_REVOKED"
    )
    assert "website" in deny.message


def test_lookup_revoked_wins_over_expired():
    key = make_key(revoked=True, expires_at=NOW - 10)
    assert_lookup_deny(lookup(Presented("header", KEY), index(key), NOW), "TOKEN_REVOKED")


def test_lookup_expired_says_when():
    key = make_key(expires_at=1_767_225_600.0)  # 2026-01-01T00:00:00Z
    deny = assert_lookup_deny(lookup(Presented("header", KEY), index(key), NOW), "TOKEN_EXPIRED")
    assert "2026-01-01T00:00:00Z" in deny.message


def test_lookup_expiry_boundary():
    key = make_key(expires_at=NOW)
    assert_lookup_deny(lookup(Presented("header", KEY), index(key), NOW), "TOKEN_EXPIRED")
    assert lookup(Presented("header", KEY), index(key), NOW - 0.001) is key


# --- keygen ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, prefix", [("publishable", "pk_"), ("secret", "sk_")])
def test_generate_key(kind, prefix):
    key = generate_key(kind)
    assert re.fullmatch(prefix + "[0-9a-f]{64}", key)
    assert generate_key(kind) != key
    assert isinstance(run([("X-API-Key", key)]), Presented)


def test_generate_key_unknown_kind():
    with pytest.raises(ValueError, match="publishable or secret"):
        generate_key("admin")


@pytest.mark.parametrize("kind, key_type", [("publishable", "read"), ("secret", "write")])
def test_yaml_entry(kind, key_type):
    key = generate_key(kind)
    text = yaml_entry(key, "website", kind)
    assert key not in text
    assert "acls" in text and "quota" in text and "ttl" in text  # the hint comment
    parsed = yaml.safe_load("keys:\n" + text)
    assert parsed == {
        "keys": [{"id": "website", "hash": "sha256:" + sha256_digest(key).hex(), "type": key_type}]
    }


@pytest.mark.parametrize("key_id", ["no", "1e3", "null", "a: b", "x #y", "'q'", "ünï"])
def test_yaml_entry_quotes_ids_that_would_not_read_back(key_id):
    parsed = yaml.safe_load("keys:\n" + yaml_entry(KEY, key_id, "secret"))
    assert parsed["keys"][0]["id"] == key_id


def test_sha256_digest():
    assert sha256_digest("abc").hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


@pytest.mark.parametrize(
    "name",
    ["api_key[]", "[api_key]", "%5Bapi_key%5D", "api_key.x", "api_key[x]", "API_KEY", "+api_key"],
)
def test_framework_spellings_of_the_query_key_are_refused(name):
    # qs, Rack and PHP read these as `api_key`: a key there would reach the upstream.
    assert_deny(run(query=f"{name}={KEY}"), 401, "INVALID_TOKEN")
    assert_deny(run([("X-API-Key", KEY)], query=f"{name}=other"), 401, "INVALID_TOKEN")


def test_names_that_merely_contain_the_key_name_pass():
    assert run([("X-API-Key", KEY)], query="my_api_key_hint=1") == Presented("header", KEY)
