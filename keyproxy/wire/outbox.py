"""Bytes for the kernel, sent together once the event loop has handled a turn's events.

Why hold them at all: on loopback, and on virtual machines generally, much of a
`send` is waking the peer that sleeps on another CPU. keyproxy spends some 50 µs of
Python on each request, so sends made as each request is handled reach peers that
have had time to fall asleep again, and each send pays a wake-up. The same sends
made back to back at the end of the turn find the peer already woken by the first.
Measured on the full policy (`bench/RESULTS.md`, the run of 2026-12-05 01:14 UTC):
105 → 74 CPU µs per request, 1.4× the requests per second, lower latency.

Order is kept per connection (one list each), and a client connection that closes
or aborts sends what it holds first (an answer cut after its head must still arrive
as a head and a cut); an upstream connection that aborts drops it, as nobody waits
for that request's answer any more.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from keyproxy.observability import log_event

#: A connection's later write of a turn this large goes to the socket at once, after
#: what the connection holds. Holding gains it nothing (its size pays for the peer's
#: wake-up), and only bytes that reach the transport count toward its buffer limit,
#: whose `pause_writing` stops the reads producing them: libuv reads a busy socket up
#: to 32 times (256 KB each) in one turn, and held, those reads piled up some 8 MB per
#: slow peer instead of ~0.5 MB. The turn's first write per connection is not checked
#: (one read at most: bounded), so a lone answer per turn pays nothing for this.
SEND_AT_ONCE = 64 * 1024


class Sender(Protocol):
    """A connection that holds its writes until the outbox says to send them: it asks
    `Outbox.defer` when it has nothing held yet, and holds or writes as told."""

    def send_held(self) -> None: ...

    def send_failed(self, exc: Exception) -> None:
        """Sending raised: drop the connection, and tell whoever waits for an answer on it."""


class Outbox:
    """The connections holding writes in this turn; one per event loop."""

    __slots__ = ("_held", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held: list[Sender] = []
        self._scheduled = False

    def defer(self, sender: Sender) -> bool:
        """Whether `sender`'s write must wait for the end of this turn (it is then noted
        to be sent), or may go now. A callback scheduled now runs after every I/O event
        the loop already polled.

        The turn's first write goes at once: it wakes its peer either way, and a lone
        request (one client, a quiet moment) then meets no delay at all; held, its
        upstream would wait for the bookkeeping after the write (measured with one
        client: 5 % fewer requests per second)."""
        if self._scheduled:
            self._held.append(sender)
            return True
        self._scheduled = True
        self._loop.call_soon(self.send)
        return False

    def send(self) -> None:
        self._scheduled = False
        held, self._held = self._held, []
        for sender in held:
            try:
                sender.send_held()
            except Exception as exc:  # one broken socket must not keep the others' bytes
                log_event("send_failed", error=type(exc).__name__)
                sender.send_failed(exc)


class HeldWrites:
    """`write` and `writelines` through the outbox, for the client and upstream
    connections alike: what a connection writes after the turn's first write waits in
    `held` (in order) until the turn ends, or goes at once with it when large."""

    __slots__ = ()

    transport: asyncio.Transport | None
    held: list[bytes]
    outbox: Outbox
    closed: bool

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        held = self.held
        if held:  # a later write of this turn: a large one sends all (`SEND_AT_ONCE`)
            held.append(data)
            if len(data) >= SEND_AT_ONCE:
                self.send_held()
        elif self.outbox.defer(self):  # type: ignore[arg-type]  # each subclass is a Sender
            held.append(data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]  # set once connected

    def writelines(self, parts: list[bytes]) -> None:
        if self.closed or not parts:
            return
        held = self.held
        if held:
            held += parts
            if sum(map(len, parts)) >= SEND_AT_ONCE:
                self.send_held()
        elif self.outbox.defer(self):  # type: ignore[arg-type]
            held += parts
        else:
            self.transport.writelines(parts)  # type: ignore[union-attr]

    def send_held(self) -> None:
        """What this turn wrote, in one system call; also before the transport closes."""
        held = self.held
        if not held:
            return
        self.held = []  # type: ignore[misc]  # a slot of each subclass
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            # Aborted or lost: nobody to send to. A socket the peer closed since the write
            # (in the same turn) is closing: its `connection_lost`, still to come, tells the
            # connection (an upstream's exchange then retries on another socket).
            return
        if len(held) == 1:
            transport.write(held[0])
        else:
            transport.writelines(held)
