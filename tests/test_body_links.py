"""The body links (scrub, fields, cache tee, eviction) driven directly, link by link.

`run` plays the exchange's part as the chain contract describes it: heads in
order, each chunk through every link, and each link's `on_end` output fed to
the links after it before their own `on_end`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import zlib

import brotli
import orjson
import pytest

from keyproxy.config.model import Key, KeyType, Route
from keyproxy.request import Deny, Headers, RequestContext
from keyproxy.response.body_links import (
    BODY_NOT_SCANNED,
    BodyScrubFactory,
    FieldsFactory,
    ResponseCache,
    wide_text,
)
from keyproxy.response.body_scrub import BodyScrubber
from keyproxy.response.cache import MemoryStore
from keyproxy.response.chain import RefuseAnswer, ResponseHead
from keyproxy.response.fields import (
    FILTER_FAILED,
    FilterLimits,
    compile_fields,
    parse_document_path,
)

SECRET = "upstream-secret-0123456789"
SCRUBBER = BodyScrubber((SECRET,), None, same_length=True)
EXCLUDE = compile_fields("exclude", ["email", "author.phone"])


def run(links: list, head: ResponseHead, chunks: list[bytes]) -> bytes | Deny:
    for link in links:
        deny = link.on_head(head)
        if deny is not None:
            return deny
    out = []
    for chunk in chunks:
        for link in links:
            chunk = link.on_body(chunk)
        out.append(chunk)
    for i, link in enumerate(links):
        rest = link.on_end()
        if isinstance(rest, Deny):
            assert head.hold, "a Deny at the end needs a held head"
            return rest
        for after in links[i + 1 :]:
            rest = after.on_body(rest)
        out.append(rest)
    return b"".join(out)


def ctx_for(
    fields: object = None, method: str = "GET", accept: str | None = None, match: str = "GET /x"
) -> RequestContext:
    headers = [("accept-encoding", accept)] if accept else []
    ctx = RequestContext(None, method, "/x", Headers(headers), "127.0.0.1", 0.0)  # type: ignore[arg-type]
    ctx.key = Key("k", b"", KeyType.READ, frozenset(), fields=fields)  # type: ignore[arg-type]
    ctx.route = Route(0, match, frozenset({"GET", "HEAD"}), ("x",), "a")
    return ctx


def head_of(
    *lines: bytes, status: int = 200, length: int | None = None, method: str = "GET"
) -> ResponseHead:
    return ResponseHead(status, [line + b"\r\n" for line in lines], length, method)


# --------------------------------------------------------------------------- body scrub


def test_a_secret_split_across_two_chunks_is_masked_at_its_own_length() -> None:
    body = b"Found. Redirecting to /posts?apikey=" + SECRET.encode() + b"&page=2"
    scrub = BodyScrubFactory(SCRUBBER, 1 << 20)
    for cut in (1, 40, 45, len(body) - 8):
        head = head_of(b"Content-Type: text/plain", length=len(body))
        out = run([scrub(ctx_for())], head, [body[:cut], body[cut:]])
        assert isinstance(out, bytes) and len(out) == len(body), cut
        assert SECRET.encode() not in out and b"[REDACTED]****" in out
        assert not head.hold and head.length == len(body)  # the framing is untouched


@pytest.mark.parametrize(
    "coding",
    [
        (b"gzip", gzip.compress),
        (b"deflate", zlib.compress),
        (b"br", brotli.compress),
    ],
    ids=["gzip", "deflate", "br"],
)
def test_a_compressed_body_is_decoded_scrubbed_and_sent_identity(coding: tuple) -> None:
    name, compress = coding
    body = b"<pre>X-Api-Key: " + SECRET.encode() + b"</pre>" * 100
    data = compress(body)
    head = head_of(b"Content-Type: text/html", b"Content-Encoding: " + name, b'ETag: "a"')
    out = run([BodyScrubFactory(SCRUBBER, 1 << 20)(ctx_for())], head, [data[:10], data[10:]])
    assert isinstance(out, bytes) and SECRET.encode() not in out
    assert out.startswith(b"<pre>X-Api-Key: [REDACTED]")
    assert head.hold and head.get(b"content-encoding") is None and head.get(b"etag") is None


def test_every_content_encoding_line_counts() -> None:
    """`identity` then `gzip` on two lines is a gzip body: read by its first line only, it
    would pass unscanned; two real codings on two lines cannot be scanned: refused."""
    body = b"<p>" + SECRET.encode() + b"</p>"
    head = head_of(b"Content-Encoding: identity", b"Content-Encoding: gzip")
    out = run([BodyScrubFactory(SCRUBBER, 1 << 20)(ctx_for())], head, [gzip.compress(body)])
    assert out == b"<p>[REDACTED]****************</p>"
    assert head.get(b"content-encoding") is None
    stacked = head_of(b"Content-Encoding: gzip", b"Content-Encoding: br")
    data = brotli.compress(gzip.compress(body))
    assert run([BodyScrubFactory(SCRUBBER, 1 << 20)(ctx_for())], stacked, [data]) == (
        BODY_NOT_SCANNED
    )


def test_a_compressed_body_is_encoded_again_for_a_client_that_accepts_it() -> None:
    body = b"<p>" + SECRET.encode() + b"</p>"
    head = head_of(b"Content-Encoding: br")
    link = BodyScrubFactory(SCRUBBER, 1 << 20)(ctx_for(accept="gzip;q=0.5, br;q=0"))
    out = run([link], head, [brotli.compress(body)])
    assert head.get(b"content-encoding") == b"gzip"
    assert isinstance(out, bytes) and gzip.decompress(out) == b"<p>[REDACTED]****************</p>"
    assert head.get(b"vary") == b"Accept-Encoding"  # chosen for this client: caches must know
    for vary, expected in ((b"Origin", b"Origin, Accept-Encoding"), (b"*", b"*")):
        head = head_of(b"Content-Encoding: br", b"Vary: " + vary)
        run([BodyScrubFactory(SCRUBBER, 1 << 20)(ctx_for())], head, [brotli.compress(body)])
        assert head.get(b"vary") == expected and head.get(b"content-encoding") is None


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        (b"gzip", gzip.compress(b"x" * 1000)[:-8]),  # truncated
        (b"gzip", b"not gzip at all"),
        (b"compress", b"anything"),
        (b"gzip, br", b"stacked"),
    ],
)
def test_what_cannot_be_decoded_is_refused_not_passed(encoding: bytes, data: bytes) -> None:
    head = head_of(b"Content-Encoding: " + encoding)
    assert run([BodyScrubFactory(SCRUBBER, 1 << 20)(ctx_for())], head, [data]) is BODY_NOT_SCANNED


def test_a_decompression_bomb_is_refused() -> None:
    bomb = gzip.compress(b"\0" * (4 << 20))
    head = head_of(b"Content-Encoding: gzip")
    assert run([BodyScrubFactory(SCRUBBER, 1 << 20)(ctx_for())], head, [bomb]) is BODY_NOT_SCANNED


# --------------------------------------------------------------------------- fields

RECORD = {"id": 1, "email": "a@b", "author": {"name": "n", "phone": "p"}, "title": "t"}
FILTERED = {"id": 1, "author": {"name": "n"}, "title": "t"}
SHAPES = {
    "object": (b"application/json", orjson.dumps(RECORD), lambda b: orjson.loads(b) == FILTERED),
    "array": (
        b"application/json",
        orjson.dumps([RECORD, RECORD]),
        lambda b: orjson.loads(b) == [FILTERED, FILTERED],
    ),
    "ndjson": (
        b"application/x-ndjson",
        orjson.dumps(RECORD) + b"\n" + orjson.dumps(RECORD) + b"\n",
        lambda b: [orjson.loads(x) for x in b.splitlines()] == [FILTERED, FILTERED],
    ),
    "envelope": (
        b"application/json",
        orjson.dumps({"data": [RECORD], "email": "kept: not a document"}),
        lambda b: orjson.loads(b) == {"data": [FILTERED], "email": "kept: not a document"},
    ),
}
CODINGS = {
    "identity": (None, lambda b: b),
    "gzip": (b"gzip", gzip.compress),
    "deflate": (b"deflate", zlib.compress),
    "br": (b"br", brotli.compress),
}
DECODE = {
    None: lambda b: b,
    "gzip": gzip.decompress,
    "deflate": zlib.decompress,
    "br": brotli.decompress,
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("coding", CODINGS)
def test_each_shape_in_each_coding_is_filtered(shape: str, coding: str) -> None:
    content_type, body, check = SHAPES[shape]
    name, compress = CODINGS[coding]
    data = compress(body)
    lines = [b"Content-Type: " + content_type, b'ETag: "v1"', b"Accept-Ranges: bytes"]
    if name:
        lines.append(b"Content-Encoding: " + name)
    head = head_of(*lines, length=len(data))
    ctx = ctx_for(EXCLUDE, accept="gzip, br")
    if shape == "envelope":
        ctx.route = dataclasses.replace(ctx.route, fields_at=(parse_document_path("data[*]"),))
    link = FieldsFactory(FilterLimits())(ctx)
    out = run([link], head, [data[:7], data[7:]])
    assert isinstance(out, bytes) and head.hold
    sent = head.get(b"content-encoding")
    assert (sent is None) == (name is None)  # re-encoded only where the upstream had encoded
    assert check(DECODE[sent.decode() if sent else None](out))
    assert head.get(b"etag") is None and head.get(b"accept-ranges") is None


def test_duplicate_keys_cannot_smuggle_a_hidden_field() -> None:
    body = b'{"email":"hidden","id":1,"email":"also hidden","author":{"phone":1,"phone":2}}'
    head = head_of(b"Content-Type: application/json")
    out = run([FieldsFactory(FilterLimits())(ctx_for(EXCLUDE))], head, [body])
    assert isinstance(out, bytes) and b"hidden" not in out and b"phone" not in out
    include = compile_fields("include", ["id"])
    out = run(
        [FieldsFactory(FilterLimits())(ctx_for(include))],
        head_of(b"Content-Type: application/json"),
        [b'{"id":1,"id":{"email":"x"}}'],
    )
    assert out == b'{"id":{"email":"x"}}'  # the last copy, as a client's JSON.parse reads it


@pytest.mark.parametrize("coding", ["identity", "gzip"])
def test_a_json_escaped_secret_does_not_come_out_of_the_filter_spelled_plainly(coding) -> None:
    """The filter writes strings afresh: `\\u0075pstream-...` in, the plain secret out,
    unless the filter's output is scanned too."""
    escaped = "\\u0075" + SECRET[1:]  # JSON for the secret, its first letter escaped
    body = ('{"id": 1, "note": "' + escaped + '", "email": "x"}').encode()
    lines = [b"Content-Type: application/json"]
    if coding == "gzip":
        body, lines = gzip.compress(body), [*lines, b"Content-Encoding: gzip"]
    scan = BodyScrubFactory(SCRUBBER, 1 << 20)
    fields = FieldsFactory(FilterLimits(), SCRUBBER)
    ctx = ctx_for(EXCLUDE)
    out = run([scan(ctx), fields(ctx)], head_of(*lines), [body])
    assert isinstance(out, bytes)
    text = gzip.decompress(out) if out[:2] == b"\x1f\x8b" else out
    assert SECRET.encode() not in text and b"email" not in text
    assert b'"note":"[REDACTED]' in text


