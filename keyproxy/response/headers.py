"""Upstream response headers made safe: every spelling of the upstream's secrets,
and URLs of its own origin, as the header scrubber and the body scrubber search for them.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

#: What HTML escapes by name, as `&name;`.
HTML_NAMED = {
    ord("&"): b"amp",
    ord("<"): b"lt",
    ord(">"): b"gt",
    ord('"'): b"quot",
    ord("'"): b"apos",
}
#: What JSON (and a JavaScript string, `\\'`) may escape with a backslash and the byte itself.
JSON_SHORT = frozenset(b"/\"\\'")
#: The longest text one byte of a form takes with at most two leading zeros in a numeric
#: reference (`&#x00hh;`, `&#00ddd;`, as PHP writes `&#039;`): what the body stream holds
#: back is counted by it. A browser reads any number of zeros, and a spelling padded with
#: more can be longer: `BodyScrubber` masks such references itself (`overpadded`).
LONGEST_BYTE_SPELLING = 8


def markup_escapes(byte: int) -> list[bytes]:
    """Regexes for the lower-cased texts a JSON string or an HTML page may write an ASCII
    `byte` as, which a client's `JSON.parse` or a browser turns back into it: `\\u00hh`,
    `\\/`, `&#ddd;` and `&#xhh;` with any number of leading zeros, the named `&amp;`..."""
    if byte >= 0x80:  # these escapes name code points, not a UTF-8 sequence's bytes
        return []
    texts = [re.escape(b"\\u00%02x" % byte), rb"&\#0*%d;" % byte, rb"&\#x0*%x;" % byte]
    if byte in JSON_SHORT:
        texts.append(re.escape(b"\\" + bytes([byte])))
    if byte in HTML_NAMED:
        texts.append(re.escape(b"&" + HTML_NAMED[byte] + b";"))
    return texts


def byte_codes(forms: Iterable[bytes]) -> set[int]:
    """The bytes the forms hold, and their upper-case twins (`%41` stays `%41` in
    lower-cased text, yet decodes to `A`)."""
    return {code for form in forms for byte in form for code in (byte, bytes([byte]).upper()[0])}


def hex_of(codes: Iterable[int]) -> str:
    """A regex for the lower-case two-digit hex of any of `codes`, grouped by first digit."""
    by_high: dict[str, list[str]] = {}
    for code in sorted(codes):
        high, low = divmod(code, 16)
        by_high.setdefault(f"{high:x}", []).append(f"{low:x}")
    groups = (high + "[" + "".join(lows) + "]" for high, lows in by_high.items())
    return "(?:" + "|".join(groups) + ")"


#: The numeric escapes `markup_escapes` writes, in lower-cased text, to be read back; each
#: pattern begins with a literal, which the regex engine finds fast.
_JSON_NUMERIC = re.compile(rb"\\u00([0-7][0-9a-f])")
_HTML_NUMERIC = re.compile(rb"&#(?:x0*([0-7][0-9a-f])|0*([0-9]{2,3}));")


def _json_byte(match: re.Match[bytes]) -> bytes:
    return bytes([int(match.group(1), 16)])


def _html_byte(match: re.Match[bytes]) -> bytes:
    hex_code, decimal = match.groups()
    code = int(hex_code, 16) if hex_code is not None else int(decimal)
    return bytes([code]) if code < 0x80 else match.group()


class MarkupEscapes:
    """Finds JSON and HTML escapes (`markup_escapes`) of the bytes the secret's forms hold,
    cheaply enough to ask of every chunk: every spelling with such escapes holds one.

    A byte search first (`\\`, `&`: memchr), then one pattern per kind, each beginning
    with its byte, which the regex engine searches for alone. Measured per 64 KiB: a
    pattern for both kinds took 400-530 µs, a substring search for `&#` 70; these ~22.
    """

    __slots__ = ("html", "json", "replacements")

    def __init__(self, forms: Iterable[bytes]) -> None:
        codes = sorted(code for code in byte_codes(forms) if code < 0x80)
        hex_codes = hex_of(codes)
        decimal = "|".join(sorted(map(str, codes), key=len, reverse=True))
        short = "".join(re.escape(chr(c)) for c in codes if c in JSON_SHORT)
        json_escapes = [f"u00{hex_codes}", *([f"[{short}]"] if short else [])]
        html_escapes = [rf"#(?:x0*{hex_codes}|0*(?:{decimal}))"]
        html_escapes += [HTML_NAMED[c].decode() for c in codes if c in HTML_NAMED]
        self.json = re.compile((r"\\(?:" + "|".join(json_escapes) + ")").encode())
        self.html = re.compile(("&(?:" + "|".join(html_escapes) + ");").encode())
        #: The short and named escapes, read back without a callback per escape.
        self.replacements = tuple(
            [(b"\\" + bytes([c]), bytes([c])) for c in codes if c in JSON_SHORT]
            + [(b"&" + HTML_NAMED[c] + b";", bytes([c])) for c in codes if c in HTML_NAMED]
        )

    def decoded(self, low: bytes) -> bytes | None:
        """`low` read back as a JSON or HTML client would, if it holds an escape of a
        secret's byte; None if it holds none (the common case)."""
        if not (
            (b"\\" in low and self.json.search(low) is not None)
            or (b"&" in low and self.html.search(low) is not None)
        ):
            return None
        # Read back as a client would, but loosely (`\\\\/` read as `\\/`, escapes read after
        # other escapes): that only makes the search find more, never less.
        for escape, plain in self.replacements:
            low = low.replace(escape, plain)
        if b"\\" in low:
            low = _JSON_NUMERIC.sub(_json_byte, low)
        if b"&" in low:
            low = _HTML_NUMERIC.sub(_html_byte, low)
        return low


