"""The one canonical form of a request target.

The proxy decides on a path and forwards a path; if those are two different
strings, a client can make the upstream serve something the route check never
saw (the Envoy, Traefik and APISIX bypasses listed in docs/security.md). So the
target is parsed here exactly once: routes match `Target.segments`, and the
forwarder sends `Target.path` (plus `"?" + Target.query`) upstream verbatim.

Every spelling that some upstream could read differently from how it is
matched is either refused or rewritten into one spelling:

* refused: encoded `/`, `\\`, `%` (double encoding), `;`, controls; raw `\\`,
  `;`, `#`, controls, space and non-ASCII; `.`/`..` segments (raw or
  encoded); empty segments; malformed escapes; escapes that are not valid
  UTF-8 (overlong forms are the classic way to smuggle `.` and `/`); escaped
  Unicode that NFKC-normalises into a separator or dot segment.
* rewritten: escapes of unreserved characters are decoded (`%41` -> `A`),
  other escapes get upper-case hex (`%3a` -> `%3A`), and the characters RFC
  3986 never allows raw in a path (`"<>[]^`{|}`) are percent-encoded, so
  `/{x}` and `/%7Bx%7D` are one target.

Escapes of reserved characters (`%3A`, `%2C`, ...) are kept: RFC 3986 says
they are not equivalent to the raw character and some upstreams do treat
them differently. The route table compensates by also reading the path the
lenient way (see `keyproxy.policy.routes`).

The query string is only validated, never rewritten: re-encoding it would
change what the upstream receives without making route matching safer.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote_plus, unquote_to_bytes

#: Longest request target accepted, in characters (= bytes: the target is latin-1).
MAX_TARGET_LENGTH = 8192
#: Most path segments accepted; also bounds the route matcher's work.
MAX_SEGMENTS = 128


#: NamedTuple's own constructor is a Python function; calling `tuple.__new__` directly
#: builds the same object at a third of the cost, which counts for values built on
#: every request.
_new_tuple = tuple.__new__


class Target(NamedTuple):
    """A request target in its one canonical form (a tuple: built on every request)."""

    path: str  # canonical path: what routes match and what is forwarded
    query: str  # the query string without "?", forwarded as is ("" when none)
    segments: tuple[str, ...]  # the path split on "/", without the leading empty string


@dataclass(frozen=True, slots=True)
class InvalidPath:
    message: str


_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
# Characters kept raw in a canonical path: unreserved, sub-delims except ';', ':' and '@'.
_PATH_SAFE = r"A-Za-z0-9\-._~!$&'()*+,=:@"
# Characters allowed raw in the query: printable ASCII except '#' and '%' (escapes are checked).
_QUERY_SAFE = r"!\"$&-~"

# The fast path: only characters that need no rewriting, no '//' and no '%' in the path.
# Dot segments still need a look, done on the split segments.
_FAST = re.compile(
    rf"(/|(?:/[{_PATH_SAFE}]+)+/?)"
    rf"(?:\?([{_QUERY_SAFE}]*(?:%[0-9A-Fa-f]{{2}}[{_QUERY_SAFE}]*)*))?"
)
_BAD_CHAR = re.compile(r"[^\x21-\x7e]")
_BAD_QUERY_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_NON_ASCII_ESCAPE = re.compile(r"%[89A-F][0-9A-F]")

# Raw characters that are never valid in a URI path: their escape is their only spelling.
_ENCODE_RAW = str.maketrans({c: f"%{ord(c):02X}" for c in '"<>[]^`{|}'})


def _escape_table() -> dict[str, str | InvalidPath]:
    """Every two-character hex pair (either case) -> its canonical text or the refusal.

    A dict lookup both validates the hex digits (no `int()` leniency such as
    `%+1`) and picks the outcome in one step.
    """
    refusals = {
        0x2F: InvalidPath("path contains an encoded '/' (%2F)"),
        0x5C: InvalidPath("path contains an encoded '\\' (%5C)"),
        0x25: InvalidPath("path contains an encoded '%' (%25): double encoding is not accepted"),
        0x3B: InvalidPath("path contains an encoded ';' (%3B)"),
    }
    control = InvalidPath("path contains an encoded control character")
    table: dict[str, str | InvalidPath] = {}
    for b in range(256):
        outcome: str | InvalidPath
        if b in refusals:
            outcome = refusals[b]
        elif b < 0x20 or b == 0x7F:
            outcome = control
        elif chr(b) in _UNRESERVED:
            outcome = chr(b)
        else:
            outcome = f"%{b:02X}"
        for pair in {f"{b:02X}", f"{b:02x}", f"{b >> 4:X}{b & 15:x}", f"{b >> 4:x}{b & 15:X}"}:
            table[pair] = outcome
    return table


_ESCAPES = _escape_table()

_MALFORMED_ESCAPE = InvalidPath(
    "path contains a malformed percent-escape (expected '%' and two hex digits)"
)
_EMPTY_SEGMENT = InvalidPath("path contains an empty segment ('//')")
_DOT_SEGMENT = InvalidPath("path contains a '.' or '..' segment (raw or percent-encoded)")
_TOO_MANY_SEGMENTS = InvalidPath(f"path has more than {MAX_SEGMENTS} segments")
_TOO_LONG = InvalidPath(f"request target is longer than {MAX_TARGET_LENGTH} characters")


def canonicalize(raw_target: str) -> Target | InvalidPath:
    """The canonical `Target` of a request-target as received, or why it is refused.

    Most traffic consists only of characters that need no rewriting; one
    regex match recognises it, and only targets with escapes, rare characters
    or dot-like segments take the careful path.
    """
    if len(raw_target) <= MAX_TARGET_LENGTH:
        m = _FAST.fullmatch(raw_target)
        if m is not None:
            path, query = m.groups()
            if path == "/":
                return Target("/", query or "", ())
            segments = tuple(path[1:].split("/"))
            if len(segments) <= MAX_SEGMENTS and not (
                "/." in path and ("." in segments or ".." in segments)
            ):
                return _new_tuple(Target, (path, query or "", segments))
    return _canonicalize_carefully(raw_target)


def _canonicalize_carefully(raw: str) -> Target | InvalidPath:
    """The full rules; must give exactly the fast path's answer wherever that one answers."""
    if len(raw) > MAX_TARGET_LENGTH:
        return _TOO_LONG
    if not raw.startswith("/"):
        return InvalidPath(_describe_form(raw))
    bad = _BAD_CHAR.search(raw)
    if bad is not None:
        return InvalidPath(f"request target contains {_describe_char(bad.group())}")
    if "#" in raw:
        return InvalidPath("request target contains '#' (a fragment is never sent to a server)")
    path, _, query = raw.partition("?")
    if "\\" in path:
        return InvalidPath("path contains a backslash ('\\')")
    if ";" in path:
        return InvalidPath("path contains ';' (path parameters are not accepted)")
    if path.count("/") > MAX_SEGMENTS:
        return _TOO_MANY_SEGMENTS
    if _BAD_QUERY_ESCAPE.search(query):
        return InvalidPath(
            "query contains a malformed percent-escape (expected '%' and two hex digits)"
        )

    path = path.translate(_ENCODE_RAW)
    if "%" in path:
        decoded = _decode_escapes(path)
        if isinstance(decoded, InvalidPath):
            return decoded
        path = decoded
    if path == "/":
        return Target("/", query, ())

    segments = tuple(path[1:].split("/"))
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if not segment:
            if i != last:
                return _EMPTY_SEGMENT
        elif segment == "." or segment == "..":
            return _DOT_SEGMENT
    if _NON_ASCII_ESCAPE.search(path):
        for segment in segments:
            refusal = _check_unicode(segment)
            if refusal is not None:
                return refusal
    return Target(path, query, segments)


