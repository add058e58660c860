"""One Redis connection that sends every hit of an event-loop turn as one script call.

Why not redis-py's client: each of its calls takes a pooled connection, packs,
writes, awaits a read with its own timeout and releases the connection again,
about 130 µs of CPU per request, which made the Redis store slower than the
proxy it serves. Here hits only queue up; at the end of the loop turn (or when
the batch in flight is answered) all queued hits go out as one EVALSHA of a
script that decides them one after another, and the one reply is split among
the waiters. The cost of a round trip is shared by every hit of the batch.

At most one batch is in flight. Hits arriving meanwhile wait for its answer and
then go together, so batches grow with load (Nagle's idea), and Redis runs one
script per batch rather than one per request. The script runs atomically, so a
batch decides exactly what the same hits sent one by one in that order would.

Connection set-up (TLS, AUTH, SELECT) follows the URL as redis-py reads it
(`parse_url` and its connection classes provide host, credentials and the TLS
context); commands are packed by `hiredis.pack_command` and replies parsed by
`hiredis.Reader`. Every hit is bounded by `timeout` from the moment it queued:
the batch in flight carries one timer for its oldest hit, and when it fires, or
the connection fails, the connection is dropped and every waiter, sent or still
queued, gets the error at once. No retries: the caller decides what an error means.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast

import hiredis
from redis.asyncio.connection import (
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: Most hits in one script call: bounds the time Redis spends in one script (other
#: clients wait meanwhile); more queued hits go out as several calls in one write.
MAX_BATCH = 256

_Hit = tuple[list[str], list[str | int], "asyncio.Future[list[int]]"]


class _Wire(asyncio.Protocol):
    """Feeds received bytes to the owner; one per connection, so a late callback
    from a dropped connection is recognised and ignored."""

    def __init__(self, owner: ScriptBatcher) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        self.owner._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self, exc)


class ScriptBatcher:
    """Runs one Lua script for batches of hits over one connection.

    `submit(keys, args)` queues one hit (its KEYS and ARGV parts, as the script
    expects them one after another) and returns a future of the hit's `width`
    reply values. The script receives `EVALSHA sha <all keys> <prefix> <all args>`
    and must return `width` integers per hit, in order.
    """

    def __init__(
        self, url: str, script: str, sha: str, prefix: list[str], width: int, timeout: float
    ) -> None:
        settings: dict[str, Any] = dict(parse_url(url))
        connection_class = cast("type[Connection]", settings.pop("connection_class", Connection))
        # Built only to read the URL's settings the way redis-py does; never connected.
        self._settings = connection_class(**settings)
        self._script = script.encode()
        self._sha = sha.encode()
        self._prefix = prefix
        self._width = width
        self._timeout = timeout
        self._queued: list[_Hit] = []
        self._oldest = 0.0  # loop time the first queued hit arrived
        self._flush_scheduled = False
        # Sent and unanswered: (hits, or None for a set-up command; its waiter).
        self._in_flight: deque[tuple[list[_Hit] | None, asyncio.Future[Any] | None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._wire: _Wire | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._reader = hiredis.Reader()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def submit(self, keys: list[str], args: list[str | int]) -> asyncio.Future[list[int]]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        waiter: asyncio.Future[list[int]] = loop.create_future()
        if self._closed:
            waiter.set_exception(RedisConnectionError("the limiter is closed"))
            return waiter
        queued = self._queued
        if not queued:
            self._oldest = loop.time()
            if not self._flush_scheduled and not self._in_flight:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
        queued.append((keys, args, waiter))
        return waiter

    def _flush(self) -> None:
        """Send what is queued, unless a batch is in flight (its answer flushes again)."""
        self._flush_scheduled = False
        if self._in_flight or not self._queued:
            return
        wire = self._wire
        if wire is None or wire.transport is None:
            if self._connecting is None:
                assert self._loop is not None
                self._connecting = self._loop.create_task(self._connect())
            return
        queued, self._queued = self._queued, []
        packed = []
        for start in range(0, len(queued), MAX_BATCH):
            batch = queued[start : start + MAX_BATCH]
            packed.append(self._pack(self._sha, batch))
            self._in_flight.append((batch, None))
        wire.transport.write(b"".join(packed))
        self._arm()

    def _pack(self, script: bytes, batch: list[_Hit]) -> bytes:
        keys: list[str] = []
        args: list[str | int] = []
        for hit_keys, hit_args, _ in batch:
            keys += hit_keys
            args += hit_args
        command = b"EVALSHA" if script is self._sha else b"EVAL"
        packed = (command, script, len(keys), *keys, *self._prefix, *args)
        return hiredis.pack_command(packed)  # type: ignore[arg-type]  # hiredis's stub types the command as a 1-tuple

    def _arm(self) -> None:
        """One timer for what is in flight, due when its oldest hit's time is up."""
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer = self._loop.call_at(self._oldest + self._timeout, self._expired)

    def _expired(self) -> None:
        self._timer = None
        self._fail(RedisTimeoutError("no answer from Redis in time"))

    def _received(self, wire: _Wire, data: bytes) -> None:
        if wire is not self._wire:
            return
        reader = self._reader
        reader.feed(data)
        in_flight = self._in_flight
        while in_flight:
            reply = reader.gets()
            if reply is False:
                break
            batch, waiter = in_flight.popleft()
            if isinstance(reply, hiredis.ReplyError):
                if batch is not None and str(reply).startswith("NOSCRIPT"):
                    # First use, or Redis restarted or was flushed: EVAL runs and caches it.
                    in_flight.append((batch, None))
                    assert wire.transport is not None
                    wire.transport.write(self._pack(self._script, batch))
                    continue
                error = ResponseError(str(reply))
                if batch is None:
                    if waiter is not None and not waiter.done():
                        waiter.set_exception(error)
                    continue
                for _, _, each in batch:
                    if not each.done():
                        each.set_exception(error)
                continue
            if batch is None:
                if waiter is not None and not waiter.done():
                    waiter.set_result(reply)
                continue
            width = self._width
            for position, (_, _, each) in enumerate(batch):
                if not each.done():
                    each.set_result(reply[position * width : position * width + width])
        if not in_flight:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._queued and not self._flush_scheduled:
                # Next turn, after the woken callers ran: their next hits join this batch.
                self._flush_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._flush)

    def _lost(self, wire: _Wire, exc: Exception | None) -> None:
        if wire is self._wire:
            error = RedisConnectionError("connection to Redis lost")
            error.__cause__ = exc
            self._fail(error)

    def _fail(self, error: Exception) -> None:
        """Drop the connection and give every waiter, sent or queued, the error now."""
        wire, self._wire = self._wire, None
        if wire is not None and wire.transport is not None:
            wire.transport.abort()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._reader = hiredis.Reader()
        in_flight, self._in_flight = self._in_flight, deque()
        queued, self._queued = self._queued, []
        for batch, waiter in in_flight:
            for each in [waiter] if batch is None else [hit[2] for hit in batch]:
                if each is not None and not each.done():
                    each.set_exception(error)
        for _, _, each in queued:
            if not each.done():
                each.set_exception(error)

    async def _connect(self) -> None:
        """Connect and authenticate within the oldest queued hit's time, then flush."""
        settings = self._settings
        loop = asyncio.get_running_loop()
        wire = _Wire(self)
        try:
            async with asyncio.timeout_at(self._oldest + self._timeout):
                if isinstance(settings, UnixDomainSocketConnection):
                    await loop.create_unix_connection(lambda: wire, settings.path)
                else:
                    tls = None
                    if isinstance(settings, SSLConnection):
                        tls = settings.ssl_context.get()
                    await loop.create_connection(
                        lambda: wire, settings.host, settings.port, ssl=tls
                    )
                self._wire = wire
                self._reader = hiredis.Reader()
                for command in _setup_commands(settings):
                    answered = loop.create_future()
                    self._in_flight.append((None, answered))
                    assert wire.transport is not None
                    wire.transport.write(hiredis.pack_command(command))  # type: ignore[arg-type]  # hiredis's stub types the command as a 1-tuple
                    await answered
        except Exception as exc:  # any failure (a bad host name too) fails every waiter
            if wire.transport is not None:
                wire.transport.abort()
            error = RedisConnectionError("cannot connect to Redis")
            error.__cause__ = exc
            self._fail(error)
            return
        finally:
            self._connecting = None
        if self._closed:
            wire.transport.abort()  # type: ignore[union-attr]  # connected above
            return
        self._flush()

    async def command(self, *args: str) -> Any:
        """One plain command on its own (readiness checks); bounded by the timeout."""
        loop = self._loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout):
            if self._wire is None:
                if self._connecting is None:
                    if not self._queued:
                        self._oldest = loop.time()  # the clock `_connect` is bounded by
                    self._connecting = loop.create_task(self._connect())
                await asyncio.shield(self._connecting)
            wire = self._wire
            if wire is None or wire.transport is None:
                raise RedisConnectionError("cannot connect to Redis")
            answered = loop.create_future()
            self._in_flight.append((None, answered))
            wire.transport.write(hiredis.pack_command(args))  # type: ignore[arg-type]  # hiredis's stub types the command as a 1-tuple
            if self._timer is None:  # else the batch in flight is answered before it
                self._timer = loop.call_at(loop.time() + self._timeout, self._expired)
            return await answered

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        self._fail(RedisConnectionError("the limiter is closed"))


def _setup_commands(settings: Any) -> list[tuple[str | int, ...]]:
    """AUTH and SELECT as the URL asks; RESP2, so no HELLO (one round trip less)."""
    commands: list[tuple[str | int, ...]] = []
    if settings.password:
        if settings.username:
            commands.append(("AUTH", settings.username, settings.password))
        else:
            commands.append(("AUTH", settings.password))
    if settings.db:
        commands.append(("SELECT", settings.db))
    return commands
