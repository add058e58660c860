"""Referer patterns and IP allowlists: a key's constraints on where it may be used from.

Both are parsed once, when the configuration loads, into forms that answer a
request cheaply: referer patterns into pieces matched with `str.find` (linear
time, no regular expression built from configuration text, so no pattern can
backtrack), IP allowlists into sorted integer ranges searched by bisection.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from keyproxy.request import IPAddress

MAX_PATTERN_LENGTH = 1024
MAX_REFERER_LENGTH = 4096
MAX_IP_ENTRIES = 100

DEFAULT_PORTS = {"http": 80, "https": 443}
#: Lower-case labels joined by single dots. `_` is not valid DNS but is common in internal names.
_HOSTNAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
#: The schemes a pattern's scheme part allows (`*`: either).
_SCHEMES = {
    "http": frozenset({"http"}),
    "https": frozenset({"https"}),
    "*": frozenset(DEFAULT_PORTS),
}


def _printable_ascii(text: str) -> bool:
    """Only 0x21-0x7E: no space, control byte or anything a parser might normalise away."""
    return text.isascii() and text.isprintable() and " " not in text


def _valid_hostname(host: str) -> bool:
    """A lower-case DNS-style name: no empty label, nothing a URL parser could read twice."""
    return _HOSTNAME.fullmatch(host) is not None


def _normalise_ip_literal(host: str) -> str | None:
    """The compressed form of an IPv6 literal, so `[::1]` and `[0:0::1]` compare equal."""
    try:
        return ipaddress.IPv6Address(host).compressed
    except ValueError:
        return None


def _glob_match(pieces: tuple[str, ...], text: str) -> bool:
    """Whether `text` matches the glob split on `*` into `pieces` (`*` matches anything).

    The first piece must be a prefix, the last a suffix, and the middle ones occur
    in order in between; taking each middle piece at its leftmost position is
    always safe, so one forward scan decides: no backtracking, linear time.
    """
    if len(pieces) == 1:
        return text == pieces[0]
    first, last = pieces[0], pieces[-1]
    if len(text) < len(first) + len(last):
        return False
    if not text.startswith(first) or not text.endswith(last):
        return False
    position, end = len(first), len(text) - len(last)
    for piece in pieces[1:-1]:
        if not piece:
            continue
        found = text.find(piece, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True


@dataclass(frozen=True, slots=True)
class _Referer:
    """A Referer header taken apart once, for all of a key's patterns."""

    scheme: str
    host: str
    port: int
    target: str  # path, plus "?query" when there is a query