@pytest.mark.parametrize(
    ("lines", "chunks", "limits"),
    [
        ([b"Content-Type: text/html"], [b"<p>hi</p>"], FilterLimits()),
        ([b"Content-Type: application/json"], [b'{"id": 1'], FilterLimits()),
        ([], [b'{"id": 1}'], FilterLimits()),
        ([b"Content-Type: application/json"], [b"[" * 30 + b"]" * 30], FilterLimits(max_depth=10)),
        (
            [b"Content-Type: application/json"],
            [b'{"a":"' + b"x" * 5000 + b'"}'],
            FilterLimits(2048),
        ),
        (
            [b"Content-Type: application/json", b"Content-Encoding: gzip"],
            [gzip.compress(b'{"a":"' + b"x" * (1 << 20) + b'"}')],
            FilterLimits(4096),
        ),
        ([b"Content-Type: application/json", b"Content-Encoding: zstd"], [b"??"], FilterLimits()),
    ],
    ids=["html", "truncated", "no-type", "too-deep", "too-large", "bomb", "unknown-coding"],
)
def test_fail_closed(lines: list[bytes], chunks: list[bytes], limits: FilterLimits) -> None:
    head = head_of(*lines)
    out = run([FieldsFactory(limits)(ctx_for(EXCLUDE))], head, chunks)
    assert out is FILTER_FAILED


