"""Content codings of response bodies: decoded with a cap, encoded as the client accepts.

A body that must be filtered or scanned has to be read as the client will
read it, so it is decoded first. Decoding is incremental and every step is
bounded by what is still allowed, so a decompression bomb (a few KiB that
inflate to gigabytes) is stopped at the cap with at most the cap in memory.
A gzip body's members are decoded in turn (as browsers and curl read them); bytes
after the end of any other stream are refused, never dropped unseen.

gzip and deflate use zlib from the standard library; br uses Google's `brotli`
binding (its `output_buffer_limit` makes the same bounded loop possible).
"""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli

#: Encodings offered toward clients, preferred first: gzip is the cheapest to produce.
ENCODE_PREFERENCE = ("gzip", "br", "deflate")
_STEP = 64 * 1024  # output produced per decompression call
_GZIP_WBITS = 16 + zlib.MAX_WBITS


class DecodeFailed(Exception):
    """The body cannot be decoded: an unknown coding, corrupt data, or over the cap."""

    def __init__(self, reason: str, too_large: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.too_large = too_large


class _Inflater(Protocol):
    def feed(self, data: bytes, room: int) -> bytes: ...
    def end(self, room: int) -> bytes: ...


class _Zlib:
    def __init__(self, wbits: int) -> None:
        self.wbits = wbits
        self.obj = zlib.decompressobj(wbits)
        self.first = True

    def feed(self, data: bytes, room: int) -> bytes:
        if self.first and self.wbits == zlib.MAX_WBITS and data:
            self.first = False
            # `deflate` is meant to be zlib-wrapped, but servers send raw deflate too
            # (browsers accept both); the first byte tells them apart.
            if data[0] & 0x0F != 8:
                self.wbits = -zlib.MAX_WBITS
                self.obj = zlib.decompressobj(self.wbits)
        out = []
        while data:
            obj = self.obj
            if obj.eof:
                # Bytes after the end of the stream. Readers (browsers, curl) decode a gzip
                # body's next member; anything else they would read differently from us.
                if self.wbits != _GZIP_WBITS:
                    raise DecodeFailed("data after the end of the compressed stream")
                obj = self.obj = zlib.decompressobj(_GZIP_WBITS)
            chunk = obj.decompress(data, min(room, _STEP) + 1)
            room -= len(chunk)
            if room < 0:
                raise DecodeFailed("the decoded body is over the size limit", too_large=True)
            out.append(chunk)
            # At the end of a stream the rest is in unused_data; CPython may leave it in
            # unconsumed_tail as well, and an ended stream consumes nothing more, so
            # reading the tail there would loop forever (and grow unused_data each turn).
            data = obj.unused_data if obj.eof else obj.unconsumed_tail
        return b"".join(out)

    def end(self, room: int) -> bytes:
        rest = self.obj.flush(room + 1)
        if len(rest) > room:
            raise DecodeFailed("the decoded body is over the size limit", too_large=True)
        if not self.obj.eof:
            raise DecodeFailed("the compressed body is truncated")
        return rest


class _Brotli:
    def __init__(self) -> None:
        self.obj = brotli.Decompressor()

    def feed(self, data: bytes, room: int) -> bytes:
        out = []
        obj = self.obj
        chunk = obj.process(data, output_buffer_limit=min(room, _STEP) + 1)
        while True:
            room -= len(chunk)
            if room < 0:
                raise DecodeFailed("the decoded body is over the size limit", too_large=True)
            out.append(chunk)
            if obj.can_accept_more_data():
                return b"".join(out)
            chunk = obj.process(b"", output_buffer_limit=min(room, _STEP) + 1)

    def end(self, room: int) -> bytes:
        if not self.obj.is_finished():
            raise DecodeFailed("the compressed body is truncated")
        return b""


class Decoder:
    """Undo a `Content-Encoding` (one coding, as servers send) chunk by chunk, with a cap.

    `feed` returns the decoded bytes of a chunk; `end` checks the stream was
    complete. Either raises `DecodeFailed`; `too_large` tells a bomb or an
    oversize body from corrupt data.
    """

    def __init__(self, encoding: str | None, limit: int) -> None:
        coding = (encoding or "identity").strip().lower()
        if "," in coding:
            raise DecodeFailed(f"stacked content codings ({coding}) are not decoded")
        self.limit = limit
        self.produced = 0
        self.inflater: _Inflater | None
        if coding == "identity":
            self.inflater = None
        elif coding in ("gzip", "x-gzip"):
            self.inflater = _Zlib(_GZIP_WBITS)
        elif coding == "deflate":
            self.inflater = _Zlib(zlib.MAX_WBITS)
        elif coding == "br":
            self.inflater = _Brotli()
        else:
            raise DecodeFailed(f"the content coding {coding!r} cannot be decoded")

    def feed(self, data: bytes) -> bytes:
        room = self.limit - self.produced
        if self.inflater is None:
            if len(data) > room:
                raise DecodeFailed("the body is over the size limit", too_large=True)
            out = data
        else:
            try:
                out = self.inflater.feed(data, room)
            except (zlib.error, brotli.error) as error:
                raise DecodeFailed(f"corrupt compressed body ({type(error).__name__})") from None
        self.produced += len(out)
        return out

    def end(self) -> bytes:
        if self.inflater is None:
            return b""
        try:
            out = self.inflater.end(self.limit - self.produced)
        except (zlib.error, brotli.error) as error:
            raise DecodeFailed(f"corrupt compressed body ({type(error).__name__})") from None
        self.produced += len(out)
        return out


def decode(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The whole decoded body, or `DecodeFailed`."""
    decoder = Decoder(encoding, limit)
    return decoder.feed(body) + decoder.end()


def choose_encoding(accept_encoding: str | None) -> str | None:
    """The coding to send a re-serialised body in, or None for identity.

    Reads the client's `Accept-Encoding` with q-values; a coding with q=0 is
    refused, `*` stands for any not named. Identity is always acceptable here
    (keyproxy never answers 406), so None is the safe fallback.
    """
    if not accept_encoding:
        return None
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        q = 1.0
        params = params.strip().lower()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        if name:
            weights[name] = q
    star = weights.get("*", 0.0)
    best, best_q = None, 0.0
    for name in ENCODE_PREFERENCE:
        q = weights.get(name, weights.get("x-gzip", star) if name == "gzip" else star)
        if q > best_q:
            best, best_q = name, q
    return best


def encode(body: bytes, encoding: str | None) -> bytes:
    """`body` in `encoding` (gzip, br, deflate) or as it is for None/identity."""
    if encoding is None or encoding == "identity":
        return body
    if encoding == "gzip":
        compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return compressor.compress(body) + compressor.flush()
    if encoding == "deflate":
        return zlib.compress(body, 6)
    if encoding == "br":
        return brotli.compress(body, quality=4)
    raise ValueError(f"cannot encode as {encoding!r}")