@dataclass(frozen=True, slots=True)
class RefererPattern:
    """`scheme://host[:port][/path-glob]`, as written in a key's `referers:`.

    scheme: `http`, `https` or `*` (either of the two). host: exact, `*.example.com`
    (at least one label in front of `example.com`, never `example.com` itself) or
    `*` (any). port: omitted means the scheme's default, `*` means any. path: a
    glob where `*` matches any run of characters, `/` and `?` included, checked
    against the path plus `?query`; omitted means any path.
    """

    text: str
    schemes: frozenset[str]
    host: str | None  # None: any host
    host_suffix: bool  # True: `host` is ".example.com" and a label must precede it
    port: int | None  # None: the default port of the referer's scheme
    any_port: bool
    path: tuple[str, ...] | None  # the glob split on "*"; None: any path

    @classmethod
    def parse(cls, text: str) -> RefererPattern:
        """Parse a pattern; ValueError with a message that says how to write it instead."""
        form = "expected scheme://host[:port][/path], e.g. https://*.example.com/*"
        if not isinstance(text, str) or not text:
            raise ValueError(f"a referer pattern must be a non-empty string: {form}")
        if len(text) > MAX_PATTERN_LENGTH:
            raise ValueError(f"referer pattern longer than {MAX_PATTERN_LENGTH} characters")
        if not _printable_ascii(text):
            raise ValueError(
                f"referer pattern {text!r} holds spaces, control or non-ASCII characters "
                "(write international host names in their xn-- form)"
            )
        scheme, sep, rest = text.partition("://")
        scheme = scheme.lower()
        if not sep:
            raise ValueError(f"referer pattern {text!r} has no scheme: {form}")
        schemes = _SCHEMES.get(scheme)
        if schemes is None:
            raise ValueError(f"referer pattern {text!r}: the scheme must be http, https or *")

        slash = rest.find("/")
        authority, path_text = (rest, None) if slash < 0 else (rest[:slash], rest[slash:])
        if "@" in authority:
            raise ValueError(f"referer pattern {text!r}: user information (@) is not allowed")
        if "?" in authority or "#" in authority or "\\" in authority:
            raise ValueError(f"referer pattern {text!r}: the host may not contain ?, # or \\")

        if authority.startswith("["):
            close = authority.find("]")
            literal = _normalise_ip_literal(authority[1:close]) if close > 0 else None
            if literal is None:
                raise ValueError(f"referer pattern {text!r}: invalid IPv6 address in brackets")
            host_text, port_text = literal, authority[close + 1 :]
            if port_text and not port_text.startswith(":"):
                raise ValueError(f"referer pattern {text!r}: expected :port after ]")
            port_text = port_text[1:]
            host, host_suffix = host_text, False
        else:
            host_text, colon, port_text = authority.partition(":")
            if colon and not port_text:
                raise ValueError(f"referer pattern {text!r}: empty port after ':'")
            host_text = host_text.lower()
            if host_text == "*":
                host, host_suffix = None, False
            elif host_text.startswith("*."):
                host, host_suffix = host_text[1:], True
                if not _valid_hostname(host[1:]):
                    raise ValueError(
                        f"referer pattern {text!r}: after '*.' comes a domain like example.com"
                    )
            elif _valid_hostname(host_text):
                host, host_suffix = host_text, False
            else:
                raise ValueError(
                    f"referer pattern {text!r}: the host must be a name like app.example.com, "
                    "*.example.com for its subdomains, or * for any host"
                )

        port: int | None = None
        any_port = port_text == "*"
        if port_text and not any_port:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise ValueError(f"referer pattern {text!r}: the port must be 1-65535 or *")
            port = int(port_text)

        path: tuple[str, ...] | None = None
        if path_text is not None:
            if "#" in path_text:
                raise ValueError(
                    f"referer pattern {text!r}: browsers never send a #fragment in a Referer"
                )
            path = tuple(path_text.split("*"))
        return cls(text, schemes, host, host_suffix, port, any_port, path)

    def _matches(self, referer: _Referer) -> bool:
        if referer.scheme not in self.schemes:
            return False
        if self.host is not None:
            if self.host_suffix:
                if len(referer.host) <= len(self.host) or not referer.host.endswith(self.host):
                    return False
            elif referer.host != self.host:
                return False
        if not self.any_port:
            expected = self.port if self.port is not None else DEFAULT_PORTS[referer.scheme]
            if referer.port != expected:
                return False
        return self.path is None or _glob_match(self.path, referer.target)

    def __str__(self) -> str:
        return self.text


@functools.lru_cache(maxsize=4096)
def _parse_referer(referer: str) -> _Referer | None:
    """Take a Referer apart, or None when it is anything but a plain http(s) URL.

    Printable ASCII is required before parsing because `urlsplit` silently drops
    tabs and newlines, and a browser would read `\\` or userinfo differently from
    a parser: anything two readers could disagree on is refused, never matched.
    """
    if len(referer) > MAX_REFERER_LENGTH or not _printable_ascii(referer):
        return None
    try:
        parts = urlsplit(referer)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or "@" in parts.netloc or "\\" in parts.netloc:
        return None
    host = parts.hostname or ""
    if parts.netloc.startswith("["):
        normalised = _normalise_ip_literal(host)
        if normalised is None:
            return None
        host = normalised
    elif not _valid_hostname(host):
        return None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if port is None:
        port = DEFAULT_PORTS[parts.scheme]
    return _Referer(parts.scheme, host, port, target)


