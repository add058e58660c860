"""Writes held to the end of the loop turn: order, one write per connection, closing."""

from __future__ import annotations

import asyncio
import socketserver

import pytest
import yaml

from keyproxy.app import ProxyServer
from keyproxy.config import parse_config
from keyproxy.config.reload import ConfigHolder
from keyproxy.wire.client import ClientConnection
from keyproxy.wire.outbox import SEND_AT_ONCE, Outbox
from keyproxy.wire.upstream import UpstreamConnection
from tests.memory_transport import MemoryTransport
from tests.procs import raw_upstream, recv_head
from tests.proxy_process import KEYS, base_config


class Sender:
    """Writes as the connections do: at once when the outbox allows, else when it sends."""

    def __init__(self, name: str, sent: list[str], broken: bool = False) -> None:
        self.name, self.sent, self.broken, self.aborted = name, sent, broken, False

    def write(self, outbox: Outbox) -> None:
        if not outbox.defer(self):
            self.send_held()

    def send_held(self) -> None:
        if self.broken:
            raise OSError("socket gone")
        self.sent.append(self.name)

    def send_failed(self, exc: Exception) -> None:
        self.aborted = True


def test_the_first_write_of_a_turn_goes_at_once_the_rest_when_it_ends_in_order() -> None:
    loop = asyncio.new_event_loop()
    try:
        outbox, sent = Outbox(loop), []
        a, broken, b = Sender("a", sent), Sender("x", sent, broken=True), Sender("b", sent)
        for sender in (a, broken, b):
            sender.write(outbox)
        assert sent == ["a"]  # the first wakes its peer at once; the others wait
        loop.call_soon(loop.stop)
        loop.run_forever()
        # A broken socket costs only its own connection.
        assert sent == ["a", "b"] and broken.aborted and not a.aborted
        b.write(outbox)  # a new turn: its first write goes at once again
        a.write(outbox)
        assert sent == ["a", "b", "b"]
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert sent == ["a", "b", "b", "a"]
    finally:
        loop.close()


class CountingTransport(MemoryTransport):
    """Counts the calls that would each be a system call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.calls += 1
        super().write(data)

    def writelines(self, parts) -> None:  # type: ignore[no-untyped-def, override]
        self.calls += 1
        for part in parts:
            super().write(part)


def _proxy(loop: asyncio.AbstractEventLoop) -> ProxyServer:
    text = yaml.safe_dump(base_config("http://127.0.0.1:9", {"headers": {"K": "v" * 24}}))
    return ProxyServer(ConfigHolder(parse_config(text, "t.yaml", {})), loop)


def test_answers_written_in_one_turn_leave_together_and_in_order() -> None:
    loop = asyncio.new_event_loop()
    try:
        proxy = _proxy(loop)
        conns = [ClientConnection(proxy) for _ in range(3)]
        transports = [CountingTransport() for _ in conns]
        for conn, transport in zip(conns, transports, strict=True):
            conn.connection_made(transport)
        heads = b"".join(
            b"GET /v1/data/posts?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in range(3)
        )
        for conn in conns:  # one turn: each connection's read is three refusals (no key)
            conn.data_received(heads)
        first, *others = transports
        assert first.calls == 1 and first.data.count(b" 401 ") == 1  # the turn's first write
        assert [t.calls for t in others] == [0, 0]
        proxy.outbox.send()  # the turn ends: one write per connection for all it holds
        assert [t.calls for t in transports] == [2, 1, 1]
        for transport in transports:
            assert transport.data.count(b"HTTP/1.1 401 ") == 3
            data = bytes(transport.data)
            ids = [line for line in data.split(b"\r\n") if line.startswith(b"X-Request-Id")]
            assert len(ids) == 3 and ids == sorted(ids)  # request ids count up: in order
        for conn in conns:
            conn.connection_lost(None)
    finally:
        loop.close()


def test_a_connection_closing_or_cut_sends_what_it_holds_first() -> None:
    loop = asyncio.new_event_loop()
    try:
        proxy = _proxy(loop)
        conn, transport = ClientConnection(proxy), CountingTransport()
        conn.connection_made(transport)
        conn.data_received(b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        # Answered and closed in the same turn: the answer went out before the close.
        assert transport.closing and transport.data.startswith(b"HTTP/1.1 401 ")
        conn.connection_lost(None)

        conn, transport = ClientConnection(proxy), CountingTransport()
        conn.connection_made(transport)
        busy = ClientConnection(proxy)  # its answer is the turn's first write
        busy.connection_made(CountingTransport())
        busy.data_received(b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.data_received(b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.abort()  # a cut (an answer broken off): what was held goes out before it
        assert transport.closing and transport.calls == 1
        assert transport.data.startswith(b"HTTP/1.1 401 ")
        proxy.outbox.send()
        assert transport.calls == 1
        busy.connection_lost(None)
        conn.connection_lost(None)
    finally:
        loop.close()


def test_a_large_later_write_goes_at_once_after_what_the_connection_holds() -> None:
    """Holding gains a large write nothing, and sent at once it meets the transport's
    buffer limit (`pause_writing` stops the reads producing it) within the turn: a
    connection holds at most one write it has not checked."""
    loop = asyncio.new_event_loop()
    try:
        proxy = _proxy(loop)
        busy, conn = ClientConnection(proxy), ClientConnection(proxy)
        transport = CountingTransport()
        busy.connection_made(CountingTransport())
        conn.connection_made(transport)
        busy.write(b"first")  # the turn's first write: the others are held
        conn.write(b"small")
        assert transport.calls == 0
        large = b"x" * SEND_AT_ONCE
        conn.write(large)
        assert transport.calls == 1 and transport.data == b"small" + large
        conn.writelines([b"a", large, b"b"])  # nothing held before it: held, whatever its size
        assert transport.calls == 1
        conn.writelines([b"c", large])
        assert transport.calls == 2 and transport.data.endswith(b"a" + large + b"bc" + large)
        conn.write(b"after")  # held again, in order
        proxy.outbox.send()
        assert transport.calls == 3 and transport.data.endswith(large + b"after")
        busy.connection_lost(None)
        conn.connection_lost(None)
    finally:
        loop.close()


class _OkUpstream(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data = b""
        while (got := recv_head(self.request, data)) is not None:
            data = got[1]
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


class _DeadSocket(MemoryTransport):
    """An upstream socket as uvloop's transport is once it has closed (the peer closed it,
    or `broken`: the write fails anyway): writing raises, `connection_lost` follows in a
    later callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: UpstreamConnection) -> None:
        super().__init__()
        self.loop, self.protocol, self.broken = loop, protocol, False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        if self.closing or self.broken:
            raise RuntimeError("unable to perform operation: the handler is closed")
        super().write(data)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    abort = close


