"""The client's address: the socket peer, or what a known number of trusted proxies say.

`X-Forwarded-For` and `Forwarded` are written by whoever sends the request, so
only the entries appended by the proxies keyproxy was told to trust
(`server.trusted_proxies`) mean anything: with N trusted proxies the client is
the Nth address from the right, and everything further left is the client's own
claim. With N = 0 the headers are not even parsed, so no spoofed header can
change the address that IP allowlists and rate limits see.
"""

from __future__ import annotations

import functools
import ipaddress

from keyproxy.request import Deny, Headers, IPAddress

#: More hops than any real chain of proxies; a bound keeps a hostile header cheap to refuse.
MAX_FORWARDED_ENTRIES = 64

#: RFC 7230 tchar: what a Forwarded parameter name is made of.
_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ZONE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class _Invalid(Exception):
    """An unparsable forwarding header; turned into a Deny at the single public entry."""


def _unmap(ip: IPAddress) -> IPAddress:
    """A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; they are IPv4 clients."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _address(text: str) -> IPAddress:
    """A bare address, with an IPv6 zone id (`%eth0`) dropped; ValueError otherwise."""
    if "%" in text:
        text, _, zone = text.partition("%")
        if ":" not in text or not zone or not set(zone) <= _ZONE_CHARS:
            raise ValueError("invalid zone id")
    return _unmap(ipaddress.ip_address(text))


@functools.lru_cache(maxsize=4096)
def parse_peer(peer: str) -> IPAddress:
    """The socket peer as an address (ValueError if it is none, e.g. a Unix socket)."""
    if peer.startswith("[") and peer.endswith("]"):
        peer = peer[1:-1]
    return _address(peer)


@functools.lru_cache(maxsize=4096)  # one object per client, as for peers (see parse_peer)
def _node(text: str) -> IPAddress:
    """One hop as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]:443`.

    "unknown" and RFC 7239 obfuscated identifiers (`_hidden`) name no address, so
    they cannot be checked against an allowlist or counted by a rate limit:
    they are refused, not skipped, because skipping would shift which entry
    counts as the client.
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise _Invalid
        host, rest = text[1:close], text[close + 1 :]
        if rest and not (rest.startswith(":") and _is_port(rest[1:])):
            raise _Invalid
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not _is_port(port):
            raise _Invalid
    else:
        host = text  # IPv4 without a port, or IPv6 without brackets (and so without a port)
    try:
        return _address(host)
    except ValueError:
        raise _Invalid from None


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535


def _x_forwarded_for(lines: list[str]) -> list[IPAddress]:
    """All lines joined by commas, as a proxy that merges repeated headers would."""
    entries = [entry.strip(" \t") for entry in ",".join(lines).split(",")]
    entries = [entry for entry in entries if entry]  # empty list elements count for nothing
    if len(entries) > MAX_FORWARDED_ENTRIES:
        raise _Invalid
    return [_node(entry) for entry in entries]


def _forwarded(lines: list[str]) -> list[IPAddress]:
    """The `for=` of every element of RFC 7239 `Forwarded`, left to right.

    A small tokenizer rather than splitting on `,` and `;`, because a quoted
    value may contain both. Every element must carry exactly one `for`: an
    element without one would make a proxy's hop invisible and shift the count.
    """
    text = ",".join(lines)
    fors: list[IPAddress] = []
    pairs: dict[str, str] = {}
    i, n = 0, len(text)

    def finish() -> None:
        if not pairs:
            return  # an empty list element
        if "for" not in pairs or len(fors) >= MAX_FORWARDED_ENTRIES:
            raise _Invalid
        fors.append(_node(pairs["for"]))
        pairs.clear()

    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            finish()
            return fors
        if text[i] == ",":
            finish()
            i += 1
            continue
        if text[i] == ";":
            i += 1
            continue
        start = i
        while i < n and text[i] in _TCHARS:
            i += 1
        name = text[start:i].lower()
        if not name or i >= n or text[i] != "=" or name in pairs:
            raise _Invalid
        i += 1
        if i < n and text[i] == '"':
            i += 1
            value = []
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                    if i >= n:
                        raise _Invalid
                value.append(text[i])
                i += 1
            if i >= n:
                raise _Invalid  # unterminated quoted string
            i += 1
            pairs[name] = "".join(value)
        else:
            # RFC 7239 wants IPv6 quoted; nginx-style `for=2001:db8::1` is unambiguous
            # all the same (no `,`, `;` or `"` in an address), so it is read too.
            start = i
            while i < n and text[i] not in ',;" \t':
                i += 1
            if start == i:
                raise _Invalid
            pairs[name] = text[start:i]
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] not in ",;":
            raise _Invalid


def client_ip(peer: str, headers: Headers, trusted_proxies: int) -> IPAddress | Deny:
    """The address IP allowlists and rate limits apply to.

    With N trusted proxies, the last one is the socket peer and each appended
    the address it received from, so the Nth entry from the right was written
    by a trusted proxy about the client. A shorter list means fewer hops than
    configured; its leftmost entry was still written by a trusted proxy.
    When both headers are present they must tell the same story, or the
    request is refused rather than one of them believed.
    ValueError if the peer itself is not an address (a deployment error).
    """
    peer_ip = parse_peer(peer)
    if trusted_proxies <= 0:
        return peer_ip
    xff_lines = headers.getall("x-forwarded-for")
    forwarded_lines = headers.getall("forwarded")
    try:
        xff = _x_forwarded_for(xff_lines) if xff_lines else None
    except _Invalid:
        return Deny(
            400,
            "INVALID_FORWARDED_FOR",
            "X-Forwarded-For must be a comma-separated list of IP addresses "
            f"(at most {MAX_FORWARDED_ENTRIES}; 'unknown' and obfuscated names are not accepted)",
        )
    try:
        forwarded = _forwarded(forwarded_lines) if forwarded_lines else None
    except _Invalid:
        return Deny(
            400,
            "INVALID_FORWARDED_FOR",
            "Forwarded must be RFC 7239 elements each with one for=<IP address> "
            f"(at most {MAX_FORWARDED_ENTRIES}; 'unknown' and obfuscated names are not accepted)",
        )
    if xff is not None and forwarded is not None and xff != forwarded:
        return Deny(
            400,
            "INVALID_FORWARDED_FOR",
            "X-Forwarded-For and Forwarded name different addresses: send one of them",
        )
    chain = xff if xff is not None else forwarded
    if not chain:
        return peer_ip
    return chain[-trusted_proxies] if len(chain) >= trusted_proxies else chain[0]
