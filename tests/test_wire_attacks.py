"""Raw-socket attacks on the request side of a real `keyproxy serve` before a real upstream:
framing and smuggling shapes, head and trailer limits, slow clients, reloads mid-connection."""

from __future__ import annotations

import contextlib
import copy
import re
import socket
import socketserver
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import UpstreamServer, raw_upstream, recv_head
from tests.proxy_process import KEYS, Keyproxy, base_config, error_of, start_keyproxy

KEY = KEYS["admin"].encode()
HEADERS = b"Host: x\r\nX-API-Key: " + KEY + b"\r\n"
LIMIT = 1024  # the small proxy's `max_header_size`


@pytest.fixture(scope="module")
def small(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyproxy]:
    """A keyproxy whose heads (and trailers) may count 1 KiB, with long body and keep-alive
    timeouts so that a request left waiting is never answered by a timeout within a test."""
    tmp: Path = tmp_path_factory.mktemp("wire")
    config = base_config(upstream.url, upstream.inject())
    config["server"]["max_header_size"] = "1KiB"
    config["server"]["body_timeout"] = "30s"
    config["server"]["header_timeout"] = "30s"
    kp = start_keyproxy(tmp, config)
    yield kp
    kp.stop()


def read_answers(sock: socket.socket, count: int, timeout: float = 5.0) -> bytes:
    """Read until `count` status lines arrived, the server closed, or `timeout` passed."""
    sock.settimeout(0.2)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(re.findall(rb"HTTP/1\.[01] \d{3} ", data)) < count:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def statuses(data: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)]


