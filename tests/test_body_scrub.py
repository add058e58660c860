"""The streaming body scrubber: every spelling, split anywhere, nothing early."""

from __future__ import annotations

import base64
import gzip
import html
import json
import re
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyproxy.response.body_scrub import (
    REDACTED,
    REMEMBERED_CLEAN_BODIES,
    REMEMBERED_CLEAN_BODY,
    BodyScrubber,
)
from keyproxy.response.codings import Decoder
from keyproxy.response.headers import secret_spellings

SECRET = "s3cr3t/key with space+plus"
BASIC = ("svc", "basic-pass-123")
SCRUBBER = BodyScrubber((SECRET, "other-secret-xyz"), BASIC)
PAIR = f"{BASIC[0]}:{BASIC[1]}".encode()

SPELLINGS = [
    SECRET.encode(),
    quote(SECRET, safe="").encode(),
    quote(SECRET, safe="").lower().encode(),
    SECRET.replace(" ", "+").encode(),
    b"other-secret-xyz",
    base64.b64encode(PAIR),
    base64.urlsafe_b64encode(PAIR).rstrip(b"="),
]


def stream_all(chunks: list[bytes]) -> tuple[bytes, list[bytes]]:
    stream = SCRUBBER.stream()
    outs = [stream.feed(c) for c in chunks]
    outs.append(stream.end())
    return b"".join(outs), outs


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_split_at_every_position_is_redacted(spelling: bytes) -> None:
    body = b"Found. Redirecting to /posts?apikey=" + spelling + b"&page=2"
    for cut in range(len(body) + 1):
        out, _ = stream_all([body[:cut], body[cut:]])
        assert spelling not in out and REDACTED in out, cut
        assert out.startswith(b"Found. Redirecting to /posts?apikey=") and out.endswith(b"&page=2")


def test_split_into_single_bytes() -> None:
    body = b"x" * 10 + SECRET.encode() + b"y" * 10 + quote(SECRET).encode()
    out, outs = stream_all([bytes([b]) for b in body])
    assert out == b"x" * 10 + REDACTED + b"y" * 10 + REDACTED
    assert all(SECRET.encode()[:4] not in piece for piece in outs)


def test_no_byte_leaves_before_it_is_known_clean() -> None:
    """Every prefix of a spelling stays held until the chunk that completes or breaks it."""
    secret = SECRET.encode()
    stream = SCRUBBER.stream()
    sent = stream.feed(b"head " + secret[:-1])
    assert secret[:2] not in sent  # not even the first bytes of the secret have left
    long_body = b"z" * 500 + secret[:-1]
    stream2 = SCRUBBER.stream()
    assert stream2.feed(long_body) == b"z" * (len(long_body) - SCRUBBER.hold)
    rest = stream.feed(secret[-1:] + b" tail") + stream.end()
    assert sent + rest == b"head " + REDACTED + b" tail"


def test_clean_bodies_come_back_identical_and_held_tail_is_bounded() -> None:
    body = bytes(range(256)) * 300
    stream = SCRUBBER.stream()
    first = stream.feed(body)
    assert len(body) - len(first) == SCRUBBER.hold
    assert first + stream.end() == body
    assert (
        SCRUBBER.hold
        == max(
            s.longest for s in secret_spellings((SECRET, "other-secret-xyz"), BASIC, markup=True)
        )
        - 1
    )


def test_declared_lengths_cover_every_spelling() -> None:
    """The hold-back relies on each spelling's declared longest match."""
    for pattern, longest, _ in secret_spellings((SECRET,), BASIC):
        compiled = re.compile(pattern)
        for spelling in SPELLINGS:
            match = compiled.search(spelling)
            if match:
                assert len(match.group()) <= longest
    percent_all = "".join(f"%{b:02X}" for b in SECRET.encode()).encode()
    assert SCRUBBER.scrub(percent_all) == REDACTED


def test_secret_inside_a_gzip_body_is_found_after_decoding() -> None:
    body = gzip.compress(b'{"headers": {"X-Upstream-Key": "' + SECRET.encode() + b'"}}')
    decoder, stream = Decoder("gzip", 1 << 20), SCRUBBER.stream()
    out = b"".join(stream.feed(decoder.feed(body[i : i + 5])) for i in range(0, len(body), 5))
    out += stream.feed(decoder.end()) + stream.end()
    assert out == b'{"headers": {"X-Upstream-Key": "' + REDACTED + b'"}}'
    assert stream.found == 1


