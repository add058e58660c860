"""Attacks on the response side: ways a client might get the upstream's secret, or a
field its key excludes, out of an answer. Each test is one hole, found and closed."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from keyproxy.response.fields import compile_fields, filter_body, parse_document_path
from tests.procs import HeadAnswerer, header_values, raw_upstream
from tests.proxy_process import KEYS, Keyproxy, base_config, digest, error_of, start_keyproxy

SECRET = "attack-upstream-secret-27182818284"


@contextmanager
def proxy_before(
    tmp_path: Path,
    answerer: type[HeadAnswerer],
    routes: Sequence[dict[str, Any]] = (),
    keys: Sequence[dict[str, Any]] = (),
    **sections: Any,
) -> Iterator[Keyproxy]:
    """`keyproxy serve` in front of a hand-made upstream, injecting SECRET: `routes`
    before the base routes, `keys` after the base keys, `sections` set as given."""
    with raw_upstream(answerer) as url:
        config: dict[str, Any] = base_config(url, {"headers": {"X-Upstream-Key": SECRET}})
        config["routes"] = [*routes, *config["routes"]]
        config["keys"] = [*config["keys"], *keys]
        config.update(sections)
        proxy = start_keyproxy(tmp_path, config)
        try:
            yield proxy
        finally:
            proxy.stop()


class RangeEchoPage(HeadAnswerer):
    """A debug page quoting the request's headers (the injected secret among them) that
    honours `Range: bytes=a-b` as static-file servers and many frameworks do."""

    def answer(self, head: bytes) -> bytes:
        lines = head.split(b"\r\n")[1:]
        quoted = [line for line in lines if not line.lower().startswith(b"range:")]
        body = b"<pre>" + b"\n".join(quoted) + b"</pre>"
        status = b"200 OK"
        extra = b""
        for value in header_values(head, b"range"):
            match = re.fullmatch(rb"bytes=(\d+)-(\d+)", value)
            if match:
                first, last = int(match.group(1)), int(match.group(2))
                extra = b"Content-Range: bytes %d-%d/%d\r\n" % (first, last, len(body))
                body = body[first : last + 1]
                status = b"206 Partial Content"
        return (
            b"HTTP/1.1 " + status + b"\r\nContent-Type: text/html\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body
        )  # fmt: skip


@pytest.fixture
def range_proxy(tmp_path: Path) -> Iterator[Keyproxy]:
    with proxy_before(tmp_path, RangeEchoPage, [{"match": "GET /page", "acl": "get"}]) as proxy:
        yield proxy


def test_range_requests_cannot_split_the_secret_past_the_body_scan(range_proxy: Keyproxy) -> None:
    """The scan sees one answer at a time: two ranges that each hold half of the secret
    are each clean, and the client joins them. A scanned answer is asked for whole."""
    status, _, whole, _ = range_proxy.request("GET", "/page", key=KEYS["reader"])
    assert status == 200 and SECRET.encode() not in whole
    start = whole.lower().find(b"x-upstream-key: ") + len(b"x-upstream-key: ")
    half = start + len(SECRET) // 2
    pieces = []
    for first, last in ((0, half - 1), (half, len(whole) + 100)):
        status, _, body, _ = range_proxy.request(
            "GET", "/page", {"Range": f"bytes={first}-{last}"}, key=KEYS["reader"]
        )
        pieces.append(body)
    assert SECRET.encode() not in b"".join(pieces)


FILTERED_KEY = "pk_" + "a" * 64
FILTERED = {"id": "filtered", "hash": digest(FILTERED_KEY), "type": "read",
            "fields": {"exclude": ["pin"]}}  # fmt: skip


def express_etag(body: bytes) -> bytes:
    """Express's default ETag (`etag` package): weak, length and SHA-1 of the body."""
    digest = base64.b64encode(hashlib.sha1(body).digest())[:27]
    return b'W/"%x-%s"' % (len(body), digest)


def record(level: int) -> bytes:
    return json.dumps({"id": 7, "name": "ann", "pin": level}).encode()


