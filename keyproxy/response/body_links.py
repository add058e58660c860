"""The body links of the response chain: secret scrubbing, the cache tee, field filtering.

Each factory is built once per configuration snapshot (per route where the
route decides) and makes one small link per response; a factory returns None
when a request has nothing for it to do, so that work costs one call.

- `BodyScrubFactory`: every body is scanned for the upstream's secret and each
  occurrence replaced by a mask of the same byte length, so `Content-Length`
  stays true and the body streams in its own framing. The upstream is asked for
  identity; a body it compresses anyway is held, decoded
  under a cap, scanned and sent as the client accepts, and one that cannot be decoded is
  refused (502 BODY_NOT_SCANNED) rather than passed unscanned, as is a body in a
  charset the byte scan cannot read (declared, or UTF-16/32 told by its first bytes,
  `wide_text`). The request side
  (Accept-Encoding: identity, no Range on a filtered answer) is `ForwardPlan`'s.
- `CacheTeeFactory`: copies a storable 200 answer (already secret-free, not yet
  filtered for any key) into the cache store.
- `EvictFactory`: a successful write evicts the cached reads of its resource and
  collection.
- `FieldsFactory`: a key's `fields` applied to the whole body (held), re-encoded
  as the client accepts, or 502 FILTER_FAILED with nothing of the body sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING

from keyproxy.request import Deny, RequestContext
from keyproxy.response.body_scrub import WHOLE_UP_TO, BodyScrubber, ScrubStream
from keyproxy.response.cache import (
    CachedResponse,
    CacheKey,
    MemoryStore,
    RedisStore,
    cache_key,
    eviction_paths,
    open_store,
    storable,
)
from keyproxy.response.chain import LinkFactory, RefuseAnswer, ResponseHead
from keyproxy.response.codings import DecodeFailed, Decoder, choose_encoding, encode
from keyproxy.response.fields import (
    FILTER_FAILED,
    DocumentPath,
    FilterFailed,
    FilterLimits,
    FilterMemo,
    body_kind,
    filter_encoded,
)

if TYPE_CHECKING:
    from keyproxy.config.model import Config
    from keyproxy.config.response_sections import CacheSettings

BODY_NOT_SCANNED = Deny(
    502, "BODY_NOT_SCANNED", "the upstream's answer could not be checked for secrets"
)
#: Validators, digests and range headers that describe the upstream's bytes, not the
#: filtered ones: a digest of the unfiltered body would let a key try a hidden field's
#: values offline until one hashes to it (RFC 9530's names as well as the older ones).
_FILTER_DROPS = frozenset(
    (
        b"etag",
        b"accept-ranges",
        b"content-md5",
        b"digest",
        b"content-digest",
        b"repr-digest",
        b"content-range",
    )
)


def accept_encoding(ctx: RequestContext) -> str | None:
    """The client's Accept-Encoding, every copy of it (a list may be split over lines)."""
    values = ctx.headers.getall("accept-encoding")
    return ", ".join(values) if values else None


def content_coding(head: ResponseHead, block: bytes | None = None) -> bytes | None:
    """The answer's Content-Encoding, every line of it: `identity` then `gzip` on two
    lines is a gzip body, which the first line alone would let pass unscanned. The
    codings other than identity, comma-joined (more than one is refused by the decoder).
    One search of the joined head first (`block`: it lower-cased), as nearly every
    answer has none."""
    if block is None:
        block = b"".join(head.lines).lower()
    if b"content-encoding" not in block:
        return None
    codings = []
    for line in head.lines:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-encoding":
            codings += [c.strip() for c in value.split(b",")]
    return b", ".join(c for c in codings if c and c.lower() != b"identity") or None


