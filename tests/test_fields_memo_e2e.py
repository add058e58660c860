"""The memo of filtered answers, attacked through a real `keyproxy serve`: many keys with
different filters (a report-mode key among them) ask for the same upstream bytes in
every coding, as every Accept-Encoding, under different document paths and content
types, across a cache and a reload. Each answer must be exactly what that key, route
and client are owed, framed and labelled as a fresh filtering would be.
"""

from __future__ import annotations

import gzip
import http.client
import json
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from typing import Any

import brotli
import pytest

from keyproxy.response.fields import compile_fields, filter_document, parse_document_path
from tests.procs import UpstreamServer, start_upstream
from tests.proxy_process import KEYS, Keyproxy, base_config, digest, start_keyproxy

SECRET = "memo-e2e-upstream-secret-2718281828"
FILTERS: dict[str, dict[str, list[str]] | None] = {
    "exclude": {"exclude": ["email", "author.phone"]},
    "exclude-too": {"exclude": ["email", "author.phone"]},  # same filter, another key
    "include": {"include": ["id", "title"]},
    "report": {"exclude": ["title"]},
    "plain": None,
}
API_KEYS = {name: "pk_" + f"{i:x}" * 64 for i, name in enumerate(FILTERS, start=10)}
DECODE = {None: bytes, "gzip": gzip.decompress, "deflate": zlib.decompress, "br": brotli.decompress}
ENVELOPE_AT = (parse_document_path("data[*]"),)


def keys_section(filters: dict[str, dict[str, list[str]] | None]) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = [{"id": "reader", "hash": digest(KEYS["reader"]), "type": "read"}]
    for name, fields in filters.items():
        key: dict[str, Any] = {"id": name, "hash": digest(API_KEYS[name]), "type": "read"}
        if fields is not None:
            key["fields"] = fields
        if name == "report":
            key["mode"] = "report"
            key["acls"] = ["nothing"]  # refused by ACL: report mode forwards anyway
        keys.append(key)
    return keys


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    server = start_upstream(header_secrets={"X-Upstream-Key": SECRET})
    yield server
    server.stop()