def test_without_secrets_the_scrubber_is_off() -> None:
    assert not BodyScrubber(())
    assert BodyScrubber(()).scrub(b"anything") == b"anything"


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b"%", b"s3", b" ", b"+", *SPELLINGS]), max_size=30),
    st.lists(st.integers(0, 400), max_size=8),
)
def test_streaming_equals_scrubbing_the_whole_body(parts: list[bytes], cuts: list[int]) -> None:
    body = b"".join(parts)
    points = sorted({min(c, len(body)) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    out, _ = stream_all(chunks)
    assert out == SCRUBBER.scrub(body)
    for spelling in SPELLINGS:
        assert spelling not in out


@st.composite
def mixed_spelling(draw: st.DrawFn) -> bytes:
    """The secret with each byte raw, %XX or %xx (a space also as +), chosen at random."""
    out = []
    for byte in SECRET.encode():
        options = [bytes([byte]), b"%%%02X" % byte, b"%%%02x" % byte]
        if byte == 0x20:
            options.append(b"+")
        out.append(draw(st.sampled_from(options)))
    return b"".join(out)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        mixed_spelling() | st.sampled_from([b"%", b"%2", b"s3cr", b"x" * 50, b"%25"]), max_size=12
    ),
    st.lists(st.integers(0, 600), max_size=6),
)
def test_mixed_spellings_amid_percent_noise(parts: list[bytes], cuts: list[int]) -> None:
    body = b"".join(parts)
    points = sorted({min(c, len(body)) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    out, _ = stream_all(chunks)
    assert out == SCRUBBER.scrub(body)
    assert SCRUBBER.scrub(out) == out  # nothing left to find


def test_a_spelling_after_a_percent_and_one_hex_digit_is_still_found() -> None:
    """`%f` + `abc%2Fd...` decodes as `\\xfa` + `bc/d...`: the fast check must not miss it."""
    scrubber = BodyScrubber(("abcdef/ghij-klmn",), None, same_length=True)
    spelled = quote("abcdef/ghij-klmn", safe="").encode()
    tail = b"y" * 100  # longer than what is held back: decided in `feed`, not `end`
    for body in (b"x%f" + spelled + tail, b"%" * 300 + b"%f" + spelled + tail, b"%2" + spelled):
        stream = scrubber.stream()
        out = stream.feed(body) + stream.end()
        assert spelled not in out and len(out) == len(body), body


def test_percent_heavy_bodies_are_scanned_whole() -> None:
    """Binary data (a `%` every 256 bytes) holding the secret once, escaped and raw."""
    scrubber = BodyScrubber((SECRET,), BASIC, same_length=True)
    body = bytes(range(256)) * 64 + quote(SECRET, safe="").encode() + bytes(range(256)) * 64
    body += SECRET.encode()
    stream = scrubber.stream()
    out = b"".join(stream.feed(body[i : i + 4096]) for i in range(0, len(body), 4096))
    out += stream.end()
    assert len(out) == len(body) and stream.found == 2
    assert quote(SECRET, safe="").encode() not in out and SECRET.encode() not in out


def test_large_chunks_scan_the_same_with_and_without_memmem(monkeypatch) -> None:
    """Chunks over 2 KiB are searched with libc's memmem: the result must be the same bytes."""
    import random
    from urllib.parse import quote

    from keyproxy.response import body_scrub

    secret = "s3cr3t-upstream-key-abcdef0123456789"
    spellings = [
        secret.encode(),
        secret.upper().encode(),
        quote(secret, safe="").encode(),
        secret.encode().hex().encode(),
        base64.b64encode(secret.encode()),
    ]
    rng = random.Random(7)
    scrubber = body_scrub.BodyScrubber((secret,), None, same_length=True)

    def scan(body: bytes, sizes: list[int]) -> bytes:
        stream, out, at = scrubber.stream(), [], 0
        for size in sizes:
            out.append(stream.feed(body[at : at + size]))
            at += size
        out.append(stream.feed(body[at:]))
        out.append(stream.end())
        return b"".join(out)

    assert body_scrub._FINDER is not None  # glibc here: the fast path is the one tested
    for _ in range(40):
        parts = [bytes(rng.choice(b'{}":,abcxyz019 %') for _ in range(rng.randrange(3000)))]
        for _ in range(rng.randrange(4)):
            parts += [rng.choice(spellings), bytes(rng.choice(b"ax%9") for _ in range(500))]
        body = b"".join(parts)
        sizes = [rng.randrange(1, 20000) for _ in range(3)]
        fast = scan(body, sizes)
        with monkeypatch.context() as m:
            m.setattr(body_scrub, "_FINDER", None)
            slow = scan(body, sizes)
        assert fast == slow and len(fast) == len(body)
        for spelling in spellings:
            assert spelling.lower() not in fast.lower()


def test_a_spelling_right_after_a_bare_percent_is_still_found() -> None:
    """`%` + `ab` decodes as one byte: `%` + `abcdef%2Fghij-klmn` decodes to `\\xab` +
    `cdef/ghij-klmn`, so the decoded check must not need the first two characters."""
    scrubber = BodyScrubber(("abcdef/ghij-klmn",), None, same_length=True)
    spelled = quote("abcdef/ghij-klmn", safe="").encode()
    tail = b"y" * 100  # decided in `feed`, not in `end`
    for body in (b"x%" + spelled + tail, b"%25%" + spelled + tail, b"%" * 300 + spelled + tail):
        for length in (None, len(body)):
            stream = scrubber.stream(length)
            out = stream.feed(body) + stream.end()
            assert spelled not in out and len(out) == len(body), (body, length)
            assert stream.found == 1
        assert spelled not in scrubber.scrub(body)


def test_a_percent_that_cannot_begin_an_escape_of_the_secret_costs_no_pattern_run() -> None:
    """Binary data has a `%` every 256 bytes; `%&` escapes nothing, so the chunk is clean
    after the literal searches, and the output is the input, byte for byte."""
    secret = "bench/body-secret-0123456789"
    scrubber = BodyScrubber((secret,), BASIC, same_length=True)
    body = bytes(range(256)) * 64
    assert scrubber.anchors_in(body.lower()) == []
    stream = scrubber.stream(len(body))
    assert stream.feed(body) == body and stream.end() == b""
    escaped = body + quote(secret, safe="").encode()  # a real escape of the secret's bytes
    assert b"%" in scrubber.anchors_in(escaped.lower())


def test_with_a_declared_length_the_last_chunk_is_scanned_to_its_end() -> None:
    """A body of known length holds nothing back once its last byte is in: one piece
    goes out whole from `feed`, and `end` has nothing left."""
    body = b"z" * 500 + SECRET.encode()  # the secret in the last bytes
    stream = SCRUBBER.stream(len(body))
    out = stream.feed(body)
    assert out == b"z" * 500 + REDACTED and stream.end() == b""
    big = b"q" * 200_000 + SECRET.encode()  # over the size held whole: streamed, then ended
    stream = SCRUBBER.stream(len(big))
    first = stream.feed(big[:100_000])
    assert len(first) == 100_000 - SCRUBBER.hold
    assert first + stream.feed(big[100_000:]) == b"q" * 200_000 + REDACTED
    assert stream.end() == b""
    short = SCRUBBER.stream(len(body) + 10)  # the upstream closed early: `end` has it all
    assert short.feed(body) == b"" and short.end() == b"z" * 500 + REDACTED


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b"%", b"%2", b"s3", b" ", b"+", *SPELLINGS]), max_size=30),
    st.lists(st.integers(0, 400), max_size=8),
    st.integers(0, 2),
)
def test_streaming_with_a_declared_length_equals_scrubbing_the_whole_body(
    parts: list[bytes], cuts: list[int], short: int
) -> None:
    body = b"".join(parts)
    points = sorted({min(c, len(body)) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    stream = SCRUBBER.stream(len(body) + short)  # `short`: the body ends before its length
    out = b"".join(stream.feed(c) for c in chunks) + stream.end()
    assert out == SCRUBBER.scrub(body)
    for spelling in SPELLINGS:
        assert spelling not in out


# ------------------------------------------------- JSON and HTML escapes of the secret

#: A secret with every character JSON or HTML encoders like to escape.
ODD_SECRET = "k3y/with&odd<chars>\"'+plus"
ODD = BodyScrubber((ODD_SECRET,), None, same_length=True)


def _every_byte(text: str, template: str) -> str:
    return "".join(template % ord(c) for c in text)


#: How common encoders write the secret into a JSON string or an HTML page.
JSON_STYLES = {
    "python json.dumps": json.dumps(ODD_SECRET)[1:-1],
    "php json_encode": json.dumps(ODD_SECRET)[1:-1].replace("/", "\\/"),
    "go encoding/json": json.dumps(ODD_SECRET)[1:-1]
    .replace("<", "\\u003c")
    .replace(">", "\\u003e")
    .replace("&", "\\u0026"),
    "every byte": _every_byte(ODD_SECRET, "\\u%04x"),
    "every byte, upper-case hex": _every_byte(ODD_SECRET, "\\u%04X"),
}
HTML_STYLES = {
    "python html.escape": html.escape(ODD_SECRET),
    "php htmlspecialchars": html.escape(ODD_SECRET).replace("&#x27;", "&#039;"),
    "every byte, decimal": _every_byte(ODD_SECRET, "&#%d;"),
    "every byte, hex": _every_byte(ODD_SECRET, "&#X%02X;"),
    "every byte, padded hex": _every_byte(ODD_SECRET, "&#x00%02x;"),
    "every byte, decimal padded to 7 digits": _every_byte(ODD_SECRET, "&#%07d;"),
    "every byte, hex padded to 8 digits": _every_byte(ODD_SECRET, "&#x%08x;"),
    "php, padded": html.escape(ODD_SECRET).replace("&#x27;", "&#0000039;"),
}


@pytest.mark.parametrize("style", JSON_STYLES)
def test_a_json_escaped_secret_is_redacted_split_anywhere(style: str) -> None:
    """A JSON client reads `\\u0026` or `\\/` as the character: the redaction must too."""
    body = b'{"echo":"' + JSON_STYLES[style].encode() + b'","tail":"' + b"t" * 40 + b'"}'
    assert json.loads(body)["echo"] == ODD_SECRET
    for cut in range(len(body) + 1):
        stream = ODD.stream()
        out = stream.feed(body[:cut]) + stream.feed(body[cut:]) + stream.end()
        assert len(out) == len(body) and stream.found == 1, cut
        assert ODD_SECRET not in json.loads(out)["echo"], cut
    assert json.loads(ODD.scrub(body))["echo"].startswith("[REDACTED]")


@pytest.mark.parametrize("style", HTML_STYLES)
def test_an_html_escaped_secret_is_redacted_split_anywhere(style: str) -> None:
    """A browser shows `&amp;` or `&#107;` as the character: the redaction must see it so."""
    body = b"<td>" + HTML_STYLES[style].encode() + b"</td>" + b"<p>more</p>" * 10
    assert ODD_SECRET in html.unescape(body.decode())
    for cut in range(len(body) + 1):
        stream = ODD.stream(len(body) if cut % 2 else None)
        out = stream.feed(body[:cut]) + stream.feed(body[cut:]) + stream.end()
        assert len(out) == len(body) and stream.found == 1, cut
        assert ODD_SECRET not in html.unescape(out.decode()), cut
        assert out.endswith(b"<p>more</p>" * 10)


@pytest.mark.parametrize("zeros", [3, 40, 400])
def test_references_padded_past_the_hold_never_spell_the_secret(zeros: int) -> None:
    """A browser reads `&#` and any number of zeros before the code: a spelling of such
    references can be longer than what the stream holds back, so each one of a secret's
    byte is masked wherever it is, and one cut off at the end of what is in hand too."""
    padded = "".join(f"&#{'0' * zeros}{ord(c)};" for c in "k3y") + ODD_SECRET[3:]
    body = b"<td>" + padded.encode() + b"</td>" + b"<p>more</p>" * 10
    assert ODD_SECRET in html.unescape(body.decode())
    for size in (1, 7, 64, 500, len(body)):
        for length in (None, len(body)):
            stream = ODD.stream(length)
            chunks = [body[i : i + size] for i in range(0, len(body), size)]
            out = b"".join(stream.feed(c) for c in chunks) + stream.end()
            assert len(out) == len(body) and out.endswith(b"<p>more</p>" * 10), size
            assert ODD_SECRET[:3] not in html.unescape(out.decode()), (size, length)
    assert ODD.scrub(body).startswith(b"<td>[REDACTED]")
    # Padded references of bytes no spelling of the secret holds are left as they are.
    other = b"<p>&#0000033;&#x0000003b;&#00000061;</p>"
    assert ODD.scrub(other) == other


def test_a_secret_in_a_javascript_string_is_redacted() -> None:
    """Rails' `escape_javascript` writes `\\'` and `<\\/`: a script reads the secret back."""
    escaped = ODD_SECRET.replace("\\", "\\\\").replace("'", "\\'").replace('"', '\\"')
    body = b"<script>var key = '" + escaped.replace("/", "\\/").encode() + b"';</script>"
    for cut in range(len(body) + 1):
        stream = ODD.stream()
        out = stream.feed(body[:cut]) + stream.feed(body[cut:]) + stream.end()
        assert stream.found == 1 and out.startswith(b"<script>var key = '[REDACTED]"), cut
        assert out.endswith(b"';</script>") and len(out) == len(body)


@st.composite
def markup_spelling(draw: st.DrawFn) -> bytes:
    """The secret with each byte raw, percent-, JSON- or HTML-escaped, chosen at random."""
    out = []
    for byte in ODD_SECRET.encode():
        options = [bytes([byte]), b"%%%02X" % byte, b"\\u%04x" % byte, b"\\u%04X" % byte]
        options += [b"&#%d;" % byte, b"&#x%x;" % byte, b"&#0%d;" % byte, b"&#0000%d;" % byte]
        out.append(draw(st.sampled_from(options)))
    return b"".join(out)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        markup_spelling() | st.sampled_from([b"\\", b"&", b"&#", b"\\u00", b"k3y", b"%"]),
        max_size=10,
    ),
    st.lists(st.integers(0, 900), max_size=6),
)
def test_mixed_escapes_stream_as_they_scrub_whole(parts: list[bytes], cuts: list[int]) -> None:
    body = b"".join(parts)
    points = sorted({min(c, len(body)) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    stream = ODD.stream()
    out = b"".join(stream.feed(c) for c in chunks) + stream.end()
    assert out == ODD.scrub(body) and len(out) == len(body)
    assert ODD.scrub(out) == out  # nothing left to find
    for part in parts:
        if len(part) > 20:  # a whole spelling
            assert part not in out


def test_escapes_that_cannot_spell_the_secret_cost_no_pattern_run() -> None:
    """JSON full of `\\"` and `\\n`, HTML full of `&amp;` and `&nbsp;`: the secret holds none
    of those characters, so the chunk is clean after the literal searches."""
    scrubber = BodyScrubber(("bench-body-secret-0123456789",), None, same_length=True)
    json_body = json.dumps([{"quote": 'say "hi"\n', "url": "a/b"}] * 200).encode()
    html_body = b"<p>fish &amp; chips&nbsp;&lt;3</p>" * 200
    for body in (json_body, html_body, json_body + b"\\u0062ench", html_body + b"&#98;ench"):
        assert scrubber.anchors_in(body.lower()) == [], body[-20:]
        stream = scrubber.stream(len(body))
        assert stream.feed(body) == body and stream.end() == b""
    escaped = json_body + _every_byte("bench-body-secret-0123456789", "\\u%04x").encode()
    assert b"\\" in scrubber.anchors_in(escaped.lower())
    mask = b"[REDACTED]" + b"*" * (len(escaped) - len(json_body) - 10)
    assert scrubber.scrub(escaped).endswith(mask)


def test_small_clean_bodies_are_remembered_and_bounded() -> None:
    scrubber = BodyScrubber((SECRET,), BASIC, same_length=True)
    clean = b'{"id": 1, "title": "post"}'
    assert scrubber.scrub(clean) is clean and clean in scrubber.clean
    assert scrubber.scrub(bytes(bytearray(clean))) == clean  # a repeat: remembered
    leaked = b'{"echo": "' + SECRET.encode() + b'"}'
    for _ in range(2):  # a body with a spelling is redacted every time, never remembered
        assert SECRET.encode() not in scrubber.scrub(leaked)
    assert leaked not in scrubber.clean
    big = b"x" * (REMEMBERED_CLEAN_BODY + 1)
    assert scrubber.scrub(big) is big and big not in scrubber.clean
    for i in range(REMEMBERED_CLEAN_BODIES + 5):
        scrubber.scrub(b"body %d" % i)
    assert len(scrubber.clean) <= REMEMBERED_CLEAN_BODIES
    assert BodyScrubber((SECRET,), BASIC).clean == set()  # each snapshot starts empty