def _any_spelling(form: bytes, markup: bool = False) -> bytes:
    """A regex for a lower-cased `form` with any of its bytes raw or percent-escaped
    (hex digits lower-cased too), and a space also as `+`: every way a URL or form
    may write it, once the text searched is lower-cased as well. With `markup`, also
    every byte as a JSON string or an HTML page may escape it (a body's spellings)."""
    parts = []
    for byte in form:
        spellings = [re.escape(bytes([byte])), b"%" + f"{byte:02x}".encode()]
        upper = bytes([byte]).upper()[0]
        if upper != byte:  # `%41` stays `%41` when lower-cased, yet decodes to `A`
            spellings.append(b"%" + f"{upper:02x}".encode())
        if byte == 0x20:
            spellings.append(rb"\+")
        if markup:
            for code in dict.fromkeys((byte, upper)):
                spellings += markup_escapes(code)
        parts.append(b"(?:" + b"|".join(spellings) + b")")
    return b"".join(parts)


#: Base64 characters of a secret embedded in a longer encoded text depend on its
#: neighbours at both ends; a core shorter than this would redact harmless text.
MIN_BASE64_CORE = 8


def _base64_cores(secret: bytes) -> set[bytes]:
    """The base64 text of `secret` wherever it sits in the encoded data, standard and URL-safe.

    Base64 turns 3 bytes into 4 characters, so the secret starts at one of three
    alignments; at each, the characters that mix in bytes of its neighbours are
    dropped and the rest is the same whatever those neighbours are (so the
    secret alone, `user:secret`, `token=secret` ... all contain one of them).
    """
    cores: set[bytes] = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret)
        lead = (0, 2, 3)[offset]  # characters carrying bits of the filler
        end = offset + len(secret)
        full_chars = end // 3 * 4 + (0, 1, 2)[end % 3]  # characters whose bits are all known
        core = encoded[lead:full_chars]
        if offset == 0:
            whole = base64.b64encode(secret)
            cores.add(whole.rstrip(b"="))  # the secret alone, padding or not
        if len(core) >= MIN_BASE64_CORE:
            cores.add(core)
    cores |= {c.replace(b"+", b"-").replace(b"/", b"_") for c in cores}
    return {c for c in cores if c}


def secret_forms(secrets: tuple[str, ...], basic: tuple[str, str] | None = None) -> set[bytes]:
    """Every lower-cased text that spells a secret: raw, as hex, and as base64 (alone, or
    inside a longer encoded value), plus the injected Basic pair's base64. The header and
    body scrubbers both search for these, each form raw or percent-escaped."""
    forms: set[bytes] = set()
    for secret in secrets:
        raw = secret.encode("utf-8")
        if not raw:
            continue
        forms.add(raw.lower())
        forms.add(raw.hex().encode())
        forms |= {core.lower() for core in _base64_cores(raw)}
    if basic is not None:
        pair = f"{basic[0]}:{basic[1]}".encode()
        for encoded in (base64.b64encode(pair), base64.urlsafe_b64encode(pair)):
            # Unpadded: a padded spelling contains it, and is redacted up to its '='.
            forms.add(encoded.rstrip(b"=").lower())
    return forms


