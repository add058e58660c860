"""The upstream's secret kept out of response bodies, streaming, across chunk boundaries.

An Express redirect body ("Found. Redirecting to /posts?apikey=<secret>"), a
debug page or an endpoint echoing request headers would hand the upstream's
secret to any client. Every body is scanned for every spelling the header
scrubber knows (`keyproxy.response.headers.secret_spellings`), and each occurrence is
replaced by a fixed redaction.

Cheap when clean, which is nearly always: a chunk is lower-cased once and
searched for a few literal needles (each spelling's longest run of raw bytes:
the secret, its hex, its base64 at each alignment). Only an escaped spelling
has none of them, and it holds a `%` followed by the hex of one of the
secret's bytes; a chunk with such an escape is decoded once and searched for
the same literals. A chunk with neither is passed on after those few
searches; otherwise the exact pattern runs from just before each needle found.

Streaming without letting a byte out before it is known clean: each call to
`ScrubStream.feed` returns the bytes that can no longer be the start of a
spelling, and holds back the last `longest - 1` bytes (the longest text a
spelling can match), which the next chunk completes. `end` releases the rest.
A match that starts before the held tail always lies wholly within the bytes
seen, so the regular expression decides it on complete data. A stream told
the body's length (`Content-Length`) scans its last chunk to the end at once:
a body that arrives in one piece is scanned once and passed on whole.

With `same_length` each occurrence becomes a mask of its own byte length, so
the body keeps its length and its framing (the data path uses this); otherwise
the body changes length and the caller sends it chunked or buffers it. Compressed bodies must
be decoded first (`keyproxy.response.codings`): the scrubber reads bytes as
the client will read them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from urllib.parse import unquote_to_bytes

from keyproxy.response.headers import (
    MarkupEscapes,
    byte_codes,
    hex_of,
    secret_forms,
    secret_spellings,
)

REDACTED = b"[REDACTED]"
#: From this many bytes on, a chunk's needles are searched with `memmem` (below, the
#: ctypes call costs more than `bytes.__contains__` saves: measured crossover ~6 KiB).
MEMMEM_FROM = 8192
#: A body of known length up to this size is scanned once, when its last byte is in:
#: in 16 KiB pieces a 64 KiB JSON body cost 1.4 µs per KiB to scan, whole 0.9 µs.
WHOLE_UP_TO = 64 * 1024


def _libc_finder() -> Callable[[bytes], Callable[..., int]] | None:
    """glibc's `memmem` (two-way search with SIMD) where the platform has it.

    `bytes.find` slows down on long needles whose characters are common in the
    body (its skip filter fills up): the five needles of one secret took 52 µs on a
    64 KiB JSON body, `memmem` 20 µs, measured in-process on the benchmark machine.
    """
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        if name is None:
            return None
        memmem = ctypes.CDLL(name).memmem
    except (OSError, AttributeError, ImportError):
        return None
    memmem.restype = ctypes.c_void_p
    memmem.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    to_address = ctypes.cast
    void_p = ctypes.c_void_p
    char_p = ctypes.c_char_p

    def finder(haystack: bytes) -> Callable[..., int]:
        """`haystack.find`, over `memmem`; the caller keeps `haystack` alive."""
        base = to_address(char_p(haystack), void_p).value or 0
        size = len(haystack)

        def find(needle: bytes, start: int = 0) -> int:
            if start >= size:
                return -1 if needle else size
            found = memmem(base + start, size - start, needle, len(needle))
            return -1 if found is None else found - base

        return find

    return finder


_FINDER = _libc_finder()


def same_length_mask(size: int) -> bytes:
    """A redaction exactly as long as what it replaces, so `Content-Length` stays true
    and the body keeps streaming in its own framing: `[REDACTED]` padded with `*`
    (or cut, for a spelling shorter than ten bytes)."""
    return (REDACTED + b"*" * (size - len(REDACTED)))[:size]


def _without_supersets(needles: Iterable[bytes]) -> tuple[bytes, ...]:
    """The needles none of the others is part of (a needle holding another is found
    wherever that one is: one search less per chunk), longest first."""
    unique = set(needles)
    kept = [n for n in unique if not any(m != n and m in n for m in unique)]
    return tuple(sorted(kept, key=lambda n: (-len(n), n)))


def _escape_pattern(forms: Iterable[bytes]) -> re.Pattern[bytes]:
    """`%` and the hex of a byte a form holds. Every percent-escaped spelling holds one; a
    `%` without one cannot begin to spell a secret."""
    return re.compile(("%" + hex_of(byte_codes(forms))).encode())


def overpadded(forms: Iterable[bytes]) -> re.Pattern[bytes]:
    """Numeric references padded with three or more zeros (`&#00098;`): of a byte the
    forms hold, or cut off where the text in hand ends (its code still to come).

    A browser reads any number of zeros, so the spellings match them; but the stream
    holds back what a spelling with at most two zeros a byte can take
    (`LONGEST_BYTE_SPELLING`), and one padded with more can begin in bytes already
    passed on. No encoder writes such padding, so each one is masked on its own as
    well, wherever it is: a client never reads a secret's byte from one. `\\Z` also
    matches at the end of a search window, where the stream looks no further.
    """
    codes = sorted(code for code in byte_codes(forms) if code < 0x80)
    decimal = "|".join(sorted(map(str, codes), key=len, reverse=True)) or "(?!)"
    return re.compile(
        (rf"&\#(?:x0{{3,}}{hex_of(codes)}|0{{3,}}(?:{decimal}));|&\#x?0{{3,}}[0-9a-f]*\Z").encode()
    )


class BodyScrubber:
    """The compiled spellings of one configuration snapshot; `stream()` per response."""

    __slots__ = (
        "clean",
        "decoded_needles",
        "escapes",
        "hold",
        "markup",
        "markup_always",
        "needles",
        "overpadded",
        "pattern",
        "percent_always",
        "plus_is_space",
        "same_length",
    )

    def __init__(
        self,
        secrets: tuple[str, ...],
        basic: tuple[str, str] | None = None,
        same_length: bool = False,
    ) -> None:
        self.same_length = same_length
        #: Small bodies already found clean (`scrub`).
        self.clean: set[bytes] = set()
        spellings = secret_spellings(secrets, basic, markup=True)
        #: Raw literals every spelling without an escape holds (its longest run without a
        #: space, which is the only byte with another raw spelling, `+`).
        self.needles = _without_supersets(
            a for s in spellings for a in s.anchors if a not in _ESCAPE_ANCHORS
        )
        # Escaped spellings decode to a raw form: a chunk with an escape that could be
        # part of one is decoded once and searched for the forms, instead of running
        # the per-character pattern around every `%`. A `%` just before a spelling can
        # swallow its first two characters when decoded (`%` + `ab` is one byte), so each
        # form is searched without them. Not for a secret holding `%` (its raw
        # `%` would decode) or both `+` and a space (only the pattern tells those
        # spellings apart): there every `%` is a place the pattern runs from.
        forms = secret_forms(secrets, basic)
        self.percent_always = any("%" in x or ("+" in x and " " in x) for x in secrets)
        self.decoded_needles = _without_supersets(f[2:] if len(f) > 2 else f for f in forms)
        self.plus_is_space = any(b" " in f for f in forms)
        self.escapes = _escape_pattern(forms)
        # JSON (`\u0062`, `\/`) and HTML (`&#98;`, `&amp;`) escapes likewise: an echo page or
        # a JSON encoder may write the secret so; its reader, not the bytes, holds it.
        self.markup = MarkupEscapes(forms)
        self.markup_always = any("\\" in x or "&" in x for x in secrets)
        self.overpadded = overpadded(forms)
        if spellings:
            patterns = sorted((s.pattern for s in spellings), key=len, reverse=True)
            # Last: a spelling that holds an over-padded reference is redacted whole.
            patterns.append(self.overpadded.pattern)
            self.pattern: re.Pattern[bytes] | None = re.compile(b"|".join(patterns))
            self.hold = max(s.longest for s in spellings) - 1
        else:
            self.pattern = None
            self.hold = 0

    def __bool__(self) -> bool:
        return self.pattern is not None

    def stream(self, length: int | None = None) -> ScrubStream:
        """A stream for one body; `length`: its declared size, when known."""
        assert self.pattern is not None
        return ScrubStream(self, length)

    def anchors_in(self, low: bytes) -> list[bytes]:
        """The needles `low` (lower-cased text) holds, with `%` when an escaped spelling
        may lie in it: empty for a clean text, which is the common case."""
        found: list[bytes] = []
        if len(low) >= MEMMEM_FROM and _FINDER is not None:
            find = _FINDER(low)
            for needle in self.needles:
                if find(needle) >= 0:
                    found.append(needle)
        else:
            for needle in self.needles:
                if needle in low:
                    found.append(needle)
        if b"%" in low and (self.percent_always or self._escaped_in(low)):
            found.append(b"%")
        if (b"\\" in low or b"&" in low) and (
            self.markup_always
            or self._markup_escaped_in(low)
            or (b"&#" in low and self.overpadded.search(low) is not None)
        ):
            found += [anchor for anchor in (b"\\", b"&") if anchor in low]
        return found

    def _escaped_in(self, low: bytes) -> bool:
        """Whether a percent-escaped spelling may lie in `low`: it has an escape of a
        secret's byte, and, decoded, one of the forms (less its first two characters)."""
        if self.escapes.search(low) is None:
            return False
        return self._holds_form(unquote_to_bytes(low).lower())

    def _markup_escaped_in(self, low: bytes) -> bool:
        """Whether a spelling with JSON or HTML escapes (percent-escapes mixed in or not)
        may lie in `low`: as `_escaped_in`, for those escapes."""
        decoded = self.markup.decoded(low)
        if decoded is None:
            return False
        decoded = decoded.lower()
        return self._holds_form(decoded) or (
            b"%" in decoded and self._holds_form(unquote_to_bytes(decoded).lower())
        )

    def _holds_form(self, decoded: bytes) -> bool:
        if _holds_any(decoded, self.decoded_needles):
            return True
        return (
            self.plus_is_space
            and b"+" in decoded
            and _holds_any(decoded.replace(b"+", b" "), self.decoded_needles)
        )

    def scrub(self, body: bytes) -> bytes:
        """A whole body at once (a buffered or cached one, or one that came in one read)."""
        if self.pattern is None:
            return body
        small = len(body) <= REMEMBERED_CLEAN_BODY
        if small and body in self.clean:
            return body
        if not self.anchors_in(body.lower()):
            if small:
                clean = self.clean
                if len(clean) >= REMEMBERED_CLEAN_BODIES:
                    clean.clear()
                clean.add(body)
            return body
        return _redact(self.pattern, body, self.same_length)[0]


