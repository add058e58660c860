"""Writes held to the end of the loop turn: order, one write per connection, closing."""

from __future__ import annotations

import asyncio

import yaml

from keyproxy.app import ProxyServer
from keyproxy.config import parse_config
from keyproxy.config.reload import ConfigHolder
from keyproxy.wire.client import ClientConnection
from keyproxy.wire.outbox import Outbox
from tests.memory_transport import MemoryTransport
from tests.proxy_process import base_config


class Sender:
    def __init__(self, name: str, sent: list[str], broken: bool = False) -> None:
        self.name, self.sent, self.broken, self.aborted = name, sent, broken, False

    def send_held(self) -> None:
        if self.broken:
            raise OSError("socket gone")
        self.sent.append(self.name)

    def abort(self) -> None:
        self.aborted = True


def test_one_send_per_turn_in_the_order_held_and_a_broken_socket_costs_only_itself() -> None:
    loop = asyncio.new_event_loop()
    try:
        outbox, sent = Outbox(loop), []
        a, broken, b = Sender("a", sent), Sender("x", sent, broken=True), Sender("b", sent)
        for sender in (a, broken, b):
            outbox.hold(sender)
        assert sent == []  # nothing leaves before the turn ends
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert sent == ["a", "b"] and broken.aborted and not a.aborted
        outbox.hold(a)  # a later turn schedules its own send
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert sent == ["a", "b", "a"]
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


def test_answers_written_in_one_turn_leave_in_one_write_and_in_order() -> None:
    loop = asyncio.new_event_loop()
    try:
        proxy = _proxy(loop)
        conn, transport = ClientConnection(proxy), CountingTransport()
        conn.connection_made(transport)
        heads = b"".join(
            b"GET /v1/data/posts?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in range(3)
        )
        conn.data_received(heads)  # three refusals (no key), answered in this turn
        assert transport.calls == 0
        proxy.outbox.send()  # the turn ends
        assert transport.calls == 1
        assert transport.data.count(b"HTTP/1.1 401 ") == 3
        ids = [line for line in bytes(transport.data).split(b"\r\n") if line.startswith(b"X-Req")]
        assert len(ids) == 3 and ids == sorted(ids)  # request ids count up: in order
        conn.connection_lost(None)
    finally:
        loop.close()


def test_a_connection_closing_sends_what_it_holds_first_and_an_abort_drops_it() -> None:
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
        conn.data_received(b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.abort()  # a reset: what was held is not sent after it
        proxy.outbox.send()
        assert transport.closing and transport.calls == 0
        conn.connection_lost(None)
    finally:
        loop.close()