class ExpressLikeRecord(HeadAnswerer):
    """A record served the way Express (json-server) serves every `res.json`: with an
    ETag of the body, and 304 when `If-None-Match` names it (any of a list)."""

    def answer(self, head: bytes) -> bytes:
        body = record(4721)
        etag = express_etag(body)
        wanted = header_values(head, b"if-none-match")
        if etag in {t.strip() for value in wanted for t in value.split(b",")}:
            return b"HTTP/1.1 304 Not Modified\r\nETag: " + etag + b"\r\n\r\n"
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: " + etag
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )  # fmt: skip


@pytest.fixture
def etag_proxy(tmp_path: Path) -> Iterator[Keyproxy]:
    with proxy_before(tmp_path, ExpressLikeRecord, keys=[FILTERED]) as proxy:
        yield proxy


def test_if_none_match_is_no_oracle_on_an_excluded_field(etag_proxy: Keyproxy) -> None:
    """A key that may not see `pin` sends the ETags of every candidate body in one
    If-None-Match: the upstream's 304 would say which value the hidden field holds."""
    status, _, body, _ = etag_proxy.request("GET", "/v1/data/people/7", key=FILTERED_KEY)
    assert status == 200 and json.loads(body) == {"id": 7, "name": "ann"}
    candidates = b", ".join(express_etag(record(n)) for n in range(4700, 4750))
    status, _, body, _ = etag_proxy.request(
        "GET", "/v1/data/people/7", {"If-None-Match": candidates.decode()}, key=FILTERED_KEY
    )
    assert status == 200 and json.loads(body) == {"id": 7, "name": "ann"}


def test_a_document_path_that_misses_in_one_item_still_filters_the_others() -> None:
    """`hits.hits[*]._source`: a first hit without `_source` (a multi-index search, one
    index storing no source) made the whole path count as missing, and the body was
    filtered at its top level only, where no `email` sits: the next hit's email left."""
    flt = compile_fields("exclude", ["email"])
    at = (parse_document_path("hits.hits[*]._source"),)
    body = {"hits": {"hits": [{"_id": "a"}, {"_id": "b", "_source": {"email": "x", "t": 1}}]}}
    out = json.loads(filter_body(json.dumps(body).encode(), "application/json", flt, at))
    assert b"email" not in json.dumps(out).encode()
    assert out["hits"]["hits"][1]["_source"] == {"t": 1}


def test_a_single_document_where_a_list_is_expected_is_still_filtered() -> None:
    """`data[*]` on a body whose `data` is one object (JSON:API's single resource, a
    Strapi single type on the same route pattern): it was filtered at the top level,
    and `data.email` left."""
    flt = compile_fields("exclude", ["email"])
    at = (parse_document_path("data[*]"),)
    body = {"data": {"id": 1, "email": "x"}}
    out = json.loads(filter_body(json.dumps(body).encode(), "application/json", flt, at))
    assert out == {"data": {"id": 1}}
    include = compile_fields("include", ["id"])
    out = json.loads(filter_body(json.dumps(body).encode(), "application/json", include, at))
    assert out == {"data": {"id": 1}}


class LinksFromForwardedHost(HeadAnswerer):
    """A list whose `next` link is built from X-Forwarded-Host, as Rails, Django with
    USE_X_FORWARDED_HOST or Express with `trust proxy` build absolute URLs."""

    def answer(self, head: bytes) -> bytes:
        host = [b"upstream.internal", *header_values(head, b"x-forwarded-host")][-1]
        body = b'{"items":[1,2],"next":"http://' + host + b'/v1/data/posts?page=2"}'
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body) + body
        )  # fmt: skip


def get_with_host(proxy: Keyproxy, host: str, key: str) -> bytes:
    return proxy.raw(
        f"GET /v1/data/posts HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\n"
        "Connection: close\r\n\r\n".encode()
    )


def test_a_client_host_cannot_poison_the_answer_cached_for_others(tmp_path: Path) -> None:
    """The client's Host travels as X-Forwarded-Host and the upstream may write it into
    its links; an answer fetched under `Host: evil.example` was stored under a key
    without it, and every other client of the route got links to the attacker's host
    (where their apps would send their keys)."""
    cache = {"backend": "memory", "ttl": "30s", "routes": ["GET /v1/data/{table}"]}
    with proxy_before(tmp_path, LinksFromForwardedHost, cache=cache) as proxy:
        first = get_with_host(proxy, "evil.example", KEYS["reader"])
        assert first.startswith(b"HTTP/1.1 200") and b"evil.example" in first
        time.sleep(0.2)  # the tee stores in a task
        second = get_with_host(proxy, "api.example.com", KEYS["admin"])
        assert second.startswith(b"HTTP/1.1 200") and b"evil.example" not in second