#: Charsets that write ASCII text as ASCII bytes, so the secret (ASCII, as every header
#: value keyproxy injects) is in the body as the scan looks for it. In any other
#: (UTF-16, UTF-32, UTF-7, EBCDIC ...) each character becomes other bytes that no spelling
#: matches, and the client decodes them back: such an answer is not passed unscanned.
#: A client may ask for one (`Accept: text/plain;charset=UTF-16`: Spring MVC obliges).
_ASCII_CHARSET = re.compile(
    rb"utf-?8(?:-sig)?|(?:us-)?ascii|ansi_x3\.4-1968|iso[-_]?8859[-_]\d+|iso[-_]?646[-_a-z]*"
    rb"|latin-?\d+|l\d|(?:windows|cp|x-cp)-?12\d\d|windows-874|(?:cp|ibm)-?(?:437|8[5-6]\d|874)"
    rb"|koi8-[a-z]+|shift[-_]jis|x-sjis|sjis|ms_kanji|windows-31j|cp932|euc-[a-z]+"
    rb"|gb2312|gbk|gb18030|cp936|big5(?:-hkscs)?|cp950|tis-620|iso-2022-[-a-z0-9]+"
    rb"|mac(?:intosh|roman)?|x-mac-[a-z]+"
)
_CHARSET_PARAM = re.compile(rb';\s*charset\s*=\s*"?([^\s;",]*)')


def ascii_charset(block: bytes) -> bool:
    """Whether every Content-Type in `block` (the head's lines, lower-cased) names no
    charset or one that keeps ASCII as it is (`_ASCII_CHARSET`)."""
    if b"charset" not in block:
        return True  # nearly every answer: one search
    return all(
        not name or _ASCII_CHARSET.fullmatch(name) is not None
        for line in block.split(b"\r\n")
        if line.startswith(b"content-type:")
        for name in _CHARSET_PARAM.findall(line)
    )


#: Byte-order marks of UTF-16 and UTF-32 (UTF-32LE's begins with UTF-16LE's). A browser
#: decodes by the BOM before any charset the head declares (WHATWG Encoding, "decode").
_WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")
#: Text in UTF-16 or UTF-32 without a BOM, by its first four or two characters: ASCII with
#: NULs between (RFC 4627 §3, as Python's `json.loads(bytes)` and requests' `.json()` tell
#: JSON's encoding). Printable ASCII only, over 8 bytes, so binary formats that begin with
#: small integers (an MP4's `00 00 00 20 ftyp`) do not look like text.
_TEXT = rb"[\t\n\r\x20-\x7e]"
_WIDE_TEXT = re.compile(
    rb"(?:%s\x00){4}|(?:\x00%s){4}|(?:%s\x00\x00\x00){2}|(?:\x00\x00\x00%s){2}"
    % (_TEXT, _TEXT, _TEXT, _TEXT)
)
#: How many of a body's first bytes `wide_text` reads.
SNIFF_BYTES = 8


def wide_text(start: bytes) -> bool:
    """Whether a body beginning with `start` is UTF-16 or UTF-32 text: each character of
    the secret is there with NULs between its bytes, which the byte scan does not match
    and a client decodes back. The head's charset check cannot see it (no charset, or one
    a BOM overrides). Costs one `startswith` and one `find` in the first four bytes."""
    if start.startswith(_WIDE_BOMS):
        return True
    return start.find(b"\x00", 0, 4) >= 0 and _WIDE_TEXT.match(start) is not None


def vary_on_accept_encoding(head: ResponseHead) -> None:
    """An answer encoded as the client's Accept-Encoding chose says so to caches, or a
    shared cache could hand a gzip body to a client that cannot read it."""
    vary = head.get(b"vary")
    if vary is None:
        head.set(b"vary", b"Accept-Encoding")
    elif b"accept-encoding" not in vary.lower() and vary.strip() != b"*":
        head.set(b"vary", vary + b", Accept-Encoding")


# --------------------------------------------------------------------------- body scrub