#: Small bodies found clean, remembered per snapshot (as header blocks are): an API serves
#: the same few answers over and over, and the scan of a repeat is then one hash and one
#: set probe (300 B of JSON: 2.9 µs scanned, 0.3 µs remembered). At most this many
#: bodies of at most this size, so under 4 MiB; when full it starts over.
REMEMBERED_CLEAN_BODIES = 1024
REMEMBERED_CLEAN_BODY = 4096


#: What every escaped spelling holds (raw spellings hold the needles instead).
_ESCAPE_ANCHORS = (b"%", b"\\", b"&")


def _holds_any(text: bytes, needles: tuple[bytes, ...]) -> bool:
    if len(text) >= MEMMEM_FROM and _FINDER is not None:
        find = _FINDER(text)
        return any(find(needle) >= 0 for needle in needles)
    return any(needle in text for needle in needles)


class ScrubStream:
    """One response body: `feed` each chunk, then `end`; the concatenation is the clean body."""

    __slots__ = ("found", "held", "parts", "remaining", "scrubber")

    def __init__(self, scrubber: BodyScrubber, length: int | None = None) -> None:
        self.scrubber = scrubber
        self.held = b""
        self.found = 0  # occurrences redacted so far (for a log line or a metric)
        #: Bytes still to come when the length is known; the chunk that brings the
        #: last of them is scanned to its end, with nothing held back.
        self.remaining = -1 if length is None else length
        self.parts: list[bytes] | None = (
            [] if length is not None and length <= WHOLE_UP_TO else None
        )

    def feed(self, chunk: bytes) -> bytes:
        remaining = self.remaining
        if remaining >= 0:
            remaining = self.remaining = remaining - len(chunk)
            if self.parts is not None:
                # A small body of known length arriving in pieces: held until its last
                # piece, then scanned once (each piece would cost a search per needle).
                self.parts.append(chunk)
                if remaining > 0:
                    return b""
                chunk, self.parts = b"".join(self.parts), None
        data = self.held + chunk if self.held else chunk
        size = len(data)
        if remaining == 0:
            cut = size  # the body's last byte is here: nothing can complete a spelling later
        else:
            cut = size - self.scrubber.hold  # bytes before `cut` cannot begin a spelling
            if cut <= 0:  # the next chunk completes
                self.held = data
                return b""
        low = data.lower()  # the spellings are lower-cased; bytes.lower keeps every offset
        anchors = self.scrubber.anchors_in(low)
        if not anchors:
            if cut == size:
                self.held = b""
                return data
            self.held = data[cut:]
            return data[:cut]
        clean, keep_from = self._redact_before(data, low, cut, anchors)
        self.held = data[keep_from:]
        return clean

    def _redact_before(
        self, data: bytes, low: bytes, cut: int, anchors: list[bytes]
    ) -> tuple[bytes, int]:
        """`data` up to where it is decided (at least `cut`), spellings starting before
        `cut` redacted; the offset where the undecided rest begins."""
        scrubber = self.scrubber
        pattern = scrubber.pattern
        assert pattern is not None
        hold = scrubber.hold
        size = len(data)
        find = _FINDER(low) if _FINDER is not None and size >= MEMMEM_FROM else low.find
        upcoming = [find(anchor) for anchor in anchors]
        out: list[bytes] = []
        position = 0
        while True:
            # The earliest anchor at or after `position`.
            first = -1
            for i, at in enumerate(upcoming):
                if 0 <= at < position:
                    at = upcoming[i] = find(anchors[i], position)
                if at >= 0 and (first < 0 or at < first):
                    first = at
            if first < 0:
                break
            start = max(position, first - hold)
            if start >= cut:
                break
            # A match holding the anchor at `first` starts at most `hold` bytes before it
            # and is at most `hold + 1` bytes long: this window holds all of it.
            match = pattern.search(low, start, min(size, first + hold + 1))
            if match is None or match.start() > first:
                for i, at in enumerate(upcoming):
                    if at == first:
                        upcoming[i] = find(anchors[i], first + 1)
                continue
            if match.start() >= cut:
                break
            out.append(data[position : match.start()])
            out.append(
                same_length_mask(match.end() - match.start()) if scrubber.same_length else REDACTED
            )
            self.found += 1
            position = match.end()
        keep_from = max(position, cut)
        out.append(data[position:keep_from])
        return b"".join(out), keep_from

    def end(self) -> bytes:
        if self.parts:  # shorter than declared (the upstream closed early)
            self.held += b"".join(self.parts)
        self.parts = None
        rest, self.held = self.held, b""
        if not rest:
            return b""
        scrubber = self.scrubber
        if not scrubber.anchors_in(rest.lower()):
            return rest  # every match holds an anchor: clean without running the pattern
        assert scrubber.pattern is not None
        clean, count = _redact(scrubber.pattern, rest, scrubber.same_length)
        self.found += count
        return clean


def _redact(
    pattern: re.Pattern[bytes], data: bytes, same_length: bool = False
) -> tuple[bytes, int]:
    """`data` with every match of `pattern` in its lower-cased text redacted, and the count."""
    out: list[bytes] = []
    last = 0
    for match in pattern.finditer(data.lower()):
        mask = same_length_mask(match.end() - match.start()) if same_length else REDACTED
        out += (data[last : match.start()], mask)
        last = match.end()
    if not out:
        return data, 0
    out.append(data[last:])
    return b"".join(out), len(out) // 2