class DigestedRecord(HeadAnswerer):
    """A record with RFC 9530 digests of its bytes (`Content-Digest`, `Repr-Digest`)."""

    def answer(self, head: bytes) -> bytes:
        body = record(4721)
        digest_value = b"sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()) + b":"
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + b"Content-Digest: " + digest_value + b"\r\nRepr-Digest: " + digest_value
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )  # fmt: skip


def test_digests_of_the_unfiltered_body_do_not_reach_a_filtered_key(tmp_path: Path) -> None:
    """A digest of the upstream's bytes lets a key that may not see `pin` try every
    value offline until one hashes to it."""
    with proxy_before(tmp_path, DigestedRecord, keys=[FILTERED]) as proxy:
        status, headers, body, _ = proxy.request("GET", "/v1/data/people/7", key=KEYS["reader"])
        assert status == 200 and "content-digest" in headers  # unfiltered: kept as sent
        status, headers, body, _ = proxy.request("GET", "/v1/data/people/7", key=FILTERED_KEY)
        assert status == 200 and json.loads(body) == {"id": 7, "name": "ann"}
        assert "content-digest" not in headers and "repr-digest" not in headers


class CharsetNegotiatingEcho(HeadAnswerer):
    """An echo of the request's headers in the charset the client's `Accept` asks for,
    as Spring MVC's message converters write a String or JSON answer."""

    def answer(self, head: bytes) -> bytes:
        text = head.decode("latin-1")
        match = re.search(r"(?im)^accept:.*charset=([\w-]+)", text)
        charset = match.group(1) if match else "utf-8"
        body = text.encode(charset)
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain;charset=" + charset.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )  # fmt: skip


@pytest.mark.parametrize("charset", ["UTF-16", "utf-16le", "UTF-32BE"])
def test_a_wide_charset_answer_does_not_carry_the_secret_past_the_scan(
    tmp_path: Path, charset: str
) -> None:
    """The scan reads bytes; in UTF-16 every character of the secret is two bytes, none
    of which spells it, and the client decodes the text back to the secret."""
    page = [{"match": "GET /page", "acl": "get"}]
    with proxy_before(tmp_path, CharsetNegotiatingEcho, page) as proxy:
        status, _, body, _ = proxy.request("GET", "/page", key=KEYS["reader"])
        assert status == 200 and SECRET.encode() not in body
        status, _, body, _ = proxy.request(
            "GET", "/page", {"Accept": f"text/plain;charset={charset}"}, key=KEYS["reader"]
        )
        assert SECRET not in body.decode(charset, "replace")
        assert status == 502 and error_of(body) == "BODY_NOT_SCANNED"


class WideEcho(HeadAnswerer):
    """An echo of the request's headers in UTF-16 or UTF-32 that names no charset: a BOM
    first (.NET's `StreamWriter(Encoding.Unicode)`, Java's `UTF_16`), or JSON without
    one (`str.encode("utf-16-le")`), which Python's `json.loads(bytes)` reads by its NULs
    (RFC 4627 §3). The path picks the encoding: /wide/<codec>."""

    def answer(self, head: bytes) -> bytes:
        codec = head.split(b" ")[1].rsplit(b"/", 1)[1].decode()
        echo = {"headers": head.decode("latin-1")}
        body = json.dumps(echo).encode(codec)
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body) + body
        )  # fmt: skip