def _decode_escapes(path: str) -> str | InvalidPath:
    parts = path.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        outcome = _ESCAPES.get(part[:2])
        if outcome is None:
            return _MALFORMED_ESCAPE
        if isinstance(outcome, InvalidPath):
            return outcome
        out.append(outcome)
        out.append(part[2:])
    return "".join(out)


def _check_unicode(segment: str) -> InvalidPath | None:
    """Refuse escaped bytes that decoders disagree on.

    Invalid UTF-8 (overlong `%C0%AE` for '.', surrogates, stray bytes) is
    read as '.', '/', U+FFFD or Latin-1 depending on the server. Valid
    characters that NFKC folds into '/', '\\', '%', ';' or a dot segment
    (U+FF0F fullwidth solidus, U+FF0E fullwidth full stop) reach the same
    places on servers that normalise.
    """
    if "%" not in segment:
        return None
    try:
        text = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        return InvalidPath("path contains percent-escapes that are not valid UTF-8")
    if any("\x80" <= c <= "\x9f" for c in text):
        return InvalidPath("path contains an encoded control character")
    if unicodedata.is_normalized("NFKC", text):
        return None
    folded = unicodedata.normalize("NFKC", text)
    if (
        folded in (".", "..")
        or any(folded.count(c) > text.count(c) for c in "/\\%;?#")
        or any(c < " " or c == "\x7f" for c in folded)
    ):
        return InvalidPath(
            "path contains an encoded Unicode character that normalises to '/', '.' or another"
            " reserved character"
        )
    return None


