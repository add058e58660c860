"""Field filtering, body scrubbing and the cache through a real `keyproxy serve` process.

The upstream is tests/upstream_server.py: it sends every body shape in every
coding and framing whatever the request asks for, a debug page and an Express
redirect body quoting the secret, and records what reached it (so a cache hit
is seen as a request the upstream never got).
"""

from __future__ import annotations

import gzip
import html
import http.client
import json
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from typing import Any

import brotli
import pytest

from tests.procs import UpstreamServer, start_upstream
from tests.proxy_process import KEYS, Keyproxy, base_config, digest, start_keyproxy

SECRET = "e2e-upstream-secret-31415926535"
FILTERED_KEY = "pk_" + "f" * 64
INCLUDE_KEY = "pk_" + "e" * 64
DECODE = {
    None: lambda b: b,
    "gzip": gzip.decompress,
    "deflate": zlib.decompress,
    "br": brotli.decompress,
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    server = start_upstream(header_secrets={"X-Upstream-Key": SECRET})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kp(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyproxy]:
    config: dict[str, Any] = base_config(upstream.url, upstream.inject())
    config["routes"] = [
        {"match": "GET|HEAD /shaped/{shape}", "acl": "get", "fields_at": ["data[*]"]},
        {"match": "GET /echo-page", "acl": "get"},
        {"match": "GET /echo-escaped", "acl": "get"},
        {"match": "GET /express-redirect", "acl": "get"},
        {"match": "GET /unscanned/**", "acl": "get", "scrub_body": False},
        {"match": "GET /body", "acl": "get"},
        *config["routes"],
    ]
    config["keys"] += [
        {
            "id": "filtered",
            "hash": digest(FILTERED_KEY),
            "type": "read",
            "fields": {"exclude": ["email", "author.phone"]},
        },
        {
            "id": "included",
            "hash": digest(INCLUDE_KEY),
            "type": "read",
            "fields": {"include": ["id", "title"]},
        },
    ]
    config["server"]["filter_max_body"] = "1MiB"
    config["server"]["filter_max_depth"] = 32
    config["cache"] = {
        "backend": "memory",
        "ttl": "30s",
        "routes": ["GET /json/{n}", "GET|HEAD|OPTIONS /echo/**"],
        "max_entries": 100,
        "max_bytes": "4MiB",
        "max_entry_bytes": "256KiB",
    }
    proxy = start_keyproxy(tmp_path_factory.mktemp("body-work"), config)
    yield proxy
    proxy.stop()


def admin_text(kp: Keyproxy, path: str) -> str:
    conn = http.client.HTTPConnection(kp.admin_host, kp.admin_port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def records_for(upstream: UpstreamServer, prefix: str) -> list[dict[str, Any]]:
    return [r for r in upstream.records() if r["raw_path"].startswith(prefix)]


# --------------------------------------------------------------------------- fields

SHAPES = ["object", "array", "ndjson", "envelope"]
CODINGS = ["identity", "gzip", "deflate", "br"]


def documents(shape: str, body: bytes) -> list[dict[str, Any]]:
    if shape == "ndjson":
        return [json.loads(line) for line in body.splitlines()]
    value = json.loads(body)
    if shape == "object":
        return [value]
    if shape == "envelope":
        assert value["total"] == 2  # the envelope itself is kept
        return value["data"]
    return value


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_coding_and_framing_is_filtered(
    kp: Keyproxy, shape: str, coding: str, framing: str
) -> None:
    status, headers, body, _ = kp.request(
        "GET",
        f"/shaped/{shape}?coding={coding}&framing={framing}",
        {"Accept-Encoding": "gzip, br"},
        key=FILTERED_KEY,
    )
    assert status == 200, body
    sent = headers.get("content-encoding")
    assert sent in (None, "gzip", "br")
    docs = documents(shape, DECODE[sent](body))
    assert docs and all("email" not in d and "phone" not in d["author"] for d in docs)
    assert all(d["author"]["name"].startswith("Author") for d in docs)
    assert int(headers["content-length"]) == len(body)
    assert "etag" not in headers and "accept-ranges" not in headers
    assert "transfer-encoding" not in headers


def test_a_key_without_fields_sees_everything(kp: Keyproxy) -> None:
    status, _, body, _ = kp.request("GET", "/shaped/array", key=KEYS["reader"])
    assert status == 200 and all("email" in d for d in json.loads(body))


def test_include_keeps_only_the_named_fields(kp: Keyproxy) -> None:
    status, _, body, _ = kp.request("GET", "/shaped/envelope?coding=gzip", key=INCLUDE_KEY)
    assert status == 200
    assert json.loads(body)["data"] == [
        {"id": 1, "title": "Post 1"},
        {"id": 2, "title": "Post 2"},
    ]


def _without(record: dict[str, Any]) -> dict[str, Any]:
    """A record as the exclude key sees it: no email, no author.phone."""
    out = {k: v for k, v in record.items() if k != "email"}
    out["author"] = {k: v for k, v in record["author"].items() if k != "phone"}
    return out


def test_keys_with_other_filters_each_get_their_own_answer_again_and_again(kp: Keyproxy) -> None:
    """The same upstream bytes, filtered once per filter and then answered from the
    memo: no key, route or coding ever gets another's output."""
    from tests.upstream_server import json_body, shaped_body

    records = json.loads(json_body(16 * 1024))
    wanted = {
        FILTERED_KEY: [_without(r) for r in records],
        INCLUDE_KEY: [{"id": r["id"], "title": r["title"]} for r in records],
        KEYS["reader"]: records,
    }
    envelope, _ = shaped_body("envelope")
    items = json.loads(envelope)["data"]
    heads: dict[str | None, str | None] = {}
    for _ in range(3):
        for key, expected in wanted.items():
            status, headers, body, _ = kp.request(
                "GET", "/json/16384", {"Accept-Encoding": "gzip"}, key=key
            )
            assert status == 200 and "content-encoding" not in headers
            assert json.loads(body) == expected
        # One compressed body, three codings chosen for three clients.
        for accept, sent in (("gzip", "gzip"), (None, None), ("br", "br"), ("identity", None)):
            status, headers, body, _ = kp.request(
                "GET",
                "/shaped/array?coding=gzip",
                {"Accept-Encoding": accept} if accept else {},
                key=FILTERED_KEY,
            )
            assert status == 200 and headers.get("content-encoding") == sent
            assert "accept-encoding" in headers.get("vary", "").lower()
            assert heads.setdefault(accept, headers.get("vary")) == headers.get("vary")
            assert json.loads(DECODE[sent](body)) == [_without(r) for r in items]
        # The same bytes on two routes: documents at `data[*]` on one, the body whole on
        # the other (whose top level has no email to hide).
        status, _, body, _ = kp.request("GET", "/shaped/envelope", key=FILTERED_KEY)
        assert status == 200 and json.loads(body) == {
            "data": [_without(r) for r in items],
            "total": 2,
        }
        text = urllib.parse.quote(envelope.decode())
        status, _, body, _ = kp.request("GET", f"/body?text={text}", key=FILTERED_KEY)
        assert status == 200 and json.loads(body) == json.loads(envelope)


def test_the_upstream_is_asked_for_identity_and_whole_bodies(
    kp: Keyproxy, upstream: UpstreamServer
) -> None:
    upstream.reset()
    kp.request(
        "GET",
        "/shaped/object",
        {"Accept-Encoding": "gzip", "Range": "bytes=0-10", "If-Range": '"v1"'},
        key=FILTERED_KEY,
    )
    (record,) = records_for(upstream, "/shaped/object")
    names = {n.lower(): v for n, v in record["headers"]}
    assert names["accept-encoding"] == "identity"
    assert "range" not in names and "if-range" not in names


def test_head_is_consistent_with_get(kp: Keyproxy) -> None:
    status, headers, body, _ = kp.request("HEAD", "/shaped/object", key=FILTERED_KEY)
    assert status == 200 and body == b""
    assert "etag" not in headers and "content-length" not in headers


def test_json_answers_of_other_endpoints_are_filtered_and_scrubbed(kp: Keyproxy) -> None:
    status, _, body, _ = kp.request("GET", "/echo/x?email=1", key=FILTERED_KEY)
    assert status == 200 and SECRET.encode() not in body and json.loads(body)["path"] == "/echo/x"


@pytest.mark.parametrize(
    "target",
    [
        "/status/206",  # a part of a document
        "/gzip?size=3000000",  # decodes past filter_max_body (a bomb)
        "/chunked/3?delay_ms=0",  # not JSON by its content type
        "/body?type=application/json&text=%7B%22email%22%3A%22x%22",  # not JSON by parse
        "/body?type=application/json&text=" + "%5B" * 40 + "%5D" * 40,  # too deep
        "/body?type=text/html&text=%7B%22email%22%3A1%7D",  # JSON text, HTML type
    ],
    ids=["partial", "bomb", "not-json-type", "bad-json", "too-deep", "html"],
)
def test_what_cannot_be_filtered_is_refused_whole(kp: Keyproxy, target: str) -> None:
    status, _, body, _ = kp.request("GET", target, key=FILTERED_KEY)
    assert status == 502, body
    answer = json.loads(body)
    # A bomb is already stopped by the secret scan, which decodes under the same cap.
    assert answer["error"] == ("BODY_NOT_SCANNED" if "gzip" in target else "FILTER_FAILED")
    assert set(answer) == {"statusCode", "error", "message", "requestId"}
    assert b"chunk 0" not in body and b"email" not in body


# --------------------------------------------------------------------------- scrub


def test_the_secret_split_across_two_chunks_is_masked(kp: Keyproxy) -> None:
    for cut in (200, 260, 300):
        status, headers, body, _ = kp.request("GET", f"/echo-page?cut={cut}", key=KEYS["reader"])
        assert status == 200 and SECRET.encode() not in body
        assert b"[REDACTED]" in body and int(headers["content-length"]) == len(body)
        assert body.endswith(b"</table></body></html>")


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_the_secret_inside_a_compressed_body_is_masked(kp: Keyproxy, coding: str) -> None:
    status, headers, body, _ = kp.request("GET", f"/echo-page?coding={coding}", key=KEYS["reader"])
    assert status == 200 and "content-encoding" not in headers
    assert SECRET.encode() not in body and b"[REDACTED]" in body
    assert body.startswith(b"<html>")


@pytest.mark.parametrize("key", [KEYS["reader"], FILTERED_KEY])
def test_a_secret_escaped_for_json_or_html_is_masked(
    kp: Keyproxy, upstream: UpstreamServer, key: str
) -> None:
    """Every character `\\u00hh` or `&#ddd;`: the bytes hold no spelling, the reader does."""
    direct = urllib.request.Request(
        f"{upstream.url}/echo-escaped?style=json", headers={"X-Upstream-Key": SECRET}
    )
    with urllib.request.urlopen(direct, timeout=5) as answer:
        assert json.loads(answer.read())["key"] == SECRET  # unmasked at the source
    status, _, body, _ = kp.request("GET", "/echo-escaped?style=json", key=key)
    assert status == 200 and SECRET not in json.loads(body)["key"]
    assert json.loads(body)["key"].startswith("[REDACTED]")
    status, _, body, _ = kp.request("GET", "/echo-escaped?style=html", key=key)
    if key == FILTERED_KEY:  # a page is no JSON: a key with fields never gets it
        assert status == 502 and json.loads(body)["error"] == "FILTER_FAILED"
        return
    assert status == 200 and SECRET not in html.unescape(body.decode())
    assert body.startswith(b"<p>key: [REDACTED]")


def test_an_express_redirect_body_is_masked(kp: Keyproxy) -> None:
    status, headers, body, _ = kp.request("GET", "/express-redirect", key=KEYS["reader"])
    assert status == 302 and SECRET.encode() not in body
    assert body.startswith(b"Found. Redirecting to /posts?apikey=[REDACTED]")
    assert SECRET not in headers.get("location", "")


def test_a_filtered_key_gets_redirects_without_their_body(kp: Keyproxy) -> None:
    status, headers, body, _ = kp.request("GET", "/express-redirect", key=FILTERED_KEY)
    assert status == 302 and body == b"" and headers["content-length"] == "0"
    assert headers["location"].startswith("/posts?apikey=")


def test_an_echo_endpoint_never_shows_the_secret(kp: Keyproxy) -> None:
    status, _, body, _ = kp.request("GET", "/echo/x", key=KEYS["reader"])
    assert status == 200 and SECRET.encode() not in body


def test_scrub_body_false_is_the_one_way_an_unscanned_body_passes(kp: Keyproxy) -> None:
    status, _, body, _ = kp.request("GET", "/unscanned/x", key=KEYS["reader"])
    assert status == 200 and SECRET.encode() in body


# --------------------------------------------------------------------------- cache


def test_the_cache_never_serves_an_admin_fetch_unfiltered(
    kp: Keyproxy, upstream: UpstreamServer
) -> None:
    upstream.reset()
    status, _, admin_body, _ = kp.request("GET", "/json/3000", key=KEYS["admin"])
    assert status == 200 and b"email" in admin_body
    status, _, body, _ = kp.request("GET", "/json/3000", key=FILTERED_KEY)
    assert status == 200 and b"email" not in body and b"phone" not in body
    status, _, body2, _ = kp.request("GET", "/json/3000", key=INCLUDE_KEY)
    assert status == 200 and set(json.loads(body2)[0]) == {"id", "title"}
    status, _, again, _ = kp.request("GET", "/json/3000", key=KEYS["admin"])
    assert again == admin_body
    assert len(records_for(upstream, "/json/3000")) == 1  # three hits, one upstream read
    metrics = admin_text(kp, "/metrics")
    for result in ("hit", "miss", "store"):
        assert f'keyproxy_cache_requests_total{{result="{result}"}}' in metrics


def test_a_write_evicts_the_resource_and_its_collection(
    kp: Keyproxy, upstream: UpstreamServer
) -> None:
    upstream.reset()
    for target in ("/echo/items/1", "/echo/items", "/echo/items/1", "/echo/items"):
        assert kp.request("GET", target, key=KEYS["reader"])[0] == 200
    assert len(records_for(upstream, "/echo/items")) == 2
    status, _, _, _ = kp.request("DELETE", "/echo/items/1", key=KEYS["admin"])
    assert status == 200
    for target in ("/echo/items/1", "/echo/items"):
        assert kp.request("GET", target, key=KEYS["reader"])[0] == 200
    assert len(records_for(upstream, "/echo/items")) == 5


def test_no_store_and_set_cookie_are_not_cached(kp: Keyproxy, upstream: UpstreamServer) -> None:
    upstream.reset()
    for answer in ("Cache-Control=no-store", "Set-Cookie=a=1", "Cache-Control=private"):
        for _ in range(2):
            kp.request(
                "GET",
                "/echo/nostore",
                {"X-Echo-Response-Header": answer},
                key=KEYS["reader"],
            )
    assert len(records_for(upstream, "/echo/nostore")) == 6


def test_the_cache_key_is_never_the_credential(kp: Keyproxy, upstream: UpstreamServer) -> None:
    """Two keys with the same rights share an entry: the key is the forwarded request."""
    upstream.reset()
    kp.request("GET", "/echo/shared", key=KEYS["reader"])
    kp.request("GET", "/echo/shared", key=KEYS["admin"])
    assert len(records_for(upstream, "/echo/shared")) == 1


# --------------------------------------------------------------------------- redis


SHARED_HOST = {"Host": "api.example.com"}


def test_two_replicas_share_the_redis_cache_and_a_write_evicts_for_both(
    upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The Redis backend: an answer stored by one keyproxy is a hit in another, filtered
    per key there too, and a write through either evicts it for both. Both are reached
    under one name, as behind a load balancer (the client's Host is part of the key)."""
    import redis as redis_py

    from tests.redis_server import start_redis

    redis = start_redis()
    client = redis_py.Redis.from_url(redis.url)
    replicas: list[Keyproxy] = []
    try:
        for name in ("a", "b"):
            config: dict[str, Any] = base_config(upstream.url, upstream.inject())
            config["keys"].append(
                {
                    "id": "filtered",
                    "hash": digest(FILTERED_KEY),
                    "type": "read",
                    "fields": {"exclude": ["email", "author.phone"]},
                }
            )
            config["cache"] = {
                "backend": redis.url,
                "ttl": "30s",
                "routes": ["GET /json/{n}", "GET|HEAD|OPTIONS /echo/**"],
            }
            replicas.append(start_keyproxy(tmp_path_factory.mktemp(f"redis-{name}"), config))
        a, b = replicas
        upstream.reset()
        status, _, full, _ = a.request("GET", "/json/2500", SHARED_HOST, key=KEYS["admin"])
        assert status == 200 and b"email" in full and SECRET.encode() not in full
        wait_for(lambda: stored(client) == 1)  # a's tee writes after answering
        status, _, body, _ = b.request("GET", "/json/2500", SHARED_HOST, key=FILTERED_KEY)
        assert status == 200 and b"email" not in body and b"phone" not in body
        assert len(records_for(upstream, "/json/2500")) == 1  # b's read came from Redis
        # a write through a evicts for b
        assert a.request("GET", "/echo/shared-r", SHARED_HOST, key=KEYS["reader"])[0] == 200
        wait_for(lambda: stored(client) == 2)
        assert b.request("GET", "/echo/shared-r", SHARED_HOST, key=KEYS["reader"])[0] == 200
        assert len(records_for(upstream, "/echo/shared-r")) == 1
        assert a.request("DELETE", "/echo/shared-r", SHARED_HOST, key=KEYS["admin"])[0] == 200
        wait_for(lambda: stored(client) == 1)
        assert b.request("GET", "/echo/shared-r", SHARED_HOST, key=KEYS["reader"])[0] == 200
        assert len(records_for(upstream, "/echo/shared-r")) == 3  # the DELETE and a new read
        assert all(KEYS["admin"].encode() not in client.dump(k) for k in client.keys("*"))
    finally:
        for replica in replicas:
            replica.stop()
        client.close()
        redis.stop()


def stored(client: Any) -> int:
    """Upstream paths with cached entries in Redis."""
    return len(client.keys("keyproxy:cache:*"))


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_memo_of_filtered_answers_is_counted_in_metrics(kp: Keyproxy) -> None:
    """`keyproxy_fields_memo_requests_total{result}`: an operator sees whether repeated
    answers are served from the memo (hit) or filtered again (miss)."""
    import re

    def counts() -> dict[str, float]:
        conn = http.client.HTTPConnection(kp.admin_host, kp.admin_port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        found = re.findall(
            r'^keyproxy_fields_memo_requests_total\{result="(\w+)"\} (\S+)$', text, re.M
        )
        return {result: float(value) for result, value in found}

    before = counts()
    for _ in range(3):
        status, _, body, _ = kp.request("GET", "/shaped/array", key=FILTERED_KEY)
        assert status == 200 and b"email" not in body
    status, _, _, _ = kp.request("GET", "/shaped/array", key=KEYS["reader"])  # no filter
    assert status == 200
    after = counts()
    delta = {r: after.get(r, 0) - before.get(r, 0) for r in ("hit", "miss", "bypass")}
    assert sum(delta.values()) == 3 and delta["hit"] >= 2 and delta["bypass"] == 0, delta