def get(path: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY + b"\r\n" + extra + b"\r\n"


# -- the head limit and pipelining --------------------------------------------------------


def test_many_small_pipelined_heads_in_one_read_are_each_held_to_the_limit(small: Keyproxy):
    """Complete heads before a partial one in the same read are not its bytes: twenty
    small requests (2.6 KiB together, 1 KiB allowed per head) and the start of another,
    then the rest of it, are all answered."""
    heads = [get(b"/echo/p%02d" % i) for i in range(20)]
    last = get(b"/echo/last")
    assert sum(map(len, heads)) > 2 * LIMIT and all(len(h) < LIMIT // 4 for h in heads)
    with socket.create_connection((small.host, small.port), timeout=5) as sock:
        sock.sendall(b"".join(heads) + last[:40])
        time.sleep(0.2)  # the partial head is read on its own, before the rest comes
        sock.sendall(last[40:])
        answer = read_answers(sock, 21)
    assert statuses(answer) == [200] * 21, answer[-300:]
    positions = [answer.find(b"/echo/p%02d" % i) for i in range(20)] + [answer.find(b"/echo/last")]
    assert -1 not in positions and positions == sorted(positions)


def test_a_partial_head_after_pipelined_ones_is_still_held_to_the_limit(small: Keyproxy):
    """The same read, where the partial head itself is over the limit: the complete
    heads before it are answered, then it gets a 431 at once, without another read."""
    heads = [get(b"/echo/p%02d" % i) for i in range(5)]
    big = b"GET /echo/big HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (LIMIT + 200)
    with socket.create_connection((small.host, small.port), timeout=5) as sock:
        sock.sendall(b"".join(heads) + big)
        answer = read_answers(sock, 6)
    assert statuses(answer) == [200] * 5 + [431], answer[-300:]


def test_pipelined_heads_after_a_body_are_not_charged_to_the_next_head(small: Keyproxy):
    """Heads of chunked requests (whose bodies end in a blank line) pipelined before a
    partial head: only the partial head's own bytes count toward its limit."""
    post = (
        b"POST /echo/c HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    last = get(b"/echo/last")
    with socket.create_connection((small.host, small.port), timeout=5) as sock:
        sock.sendall(post * 8 + last[:30])
        time.sleep(0.2)
        sock.sendall(last[30:])
        answer = read_answers(sock, 9)
    assert statuses(answer) == [200] * 9, answer[-300:]


def test_one_head_over_the_limit_still_gets_431(small: Keyproxy):
    with socket.create_connection((small.host, small.port), timeout=5) as sock:
        sock.sendall(get(b"/echo/x", b"X-Pad: " + b"a" * LIMIT + b"\r\n"))
        answer = read_answers(sock, 1)
    assert statuses(answer) == [431]
    with socket.create_connection((small.host, small.port), timeout=5) as sock:
        sock.sendall(b"GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (LIMIT + 100))
        answer = read_answers(sock, 1)  # still arriving: refused without waiting for the rest
    assert statuses(answer) == [431]


# -- the trailer limit -----------------------------------------------------------------------


def test_a_trailer_line_begun_with_the_last_body_bytes_counts_toward_the_limit(small: Keyproxy):
    """The read that brings a chunked body's last bytes may also bring its trailer: a
    trailer line already over the limit in that read is refused without waiting for more."""
    head = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    with socket.create_connection((small.host, small.port), timeout=5) as sock:
        sock.sendall(head + b"5\r\nhello\r\n0\r\nX-Trailer: " + b"t" * (4 * LIMIT))
        answer = read_answers(sock, 1, timeout=3)
    assert statuses(answer) == [431], answer[:200]
    assert error_of(answer.split(b"\r\n\r\n", 1)[1]) == "HEADERS_TOO_LARGE"
    # Complete trailer lines in that read count too.
    lines = b"".join(b"X-T%03d: %s\r\n" % (i, b"t" * 40) for i in range(60))
    with socket.create_connection((small.host, small.port), timeout=5) as sock:
        sock.sendall(head + b"5\r\nhello\r\n0\r\n" + lines + b"X-More: t")
        answer = read_answers(sock, 1, timeout=3)
    assert statuses(answer) == [431], answer[:200]


def test_chunked_bodies_read_in_any_pieces_with_a_small_trailer_are_served(small: Keyproxy):
    """The control: a body whose reads end just after a chunk-size line, mid-chunk or
    mid-trailer, with a trailer within the limit, is forwarded whole."""
    body = b"\r\n0\r\n" * 400  # bytes that look like framing, 2 KB
    framed = b"%x\r\n%s\r\n" % (len(body), body) + b"0\r\nX-Small: t\r\n\r\n"
    head = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    for cut in (len(b"%x\r\n" % len(body)), 100, len(framed) - 12, len(framed) - 3):
        with socket.create_connection((small.host, small.port), timeout=5) as sock:
            sock.sendall(head + framed[:cut])
            time.sleep(0.1)
            sock.sendall(framed[cut:])
            answer = read_answers(sock, 1)
        assert statuses(answer) == [200], (cut, answer[:200])
        assert b'"body_len": %d' % len(body) in answer or b'"body_len":%d' % len(body) in answer


# -- framing an upstream or a front proxy could read differently ---------------------------


def exchange(kp: Keyproxy, data: bytes, count: int = 2) -> bytes:
    with socket.create_connection((kp.host, kp.port), timeout=5) as sock:
        sock.sendall(data)
        return read_answers(sock, count, timeout=2)


def test_transfer_encoding_in_an_http10_request_is_refused_and_closes(proxy: Keyproxy, upstream):
    """HTTP/1.0 has no chunked coding: a front proxy may read the body as the next request
    while keyproxy reads it as chunks. Such framing is refused and nothing after it read."""
    upstream.reset()
    smuggled = get(b"/echo/smuggled")
    for extra in (b"", b"Connection: keep-alive\r\n"):
        answer = exchange(
            proxy,
            b"POST /echo/x HTTP/1.0\r\nHost: x\r\nX-API-Key: "
            + KEY
            + b"\r\n"
            + extra
            + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            + smuggled,
        )
        assert statuses(answer) == [400], answer
        assert error_of(answer.split(b"\r\n\r\n", 1)[1]) == "BAD_REQUEST"
    assert upstream.records() == []


@pytest.mark.parametrize(
    "line", [b"GET /echo/v HTTP/2.0", b"GET /echo/v HTTP/3.0", b"GET /echo/v"], ids=str
)
def test_only_http10_and_http11_request_lines_are_served(proxy: Keyproxy, upstream, line: bytes):
    """llhttp accepts `HTTP/2.0` in a text request line, and a line without a version
    (HTTP/0.9, which has no headers) followed by headers: neither is HTTP/1.x, and a
    front proxy would frame them otherwise."""
    upstream.reset()
    answer = exchange(
        proxy,
        line
        + b"\r\nHost: x\r\nX-API-Key: "
        + KEY
        + b"\r\nConnection: keep-alive\r\n\r\n"
        + get(b"/echo/after"),
    )
    assert statuses(answer) == [400], answer
    assert upstream.records() == []
    # HTTP/1.0 and HTTP/1.1 still are.
    answer = exchange(proxy, b"GET /echo/v HTTP/1.0\r\nX-API-Key: " + KEY + b"\r\n\r\n", 1)
    assert statuses(answer) == [200], answer


def test_a_trailer_of_many_short_lines_in_one_read_is_refused(small: Keyproxy, upstream):
    """Each trailer line costs a parser callback: a trailer that arrives whole in the read
    of the body is still held to the limit, so a read of thousands of tiny lines stops
    there (a head's lines are bounded the same way)."""
    upstream.reset()
    lines = b"T: v\r\n" * 1000  # 6 KB on the wire, counted 6 bytes a line
    answer = exchange(
        small,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n" + lines + b"\r\n",
        1,
    )
    assert statuses(answer) == [431], answer[:200]
    assert upstream.records() == []
    # A short trailer in the same read is ignored as before.
    answer = exchange(
        small,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n" + b"T: v\r\n" * 20 + b"\r\n",
        1,
    )
    assert statuses(answer) == [200], answer[:200]


# -- the upstream side of a request --------------------------------------------------------


def test_body_bytes_an_upstream_sends_after_a_head_answer_never_reach_another_request(
    proxy: Keyproxy,
):
    """aiohttp's streamed responses (like the test upstream's /big) send their body even
    to HEAD. Were the socket reused, those bytes would be read as the next request's
    answer: a 502 at best, at worst a response the body spells out, served to another
    client. After HEAD the upstream socket is never reused."""
    for _ in range(3):
        answer = exchange(
            proxy,
            b"HEAD /big/300000 HTTP/1.1\r\n" + HEADERS + b"\r\n" + get(b"/echo/after"),
        )
        assert statuses(answer) == [200, 200], answer[-400:]
        head, rest = answer.split(b"\r\n\r\n", 1)
        assert b"Content-Length: 300000" in head and rest.startswith(b"HTTP/1.1 200 ")
        assert b'"path": "/echo/after"' in rest or b'"path":"/echo/after"' in rest


class _OverrunningUpstream(socketserver.BaseRequestHandler):
    """Keeps each connection alive; `/extra` is answered with a 204 followed, in the same
    write, by the start of another response, as a server that miscounts its body does."""

    def handle(self) -> None:
        self.request.settimeout(5)
        data = b""
        with contextlib.suppress(OSError):
            while True:
                read = recv_head(self.request, data)
                if read is None:
                    return
                head, data = read
                if b" /echo/extra " in head.split(b"\r\n", 1)[0]:
                    self.request.sendall(
                        b"HTTP/1.1 204 No Content\r\n\r\n"
                        b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\nEVIL"
                    )
                else:
                    self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood")


@pytest.fixture(scope="module")
def overrunning(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyproxy]:
    with raw_upstream(_OverrunningUpstream) as url:
        config = base_config(url, {"headers": {"X-K": "v"}})
        config["upstream"]["max_connections"] = 1  # every request would reuse the one socket
        kp = start_keyproxy(tmp_path_factory.mktemp("overrun"), config)
        yield kp
        kp.stop()


def test_bytes_after_a_complete_answer_are_never_read_as_the_next_one(overrunning: Keyproxy):
    """Bytes an upstream sends past the end of an answer, in the same read, mean its
    framing cannot be trusted: the socket is dropped, not pooled with a parser part-way
    through a message that would swallow (or be) the next request's answer."""
    for _ in range(2):
        status, _h, body, _r = overrunning.request("GET", "/echo/extra", key=KEYS["reader"])
        assert (status, body) == (204, b"")
        for _ in range(2):
            status, _h, body, _r = overrunning.request("GET", "/echo/next", key=KEYS["reader"])
            assert (status, body) == (200, b"good")


def test_an_http10_request_never_gets_100_continue(proxy: Keyproxy):
    """An HTTP/1.0 client (or a front proxy speaking 1.0) cannot read a 1xx answer: it
    would take `100 Continue` for the answer and the real one for the next. The
    expectation is ignored; the body is awaited as it comes."""
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.0\r\n"
            + HEADERS
            + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        early = read_answers(sock, 1, timeout=0.7)
        sock.sendall(b"hello")
        answer = early + read_answers(sock, 1)
    assert early == b"", early
    assert statuses(answer) == [200], answer[:200]
    # An HTTP/1.1 client still gets it.
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\n"
            + HEADERS
            + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        early = read_answers(sock, 1)
        sock.sendall(b"hello")
        answer = read_answers(sock, 1)
    assert early.startswith(b"HTTP/1.1 100 Continue\r\n\r\n") and statuses(answer) == [200]


# -- slow clients and reloads ----------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyproxy]:
    """A keyproxy with a 1 s head timeout and a 60 s keep-alive timeout."""
    config = base_config(upstream.url, upstream.inject())
    config["server"]["header_timeout"] = "1s"
    config["server"]["keepalive_timeout"] = "60s"
    kp = start_keyproxy(tmp_path_factory.mktemp("quick"), config)
    yield kp
    kp.stop()


@pytest.mark.parametrize(
    "trickle",
    [b"\r\n" * 40, get(b"/echo/slow")],
    ids=["blank lines before a request", "a request a byte at a time"],
)
def test_a_head_trickled_from_accept_gets_408_at_the_head_timeout(quick: Keyproxy, trickle):
    """Blank lines before a request start no request in llhttp, and each byte of a head
    resets no timer: the head timeout runs from accept either way."""
    with socket.create_connection((quick.host, quick.port), timeout=5) as sock:
        started = time.monotonic()
        sock.settimeout(0.15)
        answer = b""
        for at in range(len(trickle)):
            with contextlib.suppress(OSError):
                sock.sendall(trickle[at : at + 1])
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            break
        took = time.monotonic() - started
        answer += read_answers(sock, 1, timeout=1)
    assert statuses(answer) == [408], answer[:200]
    assert 0.9 < took < 2.5, took


def test_a_reload_binds_the_next_request_of_a_kept_alive_connection(tmp_path, upstream):
    """A key revoked by a reload is refused on a connection opened before it, also for a
    head that had begun before the reload."""
    config = base_config(upstream.url, upstream.inject())
    kp = start_keyproxy(tmp_path, config)
    try:
        with socket.create_connection((kp.host, kp.port), timeout=5) as sock:
            sock.sendall(get(b"/echo/before"))
            assert statuses(read_answers(sock, 1)) == [200]
            sock.sendall(b"GET /echo/after HTTP/1.1\r\nHost: x\r\n")  # the head has begun
            revoked = copy.deepcopy(config)
            for entry in revoked["keys"]:
                if entry["id"] == "admin":
                    entry["revoked"] = True
            kp.rewrite_config(revoked)
            deadline = time.monotonic() + 5
            while kp.request("GET", "/echo/x", key=KEYS["admin"])[0] != 401:
                assert time.monotonic() < deadline, "the reload never took effect"
                time.sleep(0.05)
            sock.sendall(b"X-API-Key: " + KEY + b"\r\n\r\n" + get(b"/echo/next"))
            answer = read_answers(sock, 2)
        assert statuses(answer) == [401, 401], answer[-300:]
        assert answer.count(b'"error":"TOKEN_REVOKED"') == 2
    finally:
        kp.stop()
