"""The recording upstream and the process helpers, over real sockets.

Proxy tests trust these records to prove what did and did not reach the
backend, so the recorder itself must be shown to see the wire faithfully:
raw request targets, every header line in order with repeats, exact bodies.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import json
import socket
import sys
import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.procs import (
    Process,
    ProcessError,
    UpstreamServer,
    free_port,
    spawn,
    start_upstream,
)
from tests.upstream_server import big_body

SECRET = "up-" + "s3cret" * 4
AUTH = {"X-API-Key": SECRET}


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with start_upstream(header_secrets=AUTH) as server:
        yield server


@pytest.fixture(scope="module")
def strict_upstream() -> Iterator[UpstreamServer]:
    """All three secret forms at once: each must be present for a request to pass."""
    with start_upstream(
        header_secrets=AUTH, basic=("svc", "b4sic-pass"), query_secrets={"apikey": "q-secret"}
    ) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_records(request: pytest.FixtureRequest) -> None:
    for name in ("upstream", "strict_upstream"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()


def call(
    server: UpstreamServer,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def raw_exchange(server: UpstreamServer, request: bytes) -> bytes:
    """Send bytes exactly as given; http.client would normalise what these tests probe."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# --- the secret ------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": "wrong"}, {"X-API-Key": SECRET.upper()}, {"Authorization": SECRET}],
)
def test_requests_without_the_exact_secret_are_refused(
    upstream: UpstreamServer, headers: dict[str, str]
) -> None:
    status, response_headers, body = call(upstream, "GET", "/echo/x", headers)
    assert status == 401
    assert response_headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {"error": "bad upstream secret"}
    [record] = upstream.records()
    assert record["authorized"] is False and record["status"] == 401


def test_a_repeated_secret_header_is_refused(upstream: UpstreamServer) -> None:
    response = raw_exchange(
        upstream,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-API-Key: "
        + SECRET.encode()
        + b"\r\nX-API-Key: "
        + SECRET.encode()
        + b"\r\nConnection: close\r\n\r\n",
    )
    assert response.startswith(b"HTTP/1.1 401 ")


def test_the_secret_is_accepted(upstream: UpstreamServer) -> None:
    status, _, body = call(upstream, "GET", "/echo/x", AUTH)
    assert status == 200
    assert json.loads(body)["path"] == "/echo/x"
    assert upstream.records()[0]["authorized"] is True


def test_every_configured_secret_form_is_required(strict_upstream: UpstreamServer) -> None:
    basic = "Basic " + base64.b64encode(b"svc:b4sic-pass").decode()
    full = {**AUTH, "Authorization": basic}
    assert call(strict_upstream, "GET", "/echo?apikey=q-secret", full)[0] == 200
    assert call(strict_upstream, "GET", "/echo", full)[0] == 401
    assert call(strict_upstream, "GET", "/echo?apikey=q-secret&apikey=q-secret", full)[0] == 401
    assert call(strict_upstream, "GET", "/echo?apikey=q-secret", AUTH)[0] == 401
    wrong_basic = {**AUTH, "Authorization": "Basic " + base64.b64encode(b"svc:nope").decode()}
    assert call(strict_upstream, "GET", "/echo?apikey=q-secret", wrong_basic)[0] == 401
    assert call(strict_upstream, "GET", "/echo?apikey=q-secret", {"Authorization": basic})[0] == 401


def test_inject_describes_what_the_proxy_must_add(strict_upstream: UpstreamServer) -> None:
    assert strict_upstream.inject() == {
        "headers": AUTH,
        "basic": {"username": "svc", "password": "b4sic-pass"},
        "query": {"apikey": "q-secret"},
    }
    assert set(strict_upstream.secrets) == {SECRET, "b4sic-pass", "q-secret"}


# --- the recorder ----------------------------------------------------------


def test_records_keep_the_wire_form(upstream: UpstreamServer) -> None:
    body = b"hello=world"
    response = raw_exchange(
        upstream,
        b"POST /a%2Fb/./c?x=%2F&y=1 HTTP/1.1\r\n"
        b"Host: example.test\r\n"
        b"X-Api-Key: " + SECRET.encode() + b"\r\n"
        b"X-Dup: one\r\n"
        b"x-dup: two\r\n"
        b"X-Dup: one\r\n"
        b"Content-Length: 11\r\n"
        b"Connection: close\r\n\r\n" + body,
    )
    assert response.startswith(b"HTTP/1.1 200 ")
    [record] = upstream.records()
    assert record["method"] == "POST"
    assert record["raw_path"] == "/a%2Fb/./c?x=%2F&y=1"
    assert record["version"] == "1.1"
    assert record["headers"] == [
        ["Host", "example.test"],
        ["X-Api-Key", SECRET],
        ["X-Dup", "one"],
        ["x-dup", "two"],
        ["X-Dup", "one"],
        ["Content-Length", "11"],
        ["Connection", "close"],
    ]
    assert record["body_len"] == 11
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert record["body"] == "hello=world"
    assert record["status"] == 200


