"""Decoding response bodies with a cap, and encoding them as the client accepts."""

from __future__ import annotations

import gzip
import os
import zlib

import brotli
import pytest

from keyproxy.response.codings import DecodeFailed, Decoder, choose_encoding, decode, encode

BODY = b'{"id": 1, "text": "' + os.urandom(16).hex().encode() * 500 + b'"}'
MiB = 1024 * 1024


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", None, "identity"])
def test_round_trip(coding: str | None) -> None:
    encoded = encode(BODY, coding)
    assert decode(encoded, coding, len(BODY)) == BODY
    with pytest.raises(DecodeFailed) as caught:
        decode(encoded, coding, len(BODY) - 1)
    assert caught.value.too_large


def test_reads_what_other_encoders_wrote() -> None:
    assert decode(gzip.compress(BODY), "gzip", MiB) == BODY
    assert decode(gzip.compress(BODY), "x-gzip", MiB) == BODY
    assert decode(zlib.compress(BODY), "deflate", MiB) == BODY
    raw = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    assert decode(raw.compress(BODY) + raw.flush(), "deflate", MiB) == BODY  # raw deflate
    assert decode(brotli.compress(BODY), "BR", MiB) == BODY


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_chunk_by_chunk_equals_whole(coding: str) -> None:
    encoded = encode(BODY, coding)
    decoder = Decoder(coding, MiB)
    out = b"".join(decoder.feed(encoded[i : i + 7]) for i in range(0, len(encoded), 7))
    assert out + decoder.end() == BODY


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_bombs_stop_at_the_cap_without_inflating(coding: str) -> None:
    bomb = encode(b"\0" * (48 * MiB), coding)
    assert len(bomb) < 60_000
    decoder = Decoder(coding, 8 * MiB)
    with pytest.raises(DecodeFailed) as caught:
        decoder.feed(bomb)
    assert caught.value.too_large and decoder.produced <= 8 * MiB


@pytest.mark.parametrize(
    ("data", "coding", "reason"),
    [
        (b"not gzip at all", "gzip", "corrupt"),
        (gzip.compress(BODY)[:-20], "gzip", "truncated"),
        (brotli.compress(BODY)[:-5], "br", "truncated"),
        (b"\xff\xff\xff\xff", "br", "corrupt"),
        (BODY, "compress", "cannot be decoded"),
        (BODY, "zstd", "cannot be decoded"),
        (BODY, "gzip, br", "stacked"),
    ],
)
def test_undecodable_bodies_fail(data: bytes, coding: str, reason: str) -> None:
    with pytest.raises(DecodeFailed) as caught:
        decode(data, coding, MiB)
    assert reason in caught.value.reason and not caught.value.too_large


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, None),
        ("", None),
        ("gzip, deflate, br", "gzip"),
        ("br", "br"),
        ("br;q=1, gzip;q=0.5", "br"),
        ("gzip;q=0, br;q=0.1", "br"),
        ("identity", None),
        ("*", "gzip"),
        ("*;q=0", None),
        ("gzip;q=0, *", "br"),
        ("zstd", None),
        ("gzip;q=oops", None),
        ("x-gzip", "gzip"),
    ],
)
def test_choose_encoding(accept: str | None, chosen: str | None) -> None:
    assert choose_encoding(accept) == chosen


HALVES = (b'[{"id": 1, "email": "a"},', b' {"id": 2, "email": "b"}]')


@pytest.mark.parametrize("step", [None, 1, 7])
def test_every_member_of_a_gzip_body_is_decoded(step: int | None) -> None:
    """A gzip body may hold several members (streaming servers write one per flush);
    readers (browsers, curl, Python's gzip) decode them all. Stopping after the first
    would serve a truncated body as if it were whole."""
    encoded = gzip.compress(HALVES[0]) + gzip.compress(HALVES[1])
    assert gzip.decompress(encoded) == b"".join(HALVES)
    decoder = Decoder("gzip", MiB)
    pieces = (
        [encoded] if step is None else [encoded[i : i + step] for i in range(0, len(encoded), step)]
    )
    assert b"".join(decoder.feed(p) for p in pieces) + decoder.end() == b"".join(HALVES)


def test_the_members_of_a_gzip_body_share_the_cap() -> None:
    member = gzip.compress(b"\0" * MiB)
    decoder = Decoder("gzip", 3 * MiB)
    with pytest.raises(DecodeFailed) as caught:
        decoder.feed(member * 4)
    assert caught.value.too_large and decoder.produced <= 3 * MiB


@pytest.mark.parametrize(
    ("data", "coding", "reason"),
    [
        (gzip.compress(BODY) + b"junk", "gzip", "corrupt"),
        (gzip.compress(BODY) + gzip.compress(BODY)[:-20], "gzip", "truncated"),
        (zlib.compress(BODY) + b"junk", "deflate", "after the end"),
        (zlib.compress(HALVES[0]) + zlib.compress(HALVES[1]), "deflate", "after the end"),
    ],
    ids=["gzip-junk", "gzip-truncated-member", "deflate-junk", "deflate-twice"],
)
def test_bytes_after_the_compressed_stream_are_refused(
    data: bytes, coding: str, reason: str
) -> None:
    """What follows the end of the stream is not silently dropped: the client would
    read it (or fail), so the body keyproxy checked would not be the one it is served."""
    with pytest.raises(DecodeFailed) as caught:
        decode(data, coding, MiB)
    assert reason in caught.value.reason
