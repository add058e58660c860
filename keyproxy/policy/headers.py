"""Every set of header names keyproxy treats specially, in one place.

Which request headers never cross to the upstream, which response headers never
cross back, and which ones could make a backend act on another method, URL or
client address than the one authorised: a reviewer reads them here instead of
collecting them from the parser, the forwarder and the checks.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Hop-by-hop headers (RFC 9110 §7.6.1) and framing headers: never copied across the proxy.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"content-length",
    }
)

#: Where a client's key travels: never passed on (the upstream gets its own secret).
CREDENTIAL_HEADERS = frozenset({b"x-api-key", b"authorization"})

#: Headers that ask the upstream to treat the request as another method than the one
#: authorised (kept only on routes with `allow_method_override`).
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-method-override", "x-http-method")
#: Headers that ask the upstream to serve another URL than the one authorised.
URL_OVERRIDE_HEADERS = ("x-original-url", "x-rewrite-url")
METHOD_OVERRIDE = frozenset(name.encode() for name in METHOD_OVERRIDE_HEADERS)

#: Headers frameworks read for the client's address, the scheme or the original URL.
#: Every `X-Forwarded-*` counts as well (see `FORWARDED_PREFIX`).
CLIENT_ADDRESS_HEADERS = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"x-client-ip",
        b"client-ip",
        b"true-client-ip",
        b"x-cluster-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-original-uri",
    }
)
#: X-Forwarded-For, -Proto, -Host, -Port, -Ssl, -Scheme, -Uri ...: frameworks trust
#: each of them for the client address, the scheme or the path.
FORWARDED_PREFIX = b"x-forwarded-"

#: keyproxy's own identity headers (`upstream.identity_headers`' usual names): every
#: `X-Keyproxy-*` a client sends is dropped, configured or not, so a backend reading
#: one can only ever see keyproxy's word.
IDENTITY_PREFIX = b"x-keyproxy-"
IDENTITY_HEADERS = frozenset({b"x-keyproxy-key-id", b"x-keyproxy-user", b"x-keyproxy-roles"})
#: Client header names dropped by prefix.
DROPPED_PREFIXES = (FORWARDED_PREFIX, IDENTITY_PREFIX)

#: Request headers that could speak for keyproxy or change what was authorised.
#: Names holding `_` never get this far (see `ClientConnection.on_header`).
REQUEST_DROP = (
    HOP_BY_HOP
    | CREDENTIAL_HEADERS
    | CLIENT_ADDRESS_HEADERS
    | IDENTITY_HEADERS
    | {b"host", b"expect", b"x-request-id"}
    | {name.encode() for name in URL_OVERRIDE_HEADERS}
)

#: Client headers the owner read of a self-only request (`OwnershipCheck`) never
#: carries: those the request never carries upstream either (credentials, hop-by-hop,
#: forwarding, identity, overrides: a method override would turn the read into the
#: write), and those that would make the read answer something else than the record as
#: JSON (conditionals, ranges, codings, a body's type). The rest it carries, as the
#: request does: a backend may pick the record by one (a tenant, a schema).
OWNER_READ_DROP = frozenset(
    {name.decode() for name in REQUEST_DROP | METHOD_OVERRIDE}
    | {
        "accept",
        "accept-encoding",
        "content-type",
        "content-encoding",
        "range",
        "if-range",
        "request-range",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
    }
)
_DROPPED_PREFIXES_TEXT = tuple(prefix.decode() for prefix in DROPPED_PREFIXES)


def owner_read_headers(
    headers: Iterable[tuple[str, str]], also_drop: Iterable[str]
) -> dict[str, str]:
    """The client's headers (lower-cased names) that an owner read carries: all but
    `OWNER_READ_DROP`, `also_drop` (the upstream's injected and identity header
    names), forwarding and identity prefixes, and what `Connection` lists. Off the
    hot path: one per self-only read, update or delete, beside an upstream round trip."""
    pairs = list(headers)
    drop = OWNER_READ_DROP | {name.lower() for name in also_drop}
    drop |= {
        token.strip(" \t")
        for name, value in pairs
        if name == "connection"
        for token in value.lower().split(",")
    }
    kept: dict[str, str] = {}
    for name, value in pairs:
        if name in drop or name.startswith(_DROPPED_PREFIXES_TEXT):
            continue
        # Repeated names are joined as HTTP allows (RFC 9110 §5.3).
        kept[name] = f"{kept[name]}, {value}" if name in kept else value
    return kept


#: The upstream's limits count keyproxy's one secret, shared by every client: they
#: say nothing about the client's own, and would sit beside keyproxy's headers.
UPSTREAM_LIMIT_HEADERS = frozenset(
    {
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
        b"x-ratelimit-reset",
        b"x-quota-limit",
        b"x-quota-remaining",
    }
)
#: Response headers never copied as they are: hop-by-hop and framing (keyproxy frames
#: the answer itself), X-Request-Id (keyproxy sets its own) and the upstream's limits.
RESPONSE_DROP = HOP_BY_HOP | UPSTREAM_LIMIT_HEADERS | {b"x-request-id"}

#: Header names `upstream.inject.headers` and `identity_headers` may not use: framing,
#: hop-by-hop, keyproxy's own, and the overrides (an injected one would turn every
#: request into another method or URL).
INJECT_REFUSED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "forwarded",
        "x-request-id",
        "expect",
        # Override headers: an injected one would turn every request into another method or URL.
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
    }
)
INJECT_REFUSED_PREFIXES = ("proxy-", "x-forwarded-")

#: Request headers that vary per request and that no check reads: the decision memo
#: (`keyproxy.checks.memo`) leaves them out of its key, so a traced client's repeats
#: still count as repeats. A test holds that no check names one of them.
MEMO_IGNORED_HEADERS = frozenset(
    {
        "content-length",
        "traceparent",
        "tracestate",
        "baggage",
        "x-request-id",
        "x-correlation-id",
        "x-amzn-trace-id",
        "x-cloud-trace-context",
        "sentry-trace",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
        "if-none-match",
        "if-modified-since",
    }
)
MEMO_IGNORED_HEADER_BYTES = frozenset(name.encode() for name in MEMO_IGNORED_HEADERS)