class Spelling(NamedTuple):
    """One way a secret may be written, as a pattern over lower-cased text.

    `longest`: the longest text the pattern can match (the body scrubber holds
    back that much minus one byte at a chunk's end). `anchors`: every match
    contains one of these literals, so a body with none of them is known clean
    after a few fast substring searches, without running the pattern.
    """

    pattern: bytes
    longest: int
    anchors: tuple[bytes, ...]


def _longest_run_without_space(raw: bytes) -> bytes:
    """Raw bytes a match with no `%` must contain: only a space has another spelling (`+`)."""
    return max(raw.split(b" "), key=len)


def secret_spellings(
    secrets: tuple[str, ...], basic: tuple[str, str] | None = None, markup: bool = False
) -> list[Spelling]:
    """Every spelling of the secrets to search for, shared by the header and body scrubbers
    (`markup`: also JSON and HTML escapes, for bodies)."""
    spellings = []
    per_byte = LONGEST_BYTE_SPELLING if markup else 3
    escapes = (b"%", b"\\", b"&") if markup else (b"%",)
    for form in sorted(secret_forms(secrets, basic), key=len, reverse=True):
        run = _longest_run_without_space(form)
        # Each byte at most `%XX` (or `&#x00hh;`); a match without any escape holds the
        # longest space-free run of the form as it is.
        anchors = (*escapes, run) if run else (*escapes, b" ", b"+")
        spellings.append(Spelling(_any_spelling(form, markup), per_byte * len(form), anchors))
    return spellings


class SecretScrubber:
    """Replaces every spelling of the upstream's secrets in response header values,
    and turns URLs of the upstream's own origin in them into proxy-relative paths.

    An upstream may echo its key in a header, a cookie or a redirect URL; the
    client must never see it. Each secret is searched for in any letter case, with
    any of its characters raw, percent-escaped or JSON- or HTML-escaped (the body
    scrubber's `markup_escapes`), as hex, and as base64 (standard
    or URL-safe, padded or not, alone or inside a longer encoded value such as
    Basic's `user:password`), in one compiled alternation over the lower-cased
    headers. The upstream's address is no secret but says where the backend
    lives: `Content-Location`, `Link`, `Refresh` or any other header naming it
    gets the same rewrite as `Location` (see `OriginRewriter`).
    """

    REDACTED = b"[REDACTED]"

    def __init__(
        self,
        secrets: tuple[str, ...],
        basic: tuple[str, str] | None = None,
        origin: OriginRewriter | None = None,
    ) -> None:
        forms = secret_forms(secrets, basic)
        ordered = sorted(forms, key=len, reverse=True)
        # Raw forms first, checked by a plain alternation; escapes need '%' or '+', or
        # '\\' or '&': a header may carry JSON (a debug dump of the request, PHP writing
        # `/` as `\\/`) or HTML that its reader parses, as the body scrubber reads them.
        self._plain = re.compile(b"|".join(map(re.escape, ordered))) if ordered else None
        self._escaped = (
            re.compile(b"|".join(_any_spelling(form, markup=True) for form in ordered))
            if ordered
            else None
        )
        # A secret holding both '+' and ' ' can mix both spellings of the space with
        # a raw '+': only the escaped pattern tells those apart.
        self._slow_escapes = any("+" in x and " " in x for x in secrets)
        self._markup = MarkupEscapes(forms)
        # A secret holding '\\' or '&' itself: reading escapes back loosely could hide
        # it, so a block with either goes to the escaped pattern (as `BodyScrubber`).
        self._markup_always = any("\\" in x or "&" in x for x in secrets)
        self.origin = origin
        self._origin_hint = origin.hint if origin is not None else None

    def __bool__(self) -> bool:
        return self._plain is not None or self.origin is not None

    def found_in(self, data: bytes) -> bool:
        """Cheap test for the common case: nothing to scrub in this block."""
        low = data.lower()
        if self._origin_hint is not None and self._origin_hint in low:
            return True
        if self._plain is None:
            return False
        if self._slow_escapes:
            return self._escaped.search(low) is not None  # type: ignore[union-attr]
        # Escaped spellings decode to a raw one: decoding is far cheaper than the
        # per-character alternation the escaped pattern needs (which `scrub` uses).
        if self._holds_raw(low, self._plain):
            return True
        if b"\\" in low or b"&" in low:
            if self._markup_always:
                return True
            decoded = self._markup.decoded(low)
            return decoded is not None and self._holds_raw(decoded.lower(), self._plain)
        return False

    @staticmethod
    def _holds_raw(low: bytes, plain: re.Pattern[bytes]) -> bool:
        """Whether `low`, raw or percent-decoded (a space also as `+`), holds a form."""
        if plain.search(low) is not None:
            return True
        if b"%" in low:
            low = unquote_to_bytes(low).lower()
            if plain.search(low) is not None:
                return True
        return b"+" in low and plain.search(low.replace(b"+", b" ")) is not None

    def scrub(self, value: bytes) -> bytes:
        """Header lines with the upstream's origin made relative and its secrets redacted."""
        if self.origin is not None:
            value = self.origin.rewrite_all(value)
        return self.redact(value)

    def redact(self, value: bytes) -> bytes:
        """`value` with every spelling of a secret replaced (its URLs left as they are)."""
        if self._escaped is None:
            return value
        low = value.lower()
        spans = [m.span() for m in self._escaped.finditer(low)]
        if not spans:
            return value
        out: list[bytes] = []
        last = 0
        for start, end in spans:
            out += (value[last:start], self.REDACTED)
            last = end
        out.append(value[last:])
        return b"".join(out)