class BodyScrubFactory:
    """The secret scanner of one snapshot; a link per response of a scanned route."""

    __slots__ = ("limit", "scrubber")

    def __init__(self, scrubber: BodyScrubber, limit: int) -> None:
        assert scrubber.same_length
        self.scrubber = scrubber
        self.limit = limit  # decoded bytes a compressed body may hold

    def __call__(self, ctx: RequestContext) -> ScrubLink | None:
        route = ctx.route
        if ctx.method == "HEAD" or (route is not None and not route.scrub_body):
            return None
        return ScrubLink(self.scrubber, self.limit, ctx)


class ScrubLink:
    __slots__ = (
        "coding", "ctx", "decoder", "failed", "limit", "parts", "scrubber", "start", "stream",
        "whole",
    )  # fmt: skip

    def __init__(self, scrubber: BodyScrubber, limit: int, ctx: RequestContext) -> None:
        self.scrubber = scrubber
        self.limit = limit
        self.ctx = ctx  # its Accept-Encoding is read only for a body that came compressed
        self.stream: ScrubStream | None = None
        #: The declared length of a small identity body not yet seen: one that arrives in
        #: one piece is scanned whole, without a stream (-1: none, or a stream took over).
        self.whole = -1
        self.decoder: Decoder | None = None
        self.failed = False
        self.coding: str | None = None
        #: An identity body's first bytes while fewer than `SNIFF_BYTES` have come (None:
        #: read, or a compressed body, read whole once decoded).
        self.start: bytes | None = None

    def on_head(self, head: ResponseHead) -> Deny | None:
        if head.status in (204, 304) or head.length == 0:
            # Nothing to scan: its charset or coding describes a body it does not have (a
            # 304 names the coding of the representation the client holds), and an empty
            # "gzip body" would fail to decode. Its head leaves as the upstream wrote it.
            return None
        block = b"".join(head.lines).lower()
        if not ascii_charset(block):
            return BODY_NOT_SCANNED
        coding = content_coding(head, block)
        if coding is None or coding.strip().lower() in (b"", b"identity"):
            self.start = b""
            length = head.length
            if length is not None and length <= WHOLE_UP_TO:
                self.whole = length  # most answers: a small body that comes in one read
            else:
                # The declared length lets the stream scan the last chunk to its end.
                self.stream = self.scrubber.stream(length)
            return None
        try:
            self.decoder = Decoder(coding.decode("latin-1"), self.limit)
        except DecodeFailed:
            return BODY_NOT_SCANNED
        self.parts: list[bytes] = []
        # Compressed despite being asked for identity: decoded whole, scanned, then
        # encoded again as the client accepts (identity when it names no coding).
        head.hold = True
        head.remove(b"content-encoding")
        head.remove(b"etag")
        self.coding = choose_encoding(accept_encoding(self.ctx))
        if self.coding is not None:
            head.set(b"content-encoding", self.coding.encode())
        vary_on_accept_encoding(head)  # re-encoded for this client's Accept-Encoding
        return None

    def on_body(self, chunk: bytes) -> bytes:
        if self.start is not None:
            self._sniff(chunk)
        stream = self.stream
        if stream is not None:
            return stream.feed(chunk)
        whole = self.whole
        if whole >= 0:
            self.whole = -1
            if len(chunk) == whole:  # the whole body at once: one scan, nothing held back
                return self.scrubber.scrub(chunk)
            stream = self.stream = self.scrubber.stream(whole)  # in pieces: streamed
            return stream.feed(chunk)
        decoder = self.decoder
        assert decoder is not None
        if not self.failed:
            try:
                self.parts.append(decoder.feed(chunk))
            except DecodeFailed:
                self.failed = True
                self.parts = []
        return b""

    def _sniff(self, chunk: bytes) -> None:
        """Refuse a wide body before any of it leaves (the first chunk is nearly always
        long enough; a shorter one is read with the next, the stream holding it back)."""
        start = self.start + chunk if self.start else chunk
        if wide_text(start):
            raise RefuseAnswer(BODY_NOT_SCANNED)
        self.start = start if len(start) < SNIFF_BYTES else None

    def on_end(self) -> bytes | Deny:
        stream = self.stream
        if stream is not None:
            return stream.end()
        decoder = self.decoder
        if decoder is None:
            return b""  # an identity body scanned whole, or none came
        if not self.failed:
            try:
                self.parts.append(decoder.end())
            except DecodeFailed:
                self.failed = True
        if self.failed:
            return BODY_NOT_SCANNED
        body, self.parts = b"".join(self.parts), []
        if wide_text(body):
            return BODY_NOT_SCANNED
        return encode(self.scrubber.scrub(body), self.coding)


