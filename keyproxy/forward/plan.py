"""The upstream request: where it goes, what secret and identity it carries.

What is rewritten, and why, is decided once per configuration snapshot in
`ForwardPlan`, so the per-request work is a loop over the headers. The plan also
holds the response chain built for the snapshot (`keyproxy.response.chain`).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable
from typing import Protocol
from urllib.parse import quote

from keyproxy.config.model import Config
from keyproxy.policy.clientip import peer_is_trusted
from keyproxy.policy.credentials import upstream_query
from keyproxy.policy.headers import DROPPED_PREFIXES, METHOD_OVERRIDE, REQUEST_DROP
from keyproxy.policy.permissions import identity_pairs
from keyproxy.request import RequestContext
from keyproxy.response.body_links import (
    BodyScrubFactory,
    ResponseCache,
    Store,
    body_factories,
)
from keyproxy.response.chain import Chain
from keyproxy.response.headers import OriginRewriter, SecretScrubber
from keyproxy.response.links import build_chain

#: Request headers dropped when the answer's body will be scanned or filtered: the
#: upstream is asked for identity (`Accept-Encoding: identity` is sent instead), and
#: never for a range of bytes: a scan sees one answer at a time, so two ranges each
#: holding half of the secret would each pass clean and be joined by the client (and a
#: filtered answer is filtered whole). `Request-Range` is Range's older spelling.
SCAN_DROP = frozenset({b"accept-encoding", b"range", b"if-range", b"request-range"})
#: A filtered answer never carries the upstream's ETag (it names the unfiltered bytes),
#: so a key with `fields` has no entity tag of its own to send: its `If-None-Match` or
#: `If-Match` could only be a list of guessed tags of unfiltered bodies, and the
#: upstream's 304 or 412 would tell which guess (which value of a hidden field) is right.
FILTER_DROP = SCAN_DROP | {b"if-none-match", b"if-match"}
IDENTITY_LINE = b"Accept-Encoding: identity\r\n"
#: Dropped from a self-only write, which carries keyproxy's own If-Match (the record's
#: ETag at the owner check): a client's `If-Match: *` would otherwise match any record.
IF_MATCH = frozenset({b"if-match"})
#: Heads kept per snapshot (`ForwardPlan.heads`), as many as the decision memo keeps.
MAX_HEADS = 4096


class ClientRequest(Protocol):
    """What the plan reads of the client's request to write the upstream head."""

    raw_headers: list[tuple[bytes, bytes]]
    connection_tokens: frozenset[bytes]
    request_id: str
    chunked: bool
    content_length: int | None
    #: The decision memo's key for this request (`keyproxy.checks.memo`), or None.
    memo_key: tuple[object, ...] | None
    varying: bool  # a header the memo key leaves out was sent


#: RFC 3986 host[:port] as a Host header may carry it: a reg-name restricted to the
#: characters DNS names and IPv4 addresses use (no sub-delims, no percent-escapes:
#: no resolvable name has them, and a `,` would read as a list downstream), or an
#: IPv6 literal in brackets; an optional port of digits.
_HOST_HEADER = re.compile(
    rb"(?:([A-Za-z0-9._~-]{1,253})|\[([0-9A-Fa-f:.]{2,45})\])(?::([0-9]{1,5}))?"
)


@functools.lru_cache(maxsize=1024)
def valid_host(value: bytes) -> bool:
    """Whether a client's Host is a plain host[:port], fit to pass on as X-Forwarded-Host.

    Upstream frameworks build absolute URLs (redirects, password-reset links)
    from X-Forwarded-Host, so anything else is dropped rather than passed on.
    """
    match = _HOST_HEADER.fullmatch(value)
    if match is None:
        return False
    name, v6, port = match.groups()
    if port is not None and int(port) > 65535:
        return False
    if name is not None:
        return not name.startswith(b".") and b".." not in name
    try:
        ipaddress.IPv6Address(v6.decode("ascii"))
    except ValueError:
        return False
    return True