def test_partial_content_is_refused_and_head_is_consistent_with_get() -> None:
    link = FieldsFactory(FilterLimits())(ctx_for(EXCLUDE))
    assert (
        run([link], head_of(b"Content-Type: application/json", status=206), [b"{}"])
        is FILTER_FAILED
    )
    head = head_of(b"Content-Type: application/json", b'ETag: "v"', length=99, method="HEAD")
    assert run([FieldsFactory(FilterLimits())(ctx_for(EXCLUDE, method="HEAD"))], head, []) == b""
    assert head.length is None and head.get(b"etag") is None and not head.hold


def test_a_key_without_fields_gets_no_link_and_requests_are_edited_only_for_body_work() -> None:
    assert FieldsFactory(FilterLimits())(ctx_for(None)) is None
    assert BodyScrubFactory(SCRUBBER, 1)(ctx_for(method="HEAD")) is None


# --------------------------------------------------------------------------- cache


def test_cache_tee_stores_and_a_write_evicts() -> None:
    async def scenario() -> None:
        store = MemoryStore(60, 100, 1 << 20, 1 << 16)
        counts: list[str] = []
        cache = ResponseCache(
            _settings(), store, lambda ctx: "/api" + ctx.raw_target, counts.append
        )
        ctx = ctx_for(match="GET /x")
        assert cache.find(ctx) is None and counts == ["miss"]
        tee = cache(ctx)
        head = head_of(b"Content-Type: application/json", length=2)
        assert run([tee], head, [b"{}"]) == b"{}"
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert counts == ["miss", "store"]
        entry = cache.find(ctx_for(match="GET /x"))
        assert entry is not None and entry.body == b"{}" and counts[-1] == "hit"
        # no-store is not stored
        ctx2 = ctx_for(match="GET /x", accept="br")
        cache.find(ctx2)
        run([cache(ctx2)], head_of(b"Cache-Control: no-store"), [b"{}"])
        await asyncio.sleep(0)
        assert counts[-1] == "bypass" and await store.get(ctx2.cache_key) is None
        # a write to the resource evicts it
        write = ctx_for(method="POST")
        evict = cache(write)
        assert evict is not None and cache(ctx_for()) is None
        run([evict], head_of(status=201), [])
        await asyncio.sleep(0)
        assert await store.get(cache.key_for(ctx_for())) is None

    asyncio.run(scenario())


