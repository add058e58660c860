"""Bytes for the kernel, sent together once the event loop has handled a turn's events.

Why hold them at all: on loopback, and on virtual machines generally, much of a
`send` is waking the peer that sleeps on another CPU. keyproxy spends some 50 µs of
Python on each request, so sends made as each request is handled reach peers that
have had time to fall asleep again, and each send pays a wake-up. The same sends
made back to back at the end of the turn find the peer already woken by the first.
Measured on the full policy (`bench/RESULTS.md`, "Writes held to the end of the
turn"): 99 → 74 CPU µs per request, 1.35× the requests per second, lower latency.

Order is kept per connection (one list each), and a connection that closes sends
what it holds first; one that aborts drops it, as a reset would.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from keyproxy.observability import log_event


class Sender(Protocol):
    """A connection that holds its writes until the outbox says to send them: it asks
    `Outbox.defer` when it has nothing held yet, and holds or writes as told."""

    def send_held(self) -> None: ...

    def abort(self) -> None: ...


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
                sender.abort()
