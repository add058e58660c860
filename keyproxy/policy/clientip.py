"""The client's address: the socket peer, or what the proxies keyproxy trusts say.

`X-Forwarded-For` and `Forwarded` are written by whoever sends the request, so
they mean something only when the socket peer is one of the proxies listed in
`server.trusted_proxies` (addresses or CIDRs, as nginx's `set_real_ip_from`
with `real_ip_recursive on`). Then the chain is walked from the right, hop by
hop, skipping the addresses of trusted proxies: the first address that is not
one of them is the client, and everything further left is the client's own
claim. A client that reaches keyproxy directly is never a trusted proxy, so
whatever it writes in these headers is not even parsed.

A hop count (the former `trusted_proxies: N`) cannot tell a proxy's request
from a direct client's, which is why the loader refuses one.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import TYPE_CHECKING

from keyproxy.request import Deny, Headers, IPAddress

if TYPE_CHECKING:
    from keyproxy.policy.allowlists import IpAllowlist

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


def peer_is_trusted(peer: str, trusted_proxies: IpAllowlist | None) -> bool:
    """Whether the socket peer is a proxy whose forwarding headers keyproxy believes."""
    if trusted_proxies is None:
        return False
    try:
        return trusted_proxies.contains(parse_peer(peer))
    except ValueError:
        return False


def client_ip(peer: str, headers: Headers, trusted_proxies: IpAllowlist | None) -> IPAddress | Deny:
    """The address IP allowlists and rate limits apply to.

    Only when the socket peer is a trusted proxy are `X-Forwarded-For` and
    `Forwarded` read; each trusted proxy appended the address it received
    from, so walking from the right past trusted addresses reaches the first
    hop no trusted proxy vouches for beyond: the client. When every hop is a
    trusted proxy, the leftmost is the client (as nginx decides).
    When both headers are present they must tell the same story, or the
    request is refused rather than one of them believed.
    ValueError if the peer itself is not an address (a deployment error).
    """
    peer_ip = parse_peer(peer)
    if trusted_proxies is None or not trusted_proxies.contains(peer_ip):
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
    for hop in reversed(chain):
        if not trusted_proxies.contains(hop):
            return hop
    return chain[0]