class ForwardPlan:
    """Everything about forwarding that depends only on the configuration."""

    def __init__(
        self,
        config: Config,
        cache_store: Store | None = None,
        count: Callable[[str], None] | None = None,
        count_memo: Callable[[str], None] | None = None,
    ) -> None:
        """`count`: the response cache's lookups by result; `count_memo`: the field
        filter's memo of answers by result (both `keyproxy.observe.Metrics` methods)."""
        up = config.upstream
        self.base_path = up.base_path
        self.max_body = config.server.max_body
        self.timeout = up.timeout
        self.trusted_proxies = config.server.trusted_proxies
        self.query_param = config.server.query_param
        self.host_line = b"Host: " + up.host_header.encode("idna") + b"\r\n"
        injected = [f"{n}: {v}\r\n".encode() for n, v in up.inject_headers]
        if up.inject_basic is not None:
            import base64

            pair = f"{up.inject_basic[0]}:{up.inject_basic[1]}".encode()
            injected.append(b"Authorization: Basic " + base64.b64encode(pair) + b"\r\n")
        self.inject_block = b"".join(injected)
        self.request_drop = REQUEST_DROP | {n.lower().encode() for n, _ in up.inject_headers}
        # Identity headers are keyproxy's word: a client's copy is dropped in any case.
        self.identity_headers = up.identity_headers
        self.request_drop |= {n.lower().encode() for _, n in up.identity_headers}
        self.request_drop_no_override = self.request_drop | METHOD_OVERRIDE
        self.inject_query = "&".join(
            f"{quote(n, safe='')}={quote(v, safe='')}" for n, v in up.inject_query
        )
        self.inject_query_names = tuple(n for n, _ in up.inject_query)
        self.origin = OriginRewriter(up.scheme, up.host, up.port, up.base_path)
        self.scrubber = SecretScrubber(up.secrets, up.inject_basic, self.origin)
        #: The response cache of this snapshot (its store outlives reloads); None: off.
        self.cache: ResponseCache | None = None
        if config.cache is not None and cache_store is not None:
            names = up.identity_headers
            self.cache = ResponseCache(
                config.cache,
                cache_store,
                self.upstream_target,
                count or (lambda result: None),
                identity=(lambda ctx: identity_block(ctx, names)) if names else None,
            )
        body = body_factories(config, self.cache, count_memo)
        #: Whether answers are scanned for the secret (some route keeps scrub_body on).
        self.scans_bodies = any(isinstance(f, BodyScrubFactory) for f in body)
        #: Request headers dropped, by (method override allowed, body work): see SCAN_DROP.
        self.drops = {
            (override, work): base | extra
            for override, base in (
                (True, self.request_drop),
                (False, self.request_drop_no_override),
            )
            for work, extra in (("scan", SCAN_DROP), ("filter", FILTER_DROP))
        }
        self.chain: Chain = build_chain(config, self.scrubber, body)
        #: Where a cache hit enters the chain: the link after the cache's.
        self.cache_start = self.chain.index(self.cache) + 1 if self.cache is not None else 0
        #: Upstream heads of repeated requests, split around the request id, by the
        #: decision memo's key (see `request_head`).
        self.heads: dict[tuple[object, ...], tuple[bytes, bytes]] = {}

    def peer_is_trusted(self, peer: str) -> bool:
        """Whether this peer's X-Forwarded-For/-Proto are kept (the client address's rule)."""
        return peer_is_trusted(peer, self.trusted_proxies)

    def upstream_target(self, ctx: RequestContext) -> str:
        target = ctx.target
        assert target is not None
        query = upstream_query(
            target.query,
            ctx.credential_source == "query",
            self.query_param,
            self.inject_query_names,
            self.inject_query,
            ctx.owner_filter,
        )
        path = self.base_path + target.path
        return f"{path}?{query}" if query else path

    def rewrite_location(self, value: bytes) -> bytes:
        """Redirects to the upstream's origin become relative ones through the proxy.

        Every spelling a browser reads as that origin (scheme-relative `//host`,
        `/\\host`, the default port written out ...), and never into `//host/...`
        or `/\\host/...`, which browsers read as another origin (see `OriginRewriter`).
        """
        return self.origin.rewrite_location(value)

    def request_head(self, ctx: RequestContext, request: ClientRequest) -> bytes:
        """The head sent upstream (see `build_head`). A request the decision memo knows,
        sent again with the very same headers, gets the head built the first time with
        its own request id: the head is a function of the memo key and the verdict, which
        the memo holds equal (header names may differ in letter case, which HTTP ignores).
        Measured on the benchmark's full policy: ~8 µs of ~85 per request saved."""
        key = request.memo_key
        if key is None or request.varying or ctx.owner_etag is not None:
            before, after = self.build_head(ctx, request)
            return before + request.request_id.encode() + after
        known = self.heads.get(key)
        if known is None:
            known = self.build_head(ctx, request)
            heads = self.heads
            if len(heads) >= MAX_HEADS:
                heads.clear()
            heads[key] = known
        return known[0] + request.request_id.encode() + known[1]

    def build_head(self, ctx: RequestContext, request: ClientRequest) -> tuple[bytes, bytes]:
        """The head sent upstream: the client's headers minus what could speak for
        keyproxy or widen access, then the forwarding headers, the request id, the
        identity headers and the injected secret; framing as the client sent it."""
        plan = self
        route = ctx.route
        drop = (
            plan.request_drop
            if route is not None and route.allow_method_override
            else plan.request_drop_no_override
        )
        key = ctx.key
        work = (
            "filter"
            if key is not None and key.fields is not None
            else "scan"
            if self.scans_bodies and route is not None and route.scrub_body
            else None
        )
        if work is not None:
            drop = self.drops[drop is plan.request_drop, work]
        etag = ctx.owner_etag
        if etag is not None:  # a self-only write: only keyproxy's If-Match goes upstream
            drop = drop | IF_MATCH
        tokens = request.connection_tokens
        parts = [f"{ctx.method} {plan.upstream_target(ctx)} HTTP/1.1\r\n".encode(), plan.host_line]
        append = parts.append
        host = b""
        prior_xff: list[bytes] = []
        proto = b"http"
        trusted = plan.trusted_proxies is not None and plan.peer_is_trusted(ctx.peer_ip)
        for name, value in request.raw_headers:
            lname = name.lower()
            if lname in drop or lname in tokens or lname.startswith(DROPPED_PREFIXES):
                if lname == b"host":
                    host = value
                elif trusted:
                    if lname == b"x-forwarded-for":
                        prior_xff.append(value)
                    elif lname == b"x-forwarded-proto" and value.lower() in (b"http", b"https"):
                        proto = value.lower()
                continue
            append(name + b": " + value + b"\r\n")
        peer = ctx.peer_ip.encode()
        xff = b", ".join([*prior_xff, peer]) if prior_xff else peer
        append(b"X-Forwarded-For: " + xff + b"\r\nX-Forwarded-Proto: " + proto + b"\r\n")
        if host and valid_host(host):
            append(b"X-Forwarded-Host: " + host + b"\r\n")
        append(b"X-Request-Id: ")
        split = len(parts)  # the request id goes here
        append(b"\r\n")
        if plan.identity_headers:
            append(identity_block(ctx, plan.identity_headers))
        append(plan.inject_block)
        if etag is not None:
            append(b"If-Match: " + etag + b"\r\n")
        if work is not None:
            append(IDENTITY_LINE)
        if request.chunked:
            append(b"Transfer-Encoding: chunked\r\n\r\n")
        elif request.content_length is not None:
            append(b"Content-Length: %d\r\n\r\n" % request.content_length)
        else:
            append(b"\r\n")
        return b"".join(parts[:split]), b"".join(parts[split:])


def identity_block(ctx: RequestContext, names: tuple[tuple[str, str], ...]) -> bytes:
    """`upstream.identity_headers` as request head lines."""
    return "".join(f"{name}: {value}\r\n" for name, value in identity_pairs(ctx, names)).encode()
