"""Refusals keyproxy makes on its own, outside the checks: while parsing, at the
connection limits, and when the upstream fails.

Named here, once, so the server, the forwarder and `keyproxy explain` give the same
answer for the same head (`head_refusal` is the pure form of the parse-time rules).
"""

from __future__ import annotations

from collections.abc import Iterable

from keyproxy.request import Deny

BAD_REQUEST = Deny(400, "BAD_REQUEST", "the request is not valid HTTP/1.1")
HEADERS_TOO_LARGE = Deny(431, "HEADERS_TOO_LARGE", "the request headers are too large")
REQUEST_TIMEOUT = Deny(408, "REQUEST_TIMEOUT", "the request was not received in time")
UPGRADE_NOT_ALLOWED = Deny(
    400, "UPGRADE_NOT_ALLOWED", "protocol upgrades (Upgrade, CONNECT) are not allowed"
)
EXPECTATION_FAILED = Deny(417, "EXPECTATION_FAILED", "only 'Expect: 100-continue' is supported")
HOST_REQUIRED = Deny(400, "BAD_REQUEST", "HTTP/1.1 requests need exactly one Host header")
#: gzip and friends would be forwarded undeclared once the chunking is undone; only
#: plain chunked framing crosses the proxy (as nginx asks). Same answer as BAD_REQUEST.
TRANSFER_CODING_REFUSED = BAD_REQUEST
CHUNKS_TOO_SMALL = Deny(
    400, "CHUNKS_TOO_SMALL", "the chunked request body is cut into too many tiny chunks"
)
TOO_MANY_CONNECTIONS = Deny(
    503, "TOO_MANY_CONNECTIONS", "keyproxy has too many open connections; retry shortly"
)
INTERNAL_ERROR = Deny(500, "INTERNAL_ERROR", "keyproxy failed on this request")
ROUTE_BUSY = Deny(
    503,
    "ROUTE_BUSY",
    "too many requests to this route are in progress; retry shortly",
    (("Retry-After", "1"),),
)
UPSTREAM_UNAVAILABLE = Deny(502, "UPSTREAM_UNAVAILABLE", "the upstream service is unavailable")
UPSTREAM_TIMEOUT = Deny(504, "UPSTREAM_TIMEOUT", "the upstream service did not answer in time")


def payload_too_large(limit: int) -> Deny:
    return Deny(413, "PAYLOAD_TOO_LARGE", f"the request body exceeds the limit of {limit} bytes")


def head_refusal(headers: Iterable[tuple[str, str]], http11: bool = True) -> Deny | None:
    """The parse-time refusal for a request head (lower-case names), or None.

    The live parser applies the same rules one header at a time as they arrive
    (`ClientConnection.on_header`); this is the whole-head form `explain` runs.
    Headers whose name holds `_` are ignored by both, as if never sent.
    """
    hosts = 0
    chunked = False
    expect: str | None = None
    upgrade = connection_upgrade = False
    for name, value in headers:
        if "_" in name:
            continue
        if name == "transfer-encoding":
            if chunked or value.strip().lower() != "chunked":
                return TRANSFER_CODING_REFUSED
            chunked = True
        elif name == "host":
            hosts += 1
        elif name == "expect":
            expect = value.lower()
        elif name == "upgrade":
            upgrade = True
        elif name == "connection":
            connection_upgrade |= "upgrade" in (t.strip().lower() for t in value.split(","))
    if upgrade and connection_upgrade:  # what llhttp reports as an upgrade
        return UPGRADE_NOT_ALLOWED
    if hosts > 1 or (http11 and hosts == 0):
        return HOST_REQUIRED
    if expect is not None and expect != "100-continue":
        return EXPECTATION_FAILED
    return None