def _settings():  # type: ignore[no-untyped-def]
    from keyproxy.config.response_sections import CacheSettings

    route = Route(0, "GET /x", frozenset({"GET", "HEAD"}), ("x",), "a")
    return CacheSettings("memory", 60.0, (route,))


def test_a_cache_entry_is_found_only_under_the_scan_policy_it_was_stored_under() -> None:
    """The hit enters the chain after the scrub: an entry stored unscanned must never be
    found by a request whose answer would have been scanned."""
    store = MemoryStore(60, 100, 1 << 20, 1 << 16)
    cache = ResponseCache(_settings(), store, lambda ctx: "/api/x", lambda result: None)
    unscanned = ctx_for()
    unscanned.route = dataclasses.replace(unscanned.route, scrub_body=False)
    assert cache.key_for(ctx_for()) == cache.key_for(unscanned)  # the snapshot scans nothing
    cache.scans_bodies = True
    assert cache.key_for(ctx_for()) != cache.key_for(unscanned)
    assert cache.key_for(ctx_for()).path == cache.key_for(unscanned).path  # a write evicts both


def test_a_route_may_opt_out_of_body_scrubbing() -> None:
    ctx = ctx_for()
    ctx.route = dataclasses.replace(ctx.route, scrub_body=False)
    assert BodyScrubFactory(SCRUBBER, 1)(ctx) is None
    assert BodyScrubFactory(SCRUBBER, 1)(ctx_for()) is not None