@pytest.mark.parametrize("how", ["closed by the upstream", "write fails"])
def test_a_held_request_its_reused_socket_cannot_take_is_retried_on_another(how: str) -> None:
    """The request is written to a kept-alive socket, and the socket turns out dead before
    the turn's end sends it: the exchange is told (and tries once more on a new socket),
    instead of waiting for an answer that cannot come until the upstream timeout."""
    loop = asyncio.new_event_loop()
    try:
        with raw_upstream(_OkUpstream) as url:
            config = base_config(url, {"headers": {"K": "v" * 24}})
            proxy = ProxyServer(ConfigHolder(parse_config(yaml.safe_dump(config), "t", {})), loop)
            pool = proxy.serving.pool
            dead = UpstreamConnection(pool)
            socket_ = _DeadSocket(loop, dead)
            dead.connection_made(socket_)
            dead.uses = 1  # served an earlier request: a failure before any answer is retried
            pool._open += 1
            pool.release(dead, True)

            busy, conn = ClientConnection(proxy), ClientConnection(proxy)
            transport = CountingTransport()
            busy.connection_made(CountingTransport())
            conn.connection_made(transport)
            busy.data_received(b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\n\r\n")  # 401, at once
            conn.data_received(
                b"GET /big/1 HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n\r\n" % KEYS["reader"].encode()
            )
            assert socket_.data == b""  # held until the turn ends
            if how == "closed by the upstream":
                assert not dead.eof_received()  # in the same turn, after the write
                socket_.close()
            else:
                socket_.broken = True

            async def answered() -> None:
                while b"\r\n\r\n" not in transport.data:
                    await asyncio.sleep(0.01)

            loop.run_until_complete(asyncio.wait_for(answered(), 1.5))
            assert transport.data.startswith(b"HTTP/1.1 200 "), bytes(transport.data)
            assert transport.data.endswith(b"\r\n\r\nok")
            for c in (busy, conn):
                c.connection_lost(None)
            pool.close()
    finally:
        loop.close()


class _EofTransport(CountingTransport):
    """Raises on a write after `write_eof`, as uvloop's transport does."""

    def write(self, data: bytes) -> None:  # type: ignore[override]
        if self.eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        super().write(data)


def test_a_lingering_connection_writes_nothing_after_its_eof() -> None:
    """A refused upload is answered, its sending side shut while the body drains: any
    later write (a late refusal, a drain) is dropped instead of raising in the loop."""
    loop = asyncio.new_event_loop()
    try:
        proxy = _proxy(loop)
        conn, transport = ClientConnection(proxy), _EofTransport()
        conn.connection_made(transport)
        conn.data_received(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\nabc" % (2 * 1024 * 1024)
        )
        proxy.outbox.send()
        assert transport.data.startswith(b"HTTP/1.1 401 ") and transport.eof
        assert conn.lingering and not transport.closing  # still draining the body
        conn.write(b"late")
        conn.writelines([b"late"])
        conn.abort()  # the linger ends
        assert b"late" not in transport.data and transport.closing
        conn.connection_lost(None)
    finally:
        loop.close()


def test_an_idle_upstream_socket_already_closing_is_not_handed_out() -> None:
    """The upstream closed a kept-alive socket and its `connection_lost` is still to come:
    a request sent on it would fail with a 500 where a new socket serves it."""
    loop = asyncio.new_event_loop()
    try:
        proxy = _proxy(loop)
        pool = proxy.serving.pool
        live, closing = UpstreamConnection(pool), UpstreamConnection(pool)
        for conn in (live, closing):
            conn.connection_made(MemoryTransport())
            pool._open += 1
            pool.release(conn, True)
        closing.transport.closing = True  # type: ignore[union-attr]
        assert pool.take_idle() is live  # the closing one, released last, was skipped
        assert pool.take_idle() is None and pool.open_connections == 1
    finally:
        loop.close()