@pytest.mark.parametrize("codec", ["utf-16", "utf-32", "utf-16-le", "utf-16-be", "utf-32-le"])
def test_a_wide_body_without_a_charset_does_not_carry_the_secret_past_the_scan(
    tmp_path: Path, codec: str
) -> None:
    """The charset check reads the head; a UTF-16 body that names no charset passed it,
    and its NUL-interleaved secret passed the byte scan. A browser reads it by its BOM
    (before any declared charset), Python's JSON reader by its NULs."""
    wide = [{"match": "GET /wide/{codec}", "acl": "get"}]
    with proxy_before(tmp_path, WideEcho, wide) as proxy:
        status, _, body, _ = proxy.request("GET", "/wide/utf-8", key=KEYS["reader"])
        assert status == 200 and SECRET not in json.loads(body)["headers"]
        status, _, body, _ = proxy.request("GET", f"/wide/{codec}", key=KEYS["reader"])
        assert SECRET.encode() not in body.replace(b"\0", b"")
        assert status == 502 and error_of(body) == "BODY_NOT_SCANNED"


class HeaderEcho(HeadAnswerer):
    """A debug page quoting the request's headers (the injected secret among them), with
    nothing that keeps a cache from storing it."""

    def answer(self, head: bytes) -> bytes:
        body = b"<pre>" + head + b"</pre>"
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body) + body
        )  # fmt: skip


def test_a_reload_that_turns_scanning_on_never_serves_an_entry_stored_unscanned(
    tmp_path: Path,
) -> None:
    """An answer cached while its route had `scrub_body: false` holds the secret as the
    upstream wrote it; the store outlives a reload that keeps the cache settings, and the
    cache hit enters the chain after the scrub: after turning scanning on, the operator
    still served the secret from the cache until the entry expired."""
    unscanned = [
        {"match": "GET /cached/{page}", "acl": "get", "scrub_body": False},
        {"match": "GET /fresh/{page}", "acl": "get", "scrub_body": False},
    ]
    cache = {"backend": "memory", "ttl": "60s", "routes": ["GET /cached/{page}"]}
    with proxy_before(tmp_path, HeaderEcho, unscanned, cache=cache) as proxy:
        status, _, body, _ = proxy.request("GET", "/cached/debug", key=KEYS["reader"])
        assert status == 200 and SECRET.encode() in body  # the operator's choice, then
        time.sleep(0.2)  # the tee stores in a task
        scanned = json.loads(json.dumps(proxy.config))
        for route in scanned["routes"][:2]:
            route["scrub_body"] = True
        proxy.rewrite_config(scanned)
        deadline = time.monotonic() + 10
        while SECRET.encode() in proxy.request("GET", "/fresh/x", key=KEYS["reader"])[2]:
            assert time.monotonic() < deadline, "the reload never took effect"
            time.sleep(0.05)
        status, _, body, _ = proxy.request("GET", "/cached/debug", key=KEYS["reader"])
        assert status == 200 and SECRET.encode() not in body
        assert b"[REDACTED]" in body


class GzipRevalidation(HeadAnswerer):
    """A server that compresses (nginx `gzip on`, Express `compression()`) answering a
    revalidation: 304 with the representation's Content-Encoding and no body, as
    RFC 9110 §15.4.5 allows. /empty answers 204 the same way."""

    def answer(self, head: bytes) -> bytes:
        status = b"204 No Content" if b" /empty/" in head else b"304 Not Modified"
        return (
            b"HTTP/1.1 " + status + b'\r\nETag: "v1"\r\nContent-Encoding: gzip\r\n'
            b"Vary: Accept-Encoding\r\n\r\n"
        )


def test_a_bodiless_answer_labelled_gzip_is_not_refused(tmp_path: Path) -> None:
    """There is nothing to decode or scan: the 304 that tells a browser its copy is
    fresh was replaced by 502 BODY_NOT_SCANNED (the empty 'gzip body' failed to decode)."""
    routes = [
        {"match": "GET /page/{page}", "acl": "get"},
        {"match": "GET /empty/{page}", "acl": "get"},
    ]
    with proxy_before(tmp_path, GzipRevalidation, routes) as proxy:
        status, headers, body, _ = proxy.request(
            "GET", "/page/1", {"If-None-Match": '"v1"'}, key=KEYS["reader"]
        )
        assert (status, body) == (304, b"")
        assert headers["etag"] == '"v1"'
        status, _, body, _ = proxy.request("GET", "/empty/1", key=KEYS["reader"])
        assert (status, body) == (204, b"")