def test_a_clean_body_of_known_length_leaves_whole_from_its_last_chunk() -> None:
    """Content-Length framing: nothing held back at the end, so `on_end` adds nothing and
    the body passes unchanged (a body in one piece: scanned once, sent as it came)."""
    body = b'{"items": [' + b'{"id": 1, "name": "x"},' * 200 + b"{}]}"
    link = BodyScrubFactory(SCRUBBER, 1 << 20)(ctx_for())
    assert link is not None
    assert link.on_head(head_of(b"Content-Type: application/json", length=len(body))) is None
    assert link.on_body(body) == body
    assert link.on_end() == b""
    dirty = body[:100] + SECRET.encode() + body[100:]
    link = BodyScrubFactory(SCRUBBER, 1 << 20)(ctx_for())
    assert link is not None
    link.on_head(head_of(b"Content-Type: application/json", length=len(dirty)))
    out = link.on_body(dirty[:50]) + link.on_body(dirty[50:])
    assert len(out) == len(dirty) and SECRET.encode() not in out and link.on_end() == b""
    for spelled in (SECRET.encode(), SECRET.upper().encode(), SECRET.encode().hex().encode()):
        dirty = body[:100] + spelled + body[100:]  # in one piece: scanned whole, no stream
        link = BodyScrubFactory(SCRUBBER, 1 << 20)(ctx_for())
        assert link is not None
        link.on_head(head_of(b"Content-Type: application/json", length=len(dirty)))
        out = link.on_body(dirty)
        assert len(out) == len(dirty) and spelled not in out and link.on_end() == b""


def test_the_fields_link_edits_the_head_in_one_pass_and_keeps_other_lines_in_order() -> None:
    head = head_of(
        b"Server: up",
        b'ETag: "v1"',
        b"Content-Type: application/json",
        b"Accept-Ranges: bytes",
        b"X-Other: 1",
        b'etag: "twin"',
        b"Content-Type: text/html",  # a twin: the first one counts, as `head.get` reads it
    )
    link = FieldsFactory(FilterLimits())(ctx_for(fields=EXCLUDE))
    assert link is not None and link.on_head(head) is None and head.hold
    assert head.lines == [
        b"Server: up\r\n",
        b"Content-Type: application/json\r\n",
        b"X-Other: 1\r\n",
        b"Content-Type: text/html\r\n",
        b"Cache-Control: private\r\n",  # this key's view: for no shared cache
    ]
    body = orjson.dumps([{"id": 1, "email": "e", "author": {"phone": "p", "name": "n"}}])
    assert link.on_body(body) == b""
    assert orjson.loads(link.on_end()) == [{"id": 1, "author": {"name": "n"}}]  # type: ignore[arg-type]