# --------------------------------------------------------------------------- fields


class FieldsFactory:
    """Field filtering: the key says which fields, its route where documents sit.
    `scrubber`: the body scrubber, run again over the filter's output (`filter_encoded`).
    `memo`: this snapshot's filtered answers (a reload builds a new factory, so it starts
    empty), so a body served again byte for byte is filtered once per key's filter."""

    __slots__ = ("limits", "memo", "scrubber")

    def __init__(
        self,
        limits: FilterLimits,
        scrubber: BodyScrubber | None = None,
        memo: FilterMemo | None = None,
    ) -> None:
        self.limits = limits
        self.scrubber = scrubber
        self.memo = memo if memo is not None else FilterMemo()

    def __call__(self, ctx: RequestContext) -> FieldsLink | None:
        key = ctx.key
        if key is None or key.fields is None:
            return None
        route = ctx.route
        at = route.fields_at if route is not None else ()
        scrubber = self.scrubber
        clean = (
            scrubber.scrub if scrubber is not None and (route is None or route.scrub_body) else None
        )
        return FieldsLink(key.fields, at, self.limits, ctx, clean, self.memo)


def _edit_for_filtering(lines: list[bytes]) -> tuple[bytes | None, bytes | None]:
    """Drop the validators and range headers of the upstream's bytes from `lines`, and make
    the answer private, in one pass that also reads the first Content-Type and
    Content-Encoding.

    A filtered answer is this key's view: a shared cache in front of keyproxy (a CDN)
    must not hand it to another key, or to a caller with none, even when the upstream
    said `public`. So `public` and `s-maxage` go and `private` is added, to an existing
    `Cache-Control` or as one.
    """
    content_type = coding = None
    kept = []
    private = False
    for line in lines:
        colon = line.find(b":")
        if colon > 0:
            name = line[:colon].strip().lower()
            if name in _FILTER_DROPS:
                continue
            if name == b"content-type":
                if content_type is None:
                    content_type = line[colon + 1 :].strip()
            elif name == b"content-encoding" and coding is None:
                coding = line[colon + 1 :].strip()
            elif name == b"cache-control":
                line = _private(line[colon + 1 :])
                private = True
        kept.append(line)
    if not private:
        kept.append(b"Cache-Control: private\r\n")
    lines[:] = kept
    return content_type, coding


def _private(value: bytes) -> bytes:
    """A `Cache-Control` line for `value` that no shared cache may store."""
    directives = [d.strip() for d in value.split(b",")]
    kept = [
        d
        for d in directives
        if d and d.lower() != b"public" and not d.lower().startswith(b"s-maxage")
    ]
    if not any(d.lower() in (b"private", b"no-store") for d in kept):
        kept.append(b"private")
    return b"Cache-Control: " + b", ".join(kept) + b"\r\n"