#: Recent answers of `match_referer`, by (id of the pattern tuple, Referer). Each entry
#: keeps its tuple alive, so an id cannot be reused by another tuple while cached.
_ANSWERS: dict[tuple[int, str], tuple[Sequence[RefererPattern], bool]] = {}
_MAX_ANSWERS = 4096


def match_referer(patterns: Sequence[RefererPattern], referer: str | None) -> bool:
    """Whether the Referer matches any pattern. A missing or unparsable one matches none.

    A browser key sends the same Referer on every request, so answers are
    remembered per key's pattern tuple: the common case is one dict probe.
    """
    if not referer or not patterns:
        return False
    slot = (id(patterns), referer)
    known = _ANSWERS.get(slot)
    if known is not None and known[0] is patterns:
        return known[1]
    parsed = _parse_referer(referer)
    answer = parsed is not None and any(pattern._matches(parsed) for pattern in patterns)
    if len(_ANSWERS) >= _MAX_ANSWERS:
        _ANSWERS.clear()
    _ANSWERS[slot] = (patterns, answer)
    return answer


#: IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are IPv4 clients on a dual-stack socket.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_MAPPED_BASE = int(_MAPPED.network_address)


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sorted, non-overlapping [first, last] ranges as two parallel tuples for bisection."""
    starts: list[int] = []
    ends: list[int] = []
    for first, last in sorted(ranges):
        if ends and first <= ends[-1] + 1:
            ends[-1] = max(ends[-1], last)
        else:
            starts.append(first)
            ends.append(last)
    return tuple(starts), tuple(ends)


def _in(ranges: tuple[tuple[int, ...], tuple[int, ...]], value: int) -> bool:
    starts, ends = ranges
    index = bisect.bisect_right(starts, value) - 1
    return index >= 0 and value <= ends[index]


@dataclass(frozen=True, slots=True)
class IpAllowlist:
    """A key's `ips:`: the client addresses it may be used from."""

    texts: tuple[str, ...]
    _v4: tuple[tuple[int, ...], tuple[int, ...]]
    _v6: tuple[tuple[int, ...], tuple[int, ...]]

    @classmethod
    def parse(cls, items: list[str]) -> IpAllowlist:
        """Parse CIDRs and single addresses; ValueError naming the entry and the fix.

        Host bits are an error rather than silently masked: `10.1.2.3/8` was meant
        either as one address or as a network, and guessing wrong widens access.
        """
        if not isinstance(items, list) or not items:
            raise ValueError("ips must be a non-empty list of addresses or CIDRs (omit it for any)")
        if len(items) > MAX_IP_ENTRIES:
            raise ValueError(f"ips holds {len(items)} entries; at most {MAX_IP_ENTRIES} allowed")
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for item in items:
            if not isinstance(item, str) or not item or not _printable_ascii(item) or "%" in item:
                raise ValueError(f"ips entry {item!r} is not an IP address or CIDR")
            try:
                network = ipaddress.ip_network(item, strict=True)
            except ValueError:
                try:
                    loose = ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(
                        f"ips entry {item!r} is not an IP address or CIDR "
                        "(e.g. 203.0.113.7, 10.0.0.0/8, 2001:db8::/32)"
                    ) from None
                raise ValueError(
                    f"ips entry {item!r} has host bits set: write {loose.with_prefixlen} "
                    f"for the network, or {item.partition('/')[0]} for the single address"
                ) from None
            first, last = int(network.network_address), int(network.broadcast_address)
            if isinstance(network, ipaddress.IPv4Network):
                v4.append((first, last))
            elif network.subnet_of(_MAPPED):
                v4.append((first - _MAPPED_BASE, last - _MAPPED_BASE))
            else:
                v6.append((first, last))
        return cls(tuple(items), _merge(v4), _merge(v6))

    def contains(self, ip: IPAddress) -> bool:
        """Whether `ip` is allowed; `::ffff:a.b.c.d` is checked as the IPv4 address it is."""
        if isinstance(ip, ipaddress.IPv6Address):
            mapped = ip.ipv4_mapped
            if mapped is None:
                return _in(self._v6, int(ip))
            ip = mapped
        return _in(self._v4, int(ip))

    def __str__(self) -> str:
        return ", ".join(self.texts)