_DEFAULT_PORTS = {b"http": 80, b"https": 443}


class OriginRewriter:
    r"""URLs of the upstream's own origin become paths through the proxy.

    The upstream writes absolute URLs with its own address (`http://10.0.0.5:3000/x`);
    a client must neither learn that address nor be sent there. Every spelling a
    browser reads as that origin is recognised: any letter case, scheme-relative
    (`//host/x`), backslashes for slashes (`/\host`, `http:\\host`), userinfo, a
    trailing dot, and the default port written out (`http://host:80/`), as is the
    upstream's base path. The result is never scheme-relative: a path that would
    start with `//` or `/\` (another host, to a browser) is written `/.//...`,
    which stays on the proxy.
    """

    def __init__(self, scheme: str, host: str, port: int, base_path: str) -> None:
        self.port = port
        self.default_port = _DEFAULT_PORTS.get(scheme.encode()) == port
        host = host.lower().strip("[]")
        if ":" in host:
            host_bytes = b"[" + host.encode() + b"]"  # an IPv6 literal, as URLs write it
        else:
            try:
                host_bytes = host.encode("idna")
            except UnicodeError:
                host_bytes = host.encode()
        #: Lower-cased text every match contains: the cheap pre-check for a header block.
        self.hint = host_bytes.strip(b"[]")
        base = re.escape(base_path.lower().encode()) if base_path else b""
        self._pattern = re.compile(
            rb"(?:(https?):[/\\]*|[/\\]{2,})"  # scheme with any slashes, or scheme-relative
            rb"(?:[^/\\?#@\s\"'<>]*@)?"  # userinfo
            + re.escape(host_bytes)
            + rb"\.?(?::([0-9]*))?(?![A-Za-z0-9._~%@:-])"
            + (rb"(" + base + rb"(?![^/\\?#\s\"'<>;,]))?" if base else b"")
        )

    def _same_origin(self, scheme: bytes | None, port: bytes | None) -> bool:
        if port:
            return int(port) == self.port
        if scheme is None:
            return self.default_port  # scheme-relative: the proxy's scheme, its default port
        return _DEFAULT_PORTS[scheme] == self.port

    def rewrite_all(self, data: bytes) -> bytes:
        """Every URL of the upstream's origin in `data` (header lines) made relative."""
        low = data.lower()
        if self.hint not in low:
            return data
        out: list[bytes] = []
        last = 0
        for match in self._pattern.finditer(low):
            scheme, port = match.group(1), match.group(2)
            if not self._same_origin(scheme, port):
                continue
            start, end = match.span()
            rest = data[end : end + 2]
            if rest[:1] in (b"/", b"\\"):
                replacement = b"/." if rest[1:2] in (b"/", b"\\") else b""
            else:
                replacement = b"/"
            out += (data[last:start], replacement)
            last = end
        if not out:
            return data
        out.append(data[last:])
        return b"".join(out)

    def rewrite_location(self, value: bytes) -> bytes:
        # Browsers drop tabs inside URLs, so `ht\ttp://host` is the same URL.
        if b"\t" in value:
            value = value.replace(b"\t", b"")
        return self.rewrite_all(value)