def test_chunked_request_bodies_are_measured_after_decoding(upstream: UpstreamServer) -> None:
    raw_exchange(
        upstream,
        b"PUT /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: " + SECRET.encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    [record] = upstream.records()
    assert record["body_len"] == 11
    assert record["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()


def test_control_endpoints_need_no_secret_and_are_not_recorded(upstream: UpstreamServer) -> None:
    call(upstream, "GET", "/echo/1", AUTH)
    call(upstream, "GET", "/echo/2")
    assert [r["raw_path"] for r in upstream.records()] == ["/echo/1", "/echo/2"]
    assert [r["seq"] for r in upstream.records()] == sorted(r["seq"] for r in upstream.records())
    assert call(upstream, "GET", "/json/lots", AUTH)[0] == 400
    assert upstream.records()[-1]["status"] == 400
    upstream.reset()
    assert upstream.records() == []


# --- behaviour endpoints ---------------------------------------------------


def test_echo_reports_the_request(upstream: UpstreamServer) -> None:
    payload = b'{"a": 1}'
    status, _, body = call(
        upstream, "PATCH", "/echo/x%20y?q=1", {**AUTH, "Content-Type": "application/json"}, payload
    )
    assert status == 200
    echoed = json.loads(body)
    assert echoed["method"] == "PATCH"
    assert echoed["path"] == "/echo/x%20y"
    assert echoed["query"] == "q=1"
    assert ["X-API-Key", SECRET] in echoed["headers"]
    assert echoed["body_len"] == len(payload)
    assert echoed["body_sha256"] == hashlib.sha256(payload).hexdigest()


def test_unknown_paths_are_echoed_so_example_routes_work(upstream: UpstreamServer) -> None:
    status, _, body = call(upstream, "DELETE", "/v1/data/posts/7", AUTH)
    assert status == 200
    assert json.loads(body)["path"] == "/v1/data/posts/7"


def test_sized_bodies(upstream: UpstreamServer) -> None:
    status, headers, body = call(upstream, "GET", "/json/10000", AUTH)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    items = json.loads(body)
    assert 9000 < len(body) <= 10000
    assert {"email", "author"} <= items[0].keys() and "phone" in items[0]["author"]

    status, headers, body = call(upstream, "GET", "/big/300000", AUTH)
    assert status == 200
    assert headers["Content-Length"] == "300000" and "Transfer-Encoding" not in headers
    assert body == big_body(300000)
    assert headers["X-Body-Sha256"] == hashlib.sha256(body).hexdigest()


async def test_chunked_responses_arrive_in_pieces(upstream: UpstreamServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{upstream.url}/chunked/4?delay_ms=30", headers=AUTH) as response,
    ):
        assert response.headers["Transfer-Encoding"] == "chunked"
        pieces = [data async for data, _ in response.content.iter_chunks()]
    assert b"".join(pieces) == b"chunk 0\nchunk 1\nchunk 2\nchunk 3\n"
    assert len(pieces) > 1

    _, headers, body = call(upstream, "GET", "/ndjson/5", AUTH)
    assert headers["Content-Type"] == "application/x-ndjson"
    assert [json.loads(line)["id"] for line in body.splitlines()] == [0, 1, 2, 3, 4]


def test_statuses_without_bodies(upstream: UpstreamServer) -> None:
    for code in (204, 304):
        status, _, body = call(upstream, "GET", f"/status/{code}", AUTH)
        assert (status, body) == (code, b"")
    status, _, body = call(upstream, "GET", "/status/503", AUTH)
    assert status == 503 and json.loads(body) == {"status": 503}


def test_redirect_and_leak_carry_every_secret(strict_upstream: UpstreamServer) -> None:
    auth = {**AUTH, "Authorization": "Basic " + base64.b64encode(b"svc:b4sic-pass").decode()}
    status, headers, _ = call(strict_upstream, "GET", "/redirect?apikey=q-secret", auth)
    assert status == 302
    assert headers["Location"] == f"{strict_upstream.url}/next?apikey=q-secret"

    status, headers, _ = call(strict_upstream, "GET", "/leak?apikey=q-secret", auth)
    assert status == 200
    assert headers["X-API-Key"] == SECRET
    assert headers["X-Echo-Authorization"] == auth["Authorization"]
    assert set(headers.get_all("X-Echo-Key")) == {
        SECRET,
        "q-secret",
        "b4sic-pass",
        auth["Authorization"],
    }
    assert f"sess={SECRET}; Path=/; HttpOnly" in headers.get_all("Set-Cookie")
    assert any("apikey=q-secret" in link for link in headers.get_all("Link"))


def test_hop_by_hop_headers(upstream: UpstreamServer) -> None:
    _, headers, _ = call(upstream, "GET", "/hop", AUTH)
    assert headers["Connection"] == "close, X-Private"
    for name in ("X-Private", "Keep-Alive", "Proxy-Authenticate", "Upgrade", "X-End-To-End"):
        assert name in headers


def test_crashes_break_the_connection(upstream: UpstreamServer) -> None:
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        call(upstream, "GET", "/crash", AUTH)
    with pytest.raises(http.client.IncompleteRead):
        call(upstream, "GET", "/crash-mid-body", AUTH)
    assert [(r["status"], r["aborted"]) for r in upstream.records()] == [(None, True)] * 2
    assert call(upstream, "GET", "/echo", AUTH)[0] == 200  # the server itself survives


def test_a_client_hanging_up_mid_stream_is_recorded_quietly(upstream: UpstreamServer) -> None:
    with socket.create_connection((upstream.host, upstream.port), timeout=5) as sock:
        sock.sendall(
            b"GET /chunked/50?delay_ms=10 HTTP/1.1\r\nHost: x\r\nX-API-Key: "
            + SECRET.encode()
            + b"\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
    deadline = time.monotonic() + 5
    while not upstream.records()[0]["client_gone"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "Traceback" not in upstream.process.stderr


def test_gzip(upstream: UpstreamServer) -> None:
    status, headers, body = call(upstream, "GET", "/gzip?size=5000", AUTH)
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert len(json.loads(gzip.decompress(body))) > 10


def test_upload_and_slow_endpoints(upstream: UpstreamServer) -> None:
    payload = bytes(range(256)) * 4096
    status, _, body = call(upstream, "POST", "/upload", AUTH, payload)
    assert status == 200
    assert json.loads(body) == {
        "body_len": len(payload),
        "body_sha256": hashlib.sha256(payload).hexdigest(),
    }
    assert upstream.records()[0]["body"] is None  # too big to keep, only measured
    assert json.loads(call(upstream, "GET", "/slow/50", AUTH)[2]) == {"slept_ms": 50}
    assert json.loads(call(upstream, "GET", "/slow-body/50", AUTH)[2]) == {"slept_ms": 50}


# --- process helpers -------------------------------------------------------


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_failure_to_start_shows_the_output() -> None:
    proc = Process([sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"])
    with pytest.raises(ProcessError, match="boom") as info:
        proc.wait_for_line("READY", timeout=5)
    assert "exit 3" in str(info.value)
    assert proc.stop() == 3


def test_waits_are_bounded_and_stop_escalates_to_sigkill() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print('up'); time.sleep(30)"
    )
    with Process([sys.executable, "-c", code]) as proc:
        proc.wait_for_line("^up$")
        with pytest.raises(ProcessError, match=r"within 0\.2s"):
            proc.wait_for_line("never", timeout=0.2)
        with pytest.raises(ProcessError, match="not listening"):
            proc.wait_for_port(free_port(), timeout=0.2)
        assert proc.stop(timeout=0.5) == -9


def test_upstream_stops_cleanly_on_sigterm() -> None:
    server = start_upstream()
    server.process.wait_for_port(server.port)
    assert server.stop() == 0


def test_spawn_waits_for_a_port_and_wait_returns_the_exit_code() -> None:
    port = free_port()
    code = (
        "import socket, sys, time; s = socket.create_server(('127.0.0.1', int(sys.argv[1])));"
        "time.sleep(0.2); conn, _ = s.accept(); print('served', flush=True)"
    )
    process, match = spawn([sys.executable, "-c", code, str(port)], port=port)
    assert match is None
    assert process.wait(timeout=5) == 0
    assert process.stdout == "served\n"
