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