def make_config(upstream: UpstreamServer, filters: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = base_config(upstream.url, upstream.inject())
    config["routes"] = [
        {"match": "GET /shaped/{shape}", "acl": "get", "fields_at": ["data[*]"]},
        {"match": "GET /body", "acl": "get"},
        {"match": "GET /json/{n}", "acl": "get"},
        {"match": "GET /nothing", "acl": "nothing"},
    ]
    config["keys"] = keys_section(filters)
    config["cache"] = {"backend": "memory", "ttl": "60s", "routes": ["GET /json/{n}"]}
    return config


@pytest.fixture(scope="module")
def kp(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyproxy]:
    proxy = start_keyproxy(tmp_path_factory.mktemp("memo-e2e"), make_config(upstream, FILTERS))
    yield proxy
    proxy.stop()


def get(
    kp: Keyproxy, target: str, key: str, accept: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(kp.host, kp.port, timeout=10)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.putheader("X-API-Key", key)
        if accept is not None:
            conn.putheader("Accept-Encoding", accept)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, headers, body
    finally:
        conn.close()


def expected(name: str, document: Any, at: tuple[Any, ...] = ()) -> Any:
    fields = FILTERS[name]
    if fields is None:
        return document
    ((mode, paths),) = fields.items()
    return filter_document(json.loads(json.dumps(document)), compile_fields(mode, paths), at)


def memo_counts(kp: Keyproxy) -> dict[str, float]:
    conn = http.client.HTTPConnection(kp.admin_host, kp.admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    counts = {}
    for line in text.splitlines():
        if line.startswith("keyproxy_fields_memo_requests_total{"):
            result = line.split('result="')[1].split('"')[0]
            counts[result] = float(line.rsplit(" ", 1)[1])
    return counts


ACCEPTS = [None, "gzip", "br", "deflate;q=1, gzip;q=0, br;q=0", "gzip;q=0, br;q=0, deflate;q=0"]


def allowed_codings(accept: str | None) -> set[str | None]:
    return {
        None: {None},
        "gzip": {"gzip"},
        "br": {"br"},
        "deflate;q=1, gzip;q=0, br;q=0": {"deflate"},
        "gzip;q=0, br;q=0, deflate;q=0": {None},
    }[accept]


def test_every_key_gets_its_own_filter_in_every_coding_miss_or_hit(kp: Keyproxy) -> None:
    """Keys × upstream codings × client Accept-Encodings, twice over (miss, then hits),
    interleaved so a hit for one combination sits next to every other in the memo."""
    before = memo_counts(kp)
    document = json.loads(get(kp, "/shaped/envelope", KEYS["reader"])[2])
    for _ in range(2):
        for coding in ("identity", "gzip", "deflate", "br"):
            for accept in ACCEPTS:
                for name in FILTERS:
                    target = f"/shaped/envelope?coding={coding}"
                    status, headers, body = get(kp, target, API_KEYS[name], accept)
                    assert status == 200, (name, body[:200])
                    assert headers["content-length"] == str(len(body))
                    out_coding = headers.get("content-encoding")
                    if name == "plain":  # nothing filters it: the scrub link re-encodes
                        assert out_coding in allowed_codings(accept) | {None}
                    else:
                        assert "etag" not in headers and "accept-ranges" not in headers
                        if coding == "identity":
                            assert out_coding is None
                            assert "accept-encoding" not in headers.get("vary", "").lower()
                        else:
                            assert out_coding in allowed_codings(accept), (accept, out_coding)
                            assert "accept-encoding" in headers["vary"].lower()
                    got = json.loads(DECODE[out_coding](body))
                    assert got == expected(name, document, ENVELOPE_AT), (name, coding, accept)
    after = memo_counts(kp)
    assert after.get("hit", 0) > before.get("hit", 0)  # the second round was served by the memo


def test_same_bytes_under_other_document_paths_are_filtered_for_those(kp: Keyproxy) -> None:
    """The envelope's exact bytes from a route without `fields_at`: the include filter
    keeps nothing of the envelope there, and everything of the records on the other."""
    raw = get(kp, "/shaped/envelope", KEYS["reader"])[2]
    document = json.loads(raw)
    literal = "/body?" + urllib.parse.urlencode({"type": "application/json", "text": raw})
    assert get(kp, literal, KEYS["reader"])[2] == raw  # the very same upstream bytes
    for _ in range(2):
        for name in ("include", "exclude", "report"):
            on_route = json.loads(get(kp, "/shaped/envelope", API_KEYS[name])[2])
            on_literal = json.loads(get(kp, literal, API_KEYS[name])[2])
            assert on_route == expected(name, document, ENVELOPE_AT)
            assert on_literal == expected(name, document)
    assert json.loads(get(kp, literal, API_KEYS["include"])[2]) == {}


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("application/x-ndjson", 200),
        ("text/plain", 502),
        ("application/octet-stream", 502),
        ("text/html; charset=utf-8", 502),
    ],
)
def test_the_same_bytes_under_another_content_type(
    kp: Keyproxy, content_type: str, status: int
) -> None:
    """A JSON hit for these bytes never answers them as another type: a type that cannot
    be filtered is refused on every request, a memo full of its JSON twin or not."""
    text = json.dumps({"id": 7, "email": "x@y", "title": "t"})
    for kind in ("application/json", content_type, content_type):
        target = "/body?" + urllib.parse.urlencode({"type": kind, "text": text})
        got_status, _, body = get(kp, target, API_KEYS["exclude"])
        want = status if kind == content_type else 200
        assert got_status == want, (kind, body)
        if want == 502:
            assert json.loads(body)["error"] == "FILTER_FAILED" and b"x@y" not in body
        else:
            assert json.loads(body) == {"id": 7, "title": "t"}
            if "ndjson" in kind:
                assert body.endswith(b"\n") and body.count(b"\n") == 1


def test_a_secret_the_filter_would_spell_plainly_is_masked_on_every_hit(kp: Keyproxy) -> None:
    escaped = json.dumps({"id": 1, "email": "e", "note": SECRET}).replace(
        SECRET[:3], "".join(f"\\u{ord(c):04x}" for c in SECRET[:3])
    )
    assert SECRET not in escaped
    target = "/body?" + urllib.parse.urlencode({"type": "application/json", "text": escaped})
    for _ in range(3):
        for name in ("exclude", "include", "exclude-too", "report"):
            status, _, body = get(kp, target, API_KEYS[name])
            assert status == 200 and SECRET.encode() not in body, (name, body)


def test_a_cached_answer_is_filtered_for_the_key_it_is_served_to(
    kp: Keyproxy, upstream: UpstreamServer
) -> None:
    upstream.reset()
    plain = json.loads(get(kp, "/json/3000", API_KEYS["plain"])[2])  # fetched and stored
    assert any("email" in item for item in plain)
    deadline = time.monotonic() + 5
    while len([r for r in upstream.records() if r["raw_path"] == "/json/3000"]) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for _ in range(2):
        for name in FILTERS:
            for accept in (None, "gzip"):
                status, headers, body = get(kp, "/json/3000", API_KEYS[name], accept)
                assert status == 200
                got = json.loads(DECODE[headers.get("content-encoding")](body))
                assert got == expected(name, plain), name
    # Every other answer came from the cache (one entry per Accept-Encoding, which the
    # cache key holds), each filtered for its own key.
    assert len([r for r in upstream.records() if r["raw_path"] == "/json/3000"]) == 2


def test_a_reload_that_changes_a_filter_is_served_at_once(
    upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    proxy = start_keyproxy(tmp_path_factory.mktemp("memo-reload"), make_config(upstream, FILTERS))
    try:
        document = json.loads(get(proxy, "/shaped/envelope", KEYS["reader"])[2])
        for _ in range(2):  # the memo now holds this key's answer
            body = get(proxy, "/shaped/envelope?coding=gzip", API_KEYS["exclude"], "gzip")[2]
            assert json.loads(gzip.decompress(body)) == expected("exclude", document, ENVELOPE_AT)
        changed = dict(FILTERS, exclude={"include": ["title"]})
        proxy.rewrite_config(make_config(upstream, changed))
        want = filter_document(
            json.loads(json.dumps(document)), compile_fields("include", ["title"]), ENVELOPE_AT
        )
        deadline = time.monotonic() + 10
        while True:
            body = get(proxy, "/shaped/envelope?coding=gzip", API_KEYS["exclude"], "gzip")[2]
            got = json.loads(gzip.decompress(body))
            if got == want:
                break
            # Before the reload lands: the old filter's answer, never a mixture.
            assert got == expected("exclude", document, ENVELOPE_AT)
            assert time.monotonic() < deadline, "the reload never took effect"
            time.sleep(0.05)
        for _ in range(3):
            body = get(proxy, "/shaped/envelope?coding=gzip", API_KEYS["exclude"], "gzip")[2]
            assert json.loads(gzip.decompress(body)) == want
    finally:
        proxy.stop()