class FieldsLink:
    """One filtered answer: held whole, filtered, then sent with its new length."""

    __slots__ = (
        "at",
        "clean",
        "coding",
        "content_type",
        "ctx",
        "drop",
        "flt",
        "head",
        "limits",
        "memo",
        "over",
        "parts",
        "received",
    )

    def __init__(
        self,
        flt: object,
        at: tuple[DocumentPath, ...],
        limits: FilterLimits,
        ctx: RequestContext,
        clean: Callable[[bytes], bytes] | None = None,
        memo: FilterMemo | None = None,
    ) -> None:
        self.flt = flt
        self.at = at
        self.clean = clean
        self.memo = memo  # None: every answer is filtered afresh
        self.limits = limits
        self.ctx = ctx  # its Accept-Encoding is read only for a body that came compressed
        self.parts: list[bytes] = []
        self.received = 0
        self.over = False
        self.drop = False  # a redirect: its body is not sent at all
        self.head: ResponseHead | None = None
        self.content_type: str | None = None
        self.coding: str | None = None

    def on_head(self, head: ResponseHead) -> Deny | None:
        content_type, coding = _edit_for_filtering(head.lines)
        if head.method == "HEAD" or head.status in (204, 304):
            # No body: but no length or validator that the GET's filtered body would not have.
            head.length = None
            return None
        if head.status == 206:
            return FILTER_FAILED  # a part of a document cannot be filtered
        if head.length == 0:
            return None
        if 300 <= head.status < 400:
            # A redirect's body is a note for humans ("Found. Redirecting to ..."), not a
            # document: it is dropped, so the redirect still works and nothing unfiltered
            # leaves.
            head.hold = True
            if coding is not None:
                head.remove(b"content-encoding")
            self.drop = True
            return None
        self.content_type = content_type.decode("latin-1") if content_type else None
        if body_kind(self.content_type) is None:
            return FILTER_FAILED  # not JSON: nothing here can be filtered
        if coding is not None:
            self.coding = coding.decode("latin-1")
        head.hold = True
        self.head = head
        return None

    def on_body(self, chunk: bytes) -> bytes:
        if self.drop:
            return b""
        if self.head is None:
            return chunk
        if not self.over:
            self.received += len(chunk)
            if self.received > self.limits.max_bytes:
                self.over = True
                self.parts = []
            else:
                self.parts.append(chunk)
        return b""

    def on_end(self) -> bytes | Deny:
        head = self.head
        if head is None or self.drop:
            return b""
        if self.over:
            return FILTER_FAILED
        parts, self.parts = self.parts, []
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        coding = self.coding
        try:
            # The whole body was received and counted above; the memo only spares the
            # filtering of bytes it has filtered before for the same filter and coding.
            filtered, out_coding = filter_encoded(
                body,
                self.content_type,
                coding,
                accept_encoding(self.ctx) if coding is not None else None,
                self.flt,  # type: ignore[arg-type]
                self.at,
                self.limits,
                self.clean,
                self.memo,
            )
        except FilterFailed:
            return FILTER_FAILED
        if coding is None:
            return filtered  # identity in, identity out: the head needs no other edit
        if out_coding is None:
            head.remove(b"content-encoding")
        else:
            head.set(b"content-encoding", out_coding.encode())
        vary_on_accept_encoding(head)
        return filtered


# --------------------------------------------------------------------------- cache

Store = MemoryStore | RedisStore


