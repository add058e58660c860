"""Resource bounds of the client side, each through the real `keyproxy serve` process:
idle and excess connections, slow and tiny-chunked bodies, deep pipelining, a malformed
request after valid ones, per-route concurrency, drain, the descriptor reserve."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import io
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyproxy.app import FD_RESERVE, ProxyServer, connection_limits
from keyproxy.config import ConfigError
from keyproxy.config.load import parse_config
from keyproxy.config.model import ServerSettings
from keyproxy.config.reload import ConfigHolder
from tests.procs import UpstreamServer, spawn
from tests.proxy_process import KEYS, Keyproxy, base_config, error_of

READER = KEYS["reader"].encode()
ADMIN = KEYS["admin"].encode()


class _KeepOpen(io.BufferedReader):
    def close(self) -> None:  # http.client closes its file after each response
        pass


class _SharedFile:
    """Lets successive `HTTPResponse`s read one socket's buffered stream in turn."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = _KeepOpen(socket.SocketIO(sock, "rb"))

    def makefile(self, *args: object, **kwargs: object) -> io.BufferedReader:
        return self.file


def read_responses(sock: socket.socket, count: int | None = None) -> list[tuple[int, bytes]]:
    """(status, body) of each response on `sock`, in order, until `count` or the close."""
    shared = _SharedFile(sock)
    out: list[tuple[int, bytes]] = []
    while count is None or len(out) < count:
        resp = http.client.HTTPResponse(shared, method="GET")  # type: ignore[arg-type]
        try:
            resp.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            break
        out.append((resp.status, resp.read()))
    return out


def get(path: str, key: bytes = READER, extra: bytes = b"") -> bytes:
    return (
        b"GET "
        + path.encode()
        + b" HTTP/1.1\r\nHost: x\r\nX-API-Key: "
        + key
        + b"\r\n"
        + extra
        + b"\r\n"
    )


