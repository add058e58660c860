"""The response pieces on bodies a real upstream sends (tests/upstream_server.py over a socket).

Until they are wired into the data path, these tests read the upstream
directly, chunk by chunk as the proxy would receive them, and run the
filter, the decoder and the body scrubber on those exact bytes.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

from keyproxy.response.body_scrub import REDACTED, BodyScrubber
from keyproxy.response.codings import Decoder
from keyproxy.response.fields import compile_fields, filter_body, filter_encoded
from tests.procs import UpstreamServer

HIDE = compile_fields("exclude", ["email", "author.phone"])


def fetch(upstream: UpstreamServer, path: str, headers: dict[str, str] | None = None):
    conn = http.client.HTTPConnection(upstream.host, upstream.port, timeout=10)
    conn.request("GET", path, headers={**upstream.header_secrets, **(headers or {})})
    return conn, conn.getresponse()


def chunks_of(response: http.client.HTTPResponse, size: int = 97) -> Iterator[bytes]:
    while chunk := response.read(size):
        yield chunk


def test_array_of_objects_from_the_upstream(upstream: UpstreamServer) -> None:
    conn, response = fetch(upstream, "/json/4096")
    body = response.read()
    conn.close()
    out = json.loads(filter_body(body, response.getheader("Content-Type"), HIDE))
    assert len(out) > 10 and len(out) == len(json.loads(body))
    assert all(
        "email" not in r and "phone" not in r["author"] and "name" in r["author"] for r in out
    )


def test_chunked_ndjson_from_the_upstream(upstream: UpstreamServer) -> None:
    conn, response = fetch(upstream, "/ndjson/25")
    assert response.getheader("Transfer-Encoding") == "chunked"
    body = b"".join(chunks_of(response))
    conn.close()
    out = filter_body(body, response.getheader("Content-Type"), HIDE)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in lines] == list(range(25))
    assert all("email" not in r for r in lines)


def test_gzip_body_from_the_upstream_is_filtered_and_reencoded(upstream: UpstreamServer) -> None:
    conn, response = fetch(upstream, "/gzip?size=8192", {"Accept-Encoding": "gzip"})
    raw = response.read()
    conn.close()
    assert response.getheader("Content-Encoding") == "gzip"
    out, coding = filter_encoded(
        raw, response.getheader("Content-Type"), "gzip", "br;q=1, gzip;q=0.5", HIDE
    )
    decoder = Decoder(coding, 1 << 20)
    records = json.loads(decoder.feed(out) + decoder.end())
    assert coding == "br" and records and all("email" not in r for r in records)


def test_the_secret_echoed_in_a_body_is_scrubbed_chunk_by_chunk(upstream: UpstreamServer) -> None:
    """/echo returns the request headers, the upstream secret among them, in its body."""
    conn, response = fetch(upstream, "/echo/debug")
    scrubber = BodyScrubber(tuple(upstream.secrets))
    stream = scrubber.stream()
    secret = upstream.secrets[0].encode()
    pieces = [stream.feed(chunk) for chunk in chunks_of(response, 7)]
    pieces.append(stream.end())
    conn.close()
    assert all(secret not in piece for piece in pieces)
    body = b"".join(pieces)
    assert secret not in body and REDACTED in body and stream.found == 1
    assert json.loads(body)["path"] == "/echo/debug"  # still valid JSON