def _describe_form(raw: str) -> str:
    if raw == "*":
        return "asterisk-form request target ('*') is not accepted"
    if not raw:
        return "request target is empty"
    if "://" in raw[:16]:
        return "absolute-form request target is not accepted: send the path only, e.g. '/v1/...'"
    return "request target must be a path starting with '/'"


def _describe_char(char: str) -> str:
    if char == " ":
        return "a space (send it as %20)"
    if char < " " or char == "\x7f":
        return f"a control character (0x{ord(char):02X})"
    return "a non-ASCII character (send it percent-encoded as UTF-8)"


# --- query parameter names --------------------------------------------------------

#: Leading characters a parser skips before a name: brackets (Rack 2 reads `[_method]` as
#: `_method`, and `qs` — Express's parser — reads a key that starts with `[x]` as `x`).
_NAME_LEAD = " []"
#: Where a parser ends the base name: a `[` opens an array or nested key (qs, Rack, PHP),
#: a `]` closes one, a `.` opens a nested key (qs with allowDots, Spring binders).
_NAME_END = re.compile(r"[\[\].\x00]")
#: Most rounds of percent-decoding applied to a name: an upstream behind another
#: decoding layer reads `%255F` as `_`.
_DECODE_ROUNDS = 3


def decoded_name(raw: str) -> str:
    """A query name form-decoded (`+` is a space), again while escapes remain (bounded)."""
    name = unquote_plus(raw)
    for _ in range(_DECODE_ROUNDS - 1):
        if "%" not in name:
            break
        again = unquote_plus(name)
        if again == name:
            break
        name = again
    return name


def param_readings(raw: str) -> frozenset[str]:
    """Every name a common framework may read the raw query name `raw` as (lower-case).

    * as sent, decoded (Django's QueryDict, Spring's getParameter, Rack 3);
    * the base name before any `[`, `]` or `.`, after leading brackets and spaces
      (qs/Express: `_method[]`, `[_method]`, `[_method][]`, `_method.x` with allowDots;
      Rack 2: `[_method]`, `]]_method`; Rails' nested params);
    * PHP's reading (Laravel, Symfony): leading spaces dropped, then `.` and space
      inside the name read as `_`, and a `[` starting an array of that name.
    """
    name = decoded_name(raw).lower()
    base = _NAME_END.split(name.lstrip(_NAME_LEAD), 1)[0]
    php = name.lstrip(" ").partition("[")[0].replace(" ", "_").replace(".", "_")
    return frozenset((name, base, php))


#: What nesting parsers read as a step of a key path: brackets and dots.
_PATH_STEP = re.compile(r"[\[\].]")


def name_path(raw: str) -> tuple[str, ...]:
    """The key path a nesting parser may read the raw query name `raw` as (lower-case).

    qs (Express, Strapi), Rack, PHP and Spring binders read `filter[createdBy]`,
    `filter.createdBy` and `filter[createdBy][]` as the same nested key, `filter` as the
    whole object around it: all are `("filter", "createdby")` or a prefix of it here.
    """
    name = decoded_name(raw).lower().lstrip(_NAME_LEAD)
    return tuple(part for part in _PATH_STEP.split(name) if part)
