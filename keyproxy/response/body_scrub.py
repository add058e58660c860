"""The upstream's secret kept out of response bodies, streaming, across chunk boundaries.

An Express redirect body ("Found. Redirecting to /posts?apikey=<secret>"), a
debug page or an endpoint echoing request headers would hand the upstream's
secret to any client. Every body is scanned for every spelling the header
scrubber knows (`keyproxy.response.headers.secret_spellings`), and each occurrence is
replaced by a fixed redaction.

Cheap when clean: every spelling declares anchors (a `%`, or a literal such
as the secret's longest run without a space), and a window with none of them
is passed after a few substring searches; the pattern runs only from just
before the first anchor.

Streaming without letting a byte out before it is known clean: each call to
`ScrubStream.feed` returns the bytes that can no longer be the start of a
spelling, and holds back the last `longest - 1` bytes (the longest text a
spelling can match), which the next chunk completes. `end` releases the rest.
A match that starts before the held tail always lies wholly within the bytes
seen, so the regular expression decides it on complete data.

With `same_length` each occurrence becomes a mask of its own byte length, so
the body keeps its length and its framing (the data path uses this); otherwise
the body changes length and the caller sends it chunked or buffers it. Compressed bodies must
be decoded first (`keyproxy.response.codings`): the scrubber reads bytes as
the client will read them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from keyproxy.response.headers import secret_forms, secret_spellings

REDACTED = b"[REDACTED]"


def _libc_finder() -> Callable[[bytes], Callable[..., int]] | None:
    """glibc's `memmem` (two-way search with SIMD) where the platform has it.

    `bytes.find` slows down badly on long needles whose characters are common in the
    body (its skip filter fills up): the six anchors of one secret took 213 µs on a
    64 KiB JSON body, `memmem` 30 µs, measured in-process on the benchmark machine.
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


class BodyScrubber:
    """The compiled spellings of one configuration snapshot; `stream()` per response."""

    __slots__ = ("anchors", "hold", "pattern", "plain", "same_length", "without_percent")

    def __init__(
        self,
        secrets: tuple[str, ...],
        basic: tuple[str, str] | None = None,
        same_length: bool = False,
    ) -> None:
        self.same_length = same_length
        spellings = secret_spellings(secrets, basic)
        anchors = tuple(dict.fromkeys(a for s in spellings for a in s.anchors))
        # An anchor holding another is found wherever that one is: one search less per chunk.
        self.anchors = tuple(a for a in anchors if not any(b != a and b in a for b in anchors))
        # Escaped spellings decode to a raw form: a chunk full of `%` (binary data,
        # URL-encoded text) is checked by decoding it once and searching the raw forms,
        # instead of running the per-character pattern around every `%`. A `%` and one hex
        # digit just before a spelling can swallow its first character when decoded, so
        # each form is searched without its first character too. Not for a secret holding
        # `%` (its raw `%` would decode) or both `+` and a space (only the pattern tells
        # those spellings apart).
        forms = sorted(secret_forms(secrets, basic), key=len, reverse=True)
        self.plain: re.Pattern[bytes] | None = None
        self.without_percent = self.anchors
        if forms and not any("%" in x or ("+" in x and " " in x) for x in secrets):
            heads_cut = [form[1:] for form in forms if len(form) > 1]
            self.plain = re.compile(b"|".join(map(re.escape, forms + heads_cut)))
            self.without_percent = tuple(a for a in self.anchors if a != b"%")
        if spellings:
            patterns = sorted((s.pattern for s in spellings), key=len, reverse=True)
            self.pattern: re.Pattern[bytes] | None = re.compile(b"|".join(patterns))
            self.hold = max(s.longest for s in spellings) - 1
        else:
            self.pattern = None
            self.hold = 0

    def __bool__(self) -> bool:
        return self.pattern is not None

    def stream(self) -> ScrubStream:
        assert self.pattern is not None
        stream = ScrubStream(self.pattern, self.hold, self.anchors, self.same_length)
        stream.plain = self.plain
        stream.without_percent = self.without_percent
        return stream

    def scrub(self, body: bytes) -> bytes:
        """A whole body at once (a buffered or cached one)."""
        if self.pattern is None:
            return body
        return _redact(self.pattern, body, self.same_length)[0]


class ScrubStream:
    """One response body: `feed` each chunk, then `end`; the concatenation is the clean body."""

    __slots__ = (
        "anchors",
        "found",
        "held",
        "hold",
        "pattern",
        "plain",
        "same_length",
        "without_percent",
    )

    def __init__(
        self,
        pattern: re.Pattern[bytes],
        hold: int,
        anchors: tuple[bytes, ...],
        same_length: bool = False,
    ) -> None:
        self.same_length = same_length
        self.pattern = pattern
        self.hold = hold
        self.anchors = anchors
        self.held = b""
        self.found = 0  # occurrences redacted so far (for a log line or a metric)
        self.plain: re.Pattern[bytes] | None = None  # the raw forms (see BodyScrubber)
        self.without_percent = anchors

    def feed(self, chunk: bytes) -> bytes:
        data = self.held + chunk if self.held else chunk
        size = len(data)
        hold = self.hold
        cut = size - hold  # bytes before `cut` cannot begin a spelling the next chunk completes
        if cut <= 0:
            self.held = data
            return b""
        anchors = self.anchors
        low = data.lower()  # the spellings are lower-cased; bytes.lower keeps every offset
        find = _FINDER(low) if _FINDER is not None and size > 2048 else low.find
        plain = self.plain
        if plain is not None and find(b"%") >= 0:
            decoded = unquote_to_bytes(low).lower()
            if plain.search(decoded) is None and (
                b"+" not in decoded or plain.search(decoded.replace(b"+", b" ")) is None
            ):
                # No escaped spelling lies wholly in `data`: `%` cannot start a match that
                # must be decided now (one reaching past `data` starts in the held tail).
                anchors = self.without_percent
        upcoming = [find(anchor) for anchor in anchors]
        pattern = self.pattern
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
                same_length_mask(match.end() - match.start()) if self.same_length else REDACTED
            )
            self.found += 1
            position = match.end()
        keep_from = max(position, cut)
        out.append(data[position:keep_from])
        self.held = data[keep_from:]
        return b"".join(out)

    def end(self) -> bytes:
        rest, self.held = self.held, b""
        if not rest:
            return b""
        low = rest.lower()
        if not any(anchor in low for anchor in self.anchors):
            return rest  # every match holds an anchor: clean without running the pattern
        clean, count = _redact(self.pattern, rest, self.same_length)
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