def split_lines(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    out = []
    for line in lines:
        name, _, value = line.partition(b":")
        out.append((name.strip(), value.strip()))
    return out


def join_lines(headers: tuple[tuple[bytes, bytes], ...]) -> list[bytes]:
    return [name + b": " + value + b"\r\n" for name, value in headers]


#: The response policy part of a cache key (`ResponseCache.key_for`).
SCANNED, UNSCANNED = "scanned", "unscanned"


class ResponseCache:
    """The `cache:` section at work: its store, which routes it serves, the metric.

    Built per snapshot; a reload that keeps the same settings keeps the store. A hit
    enters the chain after the body scrub, so an entry is keyed by whether its body was
    scanned (`scans_bodies`, set by `body_factories`): an answer stored while its route
    had `scrub_body: false` is never found once a reload turns scanning on, and expires
    by the ttl. Emptying the store on such a reload would not do: a Redis store is shared
    with replicas that may still run the old configuration and keep storing.
    """

    def __init__(
        self,
        settings: CacheSettings,
        store: Store,
        upstream_target: Callable[[RequestContext], str],
        count: Callable[[str], None],
        loop: asyncio.AbstractEventLoop | None = None,
        identity: Callable[[RequestContext], bytes] | None = None,
    ) -> None:
        self.identity = identity  # the identity headers sent upstream, when configured
        self.settings = settings
        self.store = store
        self.routes = frozenset(route.match for route in settings.routes)
        self.upstream_target = upstream_target
        self.count = count
        self.loop = loop
        self.max_entry_bytes = settings.max_entry_bytes
        self._tasks: set[asyncio.Task[object]] = set()
        #: Whether the snapshot scans bodies at all (a route may still opt out).
        self.scans_bodies = False

    def applies(self, ctx: RequestContext) -> bool:
        """A GET the upstream acts on as a GET: on a route allowing method overrides a GET
        may ask for DELETE, a write that must reach the upstream and never be stored."""
        route = ctx.route
        return (
            ctx.method == "GET"
            and ctx.effective_method in ("GET", "")
            and route is not None
            and route.match in self.routes
        )

    def key_for(self, ctx: RequestContext) -> CacheKey:
        """The forwarded request: method, upstream target (filters included) and the
        request headers an answer may vary on, and whether the body scrub runs for it;
        never a credential."""
        route = ctx.route
        scanned = self.scans_bodies and (route is None or route.scrub_body)
        key = cache_key(
            ctx.method, self.upstream_target(ctx), ctx.headers, SCANNED if scanned else UNSCANNED
        )
        identity = self.identity(ctx) if self.identity is not None else b""
        if identity:
            # Who calls is part of the forwarded request: the backend may answer by it.
            digest = hashlib.sha256(key.variant.encode() + b"\0" + identity).hexdigest()
            key = CacheKey(key.path, digest)
        return key

    def find(
        self, ctx: RequestContext
    ) -> CachedResponse | Coroutine[object, object, CachedResponse | None] | None:
        """After the decision: the stored answer, None (a miss: the request goes upstream
        and the tee may store its answer), or, for a store across the network, a
        coroutine that resolves to one of those. A store that fails is a miss."""
        key = self.key_for(ctx)
        store = self.store
        if isinstance(store, MemoryStore):
            return self._result(ctx, key, store.lookup(key))
        return self._remote(ctx, key)

    async def _remote(self, ctx: RequestContext, key: CacheKey) -> CachedResponse | None:
        try:
            entry = await self.store.get(key)
        except Exception:  # a Redis fault: go to the upstream
            entry = None
        return self._result(ctx, key, entry)

    def _result(
        self, ctx: RequestContext, key: CacheKey, entry: CachedResponse | None
    ) -> CachedResponse | None:
        if entry is None:
            ctx.cache_key = key  # the tee stores the upstream's answer under it
            self.count("miss")
            return None
        self.count("hit")
        return entry

    def _spawn(self, work: Coroutine[object, object, object]) -> None:
        loop = self.loop or asyncio.get_running_loop()
        task: asyncio.Task[object] = loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # a failed write is a miss next time, nothing more

    def store_later(self, key: CacheKey, entry: CachedResponse) -> None:
        async def put() -> None:
            if await self.store.put(key, entry):
                self.count("store")

        self._spawn(put())

    def evict_later(self, ctx: RequestContext) -> None:
        paths = eviction_paths(self.upstream_target(ctx))
        self._spawn(self.store.evict(paths))

    def __call__(self, ctx: RequestContext) -> CacheTee | Evict | None:
        """The chain's cache link: the tee for a looked-up miss, eviction for a write."""
        if ctx.cache_key is not None:
            return CacheTee(self, ctx.cache_key)
        if (ctx.effective_method or ctx.method) in ("GET", "HEAD", "OPTIONS"):
            return None  # a read (an override that asks for a write evicts like the write)
        return Evict(self, ctx)


class CacheStoreHolder:
    """The store `cache:` names, kept across reloads that leave its settings alone (so a
    reload does not empty the cache), replaced when they change, closed at shutdown."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.store: Store | None = None
        self._opened: tuple[object, ...] | None = None

    def update(self, config: Config) -> Store | None:
        settings = config.cache
        wanted = (
            None
            if settings is None
            else (
                settings.backend,
                settings.ttl,
                settings.max_entries,
                settings.max_bytes,
                settings.max_entry_bytes,
            )
        )
        if wanted != self._opened:
            previous = self.store
            self.store = None
            if settings is not None:
                self.store = open_store(
                    settings.backend,
                    settings.ttl,
                    settings.max_entries,
                    settings.max_bytes,
                    settings.max_entry_bytes,
                )
            self._opened = wanted
            if previous is not None:
                self.loop.create_task(previous.aclose())
        return self.store

    async def aclose(self) -> None:
        if self.store is not None:
            await self.store.aclose()
            self.store = None


class CacheTee:
    """Copies a storable answer into the store as it passes, bounded by `max_entry_bytes`."""

    __slots__ = ("cache", "head", "key", "parts", "size")

    def __init__(self, cache: ResponseCache, key: CacheKey) -> None:
        self.cache = cache
        self.key = key
        self.parts: list[bytes] | None = None
        self.size = 0
        self.head: ResponseHead | None = None

    def on_head(self, head: ResponseHead) -> Deny | None:
        if head.method == "GET" and storable(head.status, split_lines(head.lines)):
            self.parts = []
            self.head = head
            # Copied now: later links edit the head for one key only.
            self.head = ResponseHead(head.status, list(head.lines), head.length, head.method)
        else:
            self.cache.count("bypass")
        return None

    def on_body(self, chunk: bytes) -> bytes:
        parts = self.parts
        if parts is not None:
            self.size += len(chunk)
            if self.size > self.cache.max_entry_bytes:
                self.parts = None
            else:
                parts.append(chunk)
        return chunk

    def on_end(self) -> bytes | Deny:
        parts, head = self.parts, self.head
        if parts is not None and head is not None:
            import time

            entry = CachedResponse(
                head.status, tuple(split_lines(head.lines)), b"".join(parts), time.time()
            )
            self.cache.store_later(self.key, entry)
        return b""


class Evict:
    """A write that succeeded makes the cached reads of its resource and collection stale."""

    __slots__ = ("cache", "ctx")

    def __init__(self, cache: ResponseCache, ctx: RequestContext) -> None:
        self.cache = cache
        self.ctx = ctx

    def on_head(self, head: ResponseHead) -> Deny | None:
        if 200 <= head.status < 400:
            self.cache.evict_later(self.ctx)
        return None

    def on_body(self, chunk: bytes) -> bytes:
        return chunk

    def on_end(self) -> bytes | Deny:
        return b""


# --------------------------------------------------------------------------- the chain


def body_factories(
    config: Config,
    cache: ResponseCache | None,
    count_memo: Callable[[str], None] | None = None,
) -> list[LinkFactory]:
    """The body links of a snapshot, in chain order: scrub → cache → fields.

    The cache sits after the scrub (no secret is ever stored) and before the
    fields filter (an entry is shared by keys and filtered for each on the way out).
    """
    factories: list[LinkFactory] = []
    up = config.upstream
    limits = FilterLimits(config.server.filter_max_body, config.server.filter_max_depth)
    scrubber = BodyScrubber(up.secrets, up.inject_basic, same_length=True)
    scanning = bool(scrubber) and any(route.scrub_body for route in config.routes)
    if scanning:
        factories.append(BodyScrubFactory(scrubber, limits.max_bytes))
    if cache is not None:
        cache.scans_bodies = scanning  # its entries are keyed by what ran before them
        factories.append(cache)
    if config.any_key_fields:
        memo = FilterMemo(count=count_memo) if count_memo is not None else None
        factories.append(FieldsFactory(limits, scrubber if scanning else None, memo))
    return factories