def test_the_snapshot_scans_what_the_filter_writes() -> None:
    from keyproxy.config import parse_config
    from keyproxy.response.body_links import body_factories

    config = parse_config(
        """\
upstream:
  url: http://127.0.0.1:9
  inject: {headers: {X-Upstream-Key: "upstream-secret-0123456789"}}
routes:
  - {match: "GET /x", acl: all}
keys:
  - {id: k, hash: "sha256:%s", type: read, acls: [all], fields: {exclude: [email]}}
"""
        % ("0" * 64),
        "t.yaml",
        {},
    )
    (fields,) = [f for f in body_factories(config, None) if isinstance(f, FieldsFactory)]
    assert fields.scrubber is not None


@pytest.mark.parametrize(
    ("start", "wide"),
    [
        ('{"a": "b"}'.encode("utf-16"), True),  # BOM, either byte order
        ('{"a": "b"}'.encode("utf-16-be"), True),
        ("\ufeffkey".encode("utf-16-be"), True),
        ('{"a": "b"}'.encode("utf-32"), True),
        ("\ufeffkey".encode("utf-32-be"), True),
        ('{"a": "b"}'.encode("utf-16-le"), True),  # no BOM: NULs between ASCII
        ('{"a": "b"}'.encode("utf-32-be"), True),
        ("key: s".encode("utf-32-le"), True),
        ('\ufeff{"a": "b"}'.encode(), False),  # UTF-8's BOM keeps ASCII as it is
        (b'{"a": "b"}', False),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", False),
        (b"\x00\x00\x00 ftypisom\x00\x00\x02\x00", False),  # MP4
        (b"\x00\x00\x01\x00\x01\x00  \x00\x00", False),  # ICO
        (b"\x08\x96\x01\x12\x00\x1a\x00", False),  # protobuf
        (b"a\x00b\x00", False),  # too short to tell: read on with the next bytes
    ],
)
def test_wide_text_is_told_by_its_first_bytes(start: bytes, wide: bool) -> None:
    assert wide_text(start) is wide


def test_a_wide_body_is_refused_however_it_arrives() -> None:
    """Whole, in single bytes of unknown length (nothing leaves before the refusal), or
    compressed (read once decoded)."""
    body = ('{"echo": "' + SECRET + '"}').encode("utf-16")
    scrub = BodyScrubFactory(SCRUBBER, 1 << 20)
    with pytest.raises(RefuseAnswer) as refused:
        run([scrub(ctx_for())], head_of(length=len(body)), [body])
    assert refused.value.deny == BODY_NOT_SCANNED
    link = scrub(ctx_for())
    assert link.on_head(head_of()) is None
    with pytest.raises(RefuseAnswer):
        for byte in body:
            assert link.on_body(bytes([byte])) == b""
    head = head_of(b"Content-Encoding: gzip")
    assert run([scrub(ctx_for())], head, [gzip.compress(body)]) == BODY_NOT_SCANNED
    plain = ('{"echo": "' + SECRET + '"}').encode()
    assert run([scrub(ctx_for())], head_of(), [bytes([b]) for b in plain]) == (
        b'{"echo": "[REDACTED]****************"}'
    )


@pytest.mark.parametrize(
    ("status", "length"), [(304, None), (304, 120), (204, None), (200, 0)], ids=str
)
def test_a_bodiless_answer_is_neither_decoded_nor_refused(status: int, length: int | None) -> None:
    lines = (b"Content-Encoding: gzip", b"Content-Type: text/plain; charset=utf-16", b'ETag: "a"')
    head = head_of(*lines, status=status, length=length)
    assert run([BodyScrubFactory(SCRUBBER, 1 << 20)(ctx_for())], head, []) == b""
    assert not head.hold and head.lines == [line + b"\r\n" for line in lines]