def connect(kp: Keyproxy, source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect((kp.host, kp.port))
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server closes `sock` (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


@pytest.fixture
def make_proxy(upstream: UpstreamServer, make: Callable[..., Keyproxy]) -> Any:
    """`make` (tests/conftest.py) with the base config's sections adjusted."""

    def make_with(
        server: dict[str, Any] | None = None,
        upstream_extra: dict[str, Any] | None = None,
        routes_extra: dict[str, dict[str, Any]] | None = None,
        argv: list[str] | None = None,
    ) -> Keyproxy:
        config = base_config(upstream.url, upstream.inject())
        config["server"].update(server or {})
        config["upstream"].update(upstream_extra or {})
        for route in config["routes"]:
            route.update((routes_extra or {}).get(route["match"], {}))
        return make(config, argv)

    return make_with


# -- pipelining -------------------------------------------------------------------------------


def test_a_hundred_pipelined_requests_are_all_answered_in_order(proxy: Keyproxy):
    data = b"".join(get(f"/echo/p{i}") for i in range(100))
    with connect(proxy) as sock:
        sock.sendall(data)
        responses = read_responses(sock, 100)
    assert [s for s, _ in responses] == [200] * 100
    assert [json.loads(b)["path"] for _, b in responses] == [f"/echo/p{i}" for i in range(100)]


def test_a_malformed_request_after_queued_valid_ones_comes_after_their_answers(proxy: Keyproxy):
    with connect(proxy) as sock:
        sock.sendall(get("/slow/200") + get("/echo/second") + b"GARBAGE / HTTP/9\r\n\r\n")
        responses = read_responses(sock)
    assert [s for s, _ in responses] == [200, 200, 400]
    assert json.loads(responses[1][1])["path"] == "/echo/second"
    assert error_of(responses[2][1]) == "BAD_REQUEST"


def test_a_malformed_request_while_a_valid_one_is_upstream_comes_after_its_answer(
    proxy: Keyproxy,
):
    with connect(proxy) as sock:
        sock.sendall(get("/slow/500"))
        time.sleep(0.2)  # forwarded by now, its answer still to come
        sock.sendall(b"\x00\x01 not http\r\n\r\n")
        responses = read_responses(sock)
    assert [s for s, _ in responses] == [200, 400]
    assert json.loads(responses[0][1]) == {"slept_ms": 500}


def test_a_broken_chunked_body_is_answered_after_the_requests_before_it(proxy: Keyproxy):
    broken = (
        b"POST /echo/b HTTP/1.1\r\nHost: x\r\nX-API-Key: " + ADMIN + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n"
    )
    with connect(proxy) as sock:
        sock.sendall(get("/echo/first") + broken)
        responses = read_responses(sock)
    assert [s for s, _ in responses] == [200, 400]


# -- idle and excess connections ----------------------------------------------------------------


def test_a_silent_connection_is_closed_after_the_header_timeout(make_proxy):
    kp = make_proxy({"header_timeout": "1s", "keepalive_timeout": "60s"})
    with connect(kp) as sock:
        started = time.monotonic()
        assert closed_within(sock, 5)
        assert 0.9 <= time.monotonic() - started < 3.5


def test_a_head_begun_after_a_silent_while_gets_only_what_is_left(make_proxy):
    kp = make_proxy({"header_timeout": "2s", "keepalive_timeout": "60s"})
    with connect(kp) as sock:
        time.sleep(1.2)
        sock.sendall(b"GET /echo/x HTTP/1.1\r\n")  # the head's clock started at accept
        started = time.monotonic()
        responses = read_responses(sock)
        assert time.monotonic() - started < 1.9
    assert [s for s, _ in responses] == [408]


def test_connections_over_the_caps_get_a_fast_503(make_proxy):
    kp = make_proxy({"max_connections": 12, "max_connections_per_ip": 5, "header_timeout": "30s"})
    held = [connect(kp) for _ in range(5)]
    try:
        time.sleep(0.2)
        with connect(kp) as sixth:  # the sixth from 127.0.0.1: over the per-address cap
            responses = read_responses(sixth)
        assert [s for s, _ in responses] == [503]
        assert error_of(responses[0][1]) == "TOO_MANY_CONNECTIONS"
        # other addresses still get in, up to the total
        held += [connect(kp, "127.0.0.2") for _ in range(5)]
        held += [connect(kp, "127.0.0.3") for _ in range(2)]
        time.sleep(0.2)
        with connect(kp, "127.0.0.4") as over_total:
            started = time.monotonic()
            assert [s for s, _ in read_responses(over_total)] == [503]
            assert time.monotonic() - started < 1
        # the held ones are served; the admin listener is unaffected
        held[0].sendall(get("/echo/held"))
        assert [s for s, _ in read_responses(held[0], 1)] == [200]
        assert kp.admin("/readyz")[0] == 200
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert kp.request("GET", "/echo/after", key=KEYS["reader"])[0] == 200
    log = kp.process.stderr
    assert log.count('"event":"connections_refused"') == 1  # rate-limited: one line for both


# -- slow and tiny-chunked bodies -----------------------------------------------------------------


def trickle(kp: Keyproxy, body: bytes, gap: float, stop_after: int | None = None) -> list[int]:
    head = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: " + ADMIN + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with connect(kp) as sock:
        sock.sendall(head)
        for i, byte in enumerate(body):
            if stop_after is not None and i >= stop_after:
                break
            sock.sendall(bytes([byte]))
            time.sleep(gap)
        return [s for s, _ in read_responses(sock, 1)]


def test_slow_small_bodies_hold_no_upstream_connection(make_proxy):
    kp = make_proxy({"body_timeout": "2s"}, {"max_connections": 2, "timeout": "2s"})
    with ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(trickle, kp, b"x" * 12, 0.25) for _ in range(3)]  # ~3 s each
        time.sleep(0.5)
        started = time.monotonic()
        status = kp.request("GET", "/echo/meanwhile", key=KEYS["reader"])[0]
        took = time.monotonic() - started
        assert [f.result(timeout=20) for f in slow] == [[200]] * 3
    assert status == 200
    assert took < 1.0


def test_a_stalled_body_gets_408_and_frees_its_upstream_connection(make_proxy):
    kp = make_proxy({"body_timeout": "1s"}, {"max_connections": 1, "timeout": "5s"})
    big = b"y" * 200_000  # past the wait buffer: it streams, holding the one upstream socket
    head = (
        b"PUT /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: " + ADMIN + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % (len(big) + 10)
    )
    with connect(kp) as sock:
        sock.sendall(head + big)
        started = time.monotonic()
        responses = read_responses(sock)  # then silence: the last 10 bytes never come
        took = time.monotonic() - started
    assert [s for s, _ in responses] == [408]
    assert error_of(responses[0][1]) == "REQUEST_TIMEOUT"
    assert 0.9 <= took < 3.5
    assert kp.request("GET", "/echo/next", key=KEYS["reader"])[0] == 200  # the socket is free
    # a small stalled body is timed out too, before it ever reaches the upstream
    assert trickle(kp, b"z" * 20, 0.01, stop_after=5) == [408]


def test_a_trickling_large_body_loses_its_upstream_connection(make_proxy):
    # Each byte comes well within body_timeout, but far below 500 bytes/s.
    kp = make_proxy({"body_timeout": "1s"}, {"max_connections": 1, "timeout": "10s"})
    big = b"y" * 100_000  # past the wait buffer: streaming, on the only upstream socket
    head = (
        b"PUT /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: " + ADMIN + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % (len(big) + 100)
    )
    with connect(kp) as sock:
        sock.sendall(head + big)
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for _ in range(100):  # 30 s at most, if nothing stopped it
                sock.sendall(b"y")
                time.sleep(0.3)
                sock.settimeout(0.01)
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break
                except TimeoutError:
                    pass
                finally:
                    sock.settimeout(10)
        took = time.monotonic() - started
        responses = read_responses(sock)
    assert [s for s, _ in responses] == [408]
    assert took < 4
    assert kp.request("GET", "/echo/next", key=KEYS["reader"])[0] == 200


def test_a_million_one_byte_chunks_are_refused_without_stalling_others(proxy: Keyproxy):
    head = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: " + ADMIN + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    body = b"1\r\nx\r\n" * 1_000_000 + b"0\r\n\r\n"
    sock = connect(proxy)

    def send() -> None:
        with contextlib.suppress(OSError):  # refused and closed midway, as expected
            sock.sendall(head + body)

    sender = threading.Thread(target=send, daemon=True)
    started = time.monotonic()
    sender.start()
    responses = read_responses(sock)
    took = time.monotonic() - started
    sock.close()
    sender.join(10)
    assert [s for s, _ in responses] == [400]
    assert error_of(responses[0][1]) == "CHUNKS_TOO_SMALL"
    assert took < 3
    assert proxy.request("GET", "/echo/after", key=KEYS["reader"])[0] == 200


def test_many_small_chunks_arrive_whole_upstream(proxy: Keyproxy):
    pieces = [bytes([65 + i % 26]) * 40 for i in range(3000)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    request = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: " + ADMIN + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"
    )
    with connect(proxy) as sock:
        sock.sendall(request)
        responses = read_responses(sock, 1)
    assert responses[0][0] == 200
    info = json.loads(responses[0][1])
    assert info["body_len"] == 120_000
    assert info["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()


# -- routes and drain ---------------------------------------------------------------------------


def test_a_hanging_route_at_its_cap_leaves_other_routes_fast(make_proxy):
    kp = make_proxy(
        upstream_extra={"max_connections": 4, "timeout": "5s"},
        routes_extra={"GET /slow/{ms}": {"max_concurrency": 2}},
    )
    with ThreadPoolExecutor(8) as pool:
        hanging = [
            pool.submit(kp.request, "GET", "/slow/2500", None, None, KEYS["reader"])
            for _ in range(6)
        ]
        time.sleep(0.5)
        started = time.monotonic()
        status = kp.request("GET", "/echo/healthy", key=KEYS["reader"])[0]
        took = time.monotonic() - started
        results = [f.result(timeout=20) for f in hanging]
    assert status == 200 and took < 1.0
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 200, 503, 503, 503, 503]
    busy = next(r for r in results if r[0] == 503)
    assert error_of(busy[2]) == "ROUTE_BUSY"
    assert busy[1]["retry-after"] == "1"
    assert kp.request("GET", "/slow/10", key=KEYS["reader"])[0] == 200  # slots given back


def test_requests_cut_at_the_drain_timeout_are_logged(make_proxy):
    kp = make_proxy({"drain_timeout": "1s"}, {"timeout": "10s"})
    with ThreadPoolExecutor(2) as pool:
        cut = [pool.submit(kp.raw, get("/slow/6000"), 10) for _ in range(2)]
        time.sleep(0.5)
        kp.process.send_signal(signal.SIGTERM)
        assert kp.process.wait(10) == 0
        assert all(not f.result(timeout=10).startswith(b"HTTP/1.1 200") for f in cut)
    events = [
        json.loads(line) for line in kp.process.stderr.splitlines() if "drain_timeout" in line
    ]
    assert len(events) == 1
    assert events[0]["aborted_requests"] == 2


# -- descriptors --------------------------------------------------------------------------------


def test_at_the_descriptor_limit_clients_are_refused_and_upstream_and_readyz_work(
    upstream: UpstreamServer, tmp_path: Path
):
    config = base_config(upstream.url, upstream.inject())
    config["server"]["header_timeout"] = "30s"
    config["upstream"]["max_connections"] = 8
    path = tmp_path / "keyproxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # 256 descriptors in all (soft and hard): the client budget is what the pool and
    # the reserve leave, 256 - 8 - 64 = 184, with 32 per address by default.
    argv = [
        "prlimit",
        "--nofile=256:256",
        sys.executable,
        "-m",
        "keyproxy",
        "serve",
        "-c",
        str(path),
    ]
    process, _ = spawn(argv, ready=r'"event":"listening"', ready_stream="stderr", name="keyproxy")
    kp = Keyproxy(process, path, config)
    try:
        busy = [connect(kp) for _ in range(4)]  # clients with work to do once the flood is in
        flood: list[socket.socket] = []
        refused = 0
        for n in range(300):
            sock = connect(kp, f"127.0.0.{10 + n // 30}")
            flood.append(sock)
        time.sleep(0.5)
        for sock in flood:
            sock.settimeout(0.05)
            try:
                if sock.recv(65536).startswith(b"HTTP/1.1 503 "):
                    refused += 1
            except TimeoutError:
                pass
        assert refused == 300 + 4 - 184
        for sock in busy:  # each needs an upstream socket of its own at once
            sock.sendall(get("/slow/300"))
        assert [read_responses(sock, 1)[0][0] for sock in busy] == [200] * 4
        assert kp.admin("/readyz")[0] == 200
        assert "accept_failed" not in process.stderr
        assert process.stderr.count('"event":"connections_refused"') == 1
        for sock in flood + busy:
            sock.close()
        time.sleep(0.3)
        assert kp.request("GET", "/echo/after", key=KEYS["reader"])[0] == 200
    finally:
        kp.stop()


# -- settings and sizing (pure) -----------------------------------------------------------------


def _config(server: str = "", route_extra: str = "") -> str:
    return (
        "server:\n  listen: 127.0.0.1:8080\n" + server + "upstream:\n  url: http://127.0.0.1:9\n"
        'routes:\n  - match: "GET /v1/{table}"\n    acl: read\n' + route_extra + "keys: []\n"
    )


def test_new_settings_are_read_and_checked():
    config = parse_config(
        _config(
            "  body_timeout: 3s\n  max_connections: 100\n  max_connections_per_ip: 7\n",
            "    max_concurrency: 2\n",
        ),
        "t.yaml",
        {},
    )
    assert config.server.body_timeout == 3.0
    assert (config.server.max_connections, config.server.max_connections_per_ip) == (100, 7)
    assert config.routes[0].max_concurrency == 2
    default = parse_config(_config(), "t.yaml", {})
    assert default.server.max_connections is None and default.routes[0].max_concurrency is None
    for server, route, where in (
        ("  max_connections: 0\n", "", "t.yaml:3: server.max_connections:"),
        ("  max_connections_per_ip: -1\n", "", "t.yaml:3: server.max_connections_per_ip:"),
        ("  body_timeout: 0s\n", "", "t.yaml:3: server.body_timeout:"),
        ("", "    max_concurrency: 0\n", "t.yaml:8: routes[0].max_concurrency:"),
    ):
        with pytest.raises(ConfigError) as error:
            parse_config(_config(server, route), "t.yaml", {})
        assert str(error.value).startswith(where), str(error.value)


def test_connection_limits_leave_room_for_the_pool_and_the_reserve():
    up = parse_config(_config(), "t.yaml", {}).upstream  # a pool of 512
    assert connection_limits(ServerSettings(), up, 1 << 20) == (838_860, 83_886)
    total, per_ip = connection_limits(ServerSettings(), up, 1024)
    assert total == 1024 - 512 - FD_RESERVE and per_ip == 44
    assert connection_limits(ServerSettings(), up, 256) == (16, 16)  # never below a floor
    explicit = ServerSettings(max_connections=50, max_connections_per_ip=80)
    assert connection_limits(explicit, up, 1024) == (50, 50)


def test_failed_accepts_are_counted_and_logged_at_most_every_few_seconds(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
):
    path = tmp_path / "k.yaml"
    path.write_text(_config("  max_connections: 9000000\n"))
    holder = ConfigHolder.load(str(path))
    loop = asyncio.new_event_loop()
    try:
        proxy = ProxyServer(holder, loop)
        # what asyncio's loop reports when accept() fails with EMFILE
        context = {
            "message": "socket.accept() out of system resource",
            "exception": OSError(24, "x"),
        }
        for _ in range(3):
            loop.call_exception_handler(context)
        assert proxy.stats.accept_errors == 3
        err = capfd.readouterr().err
        assert err.count('"event":"accept_failed"') == 1
        assert "file descriptors but the limit is" in err  # 9,000,000 connections cannot fit
    finally:
        loop.close()
