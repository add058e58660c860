"""The upstream pool never loses a connection, even when a waiter gives up at the
very moment a connection is handed to it."""

from __future__ import annotations

import asyncio
import contextlib

from keyproxy.config.model import Upstream
from keyproxy.wire.upstream import UpstreamPool


async def _handed_over_while_cancelled() -> tuple[int, int, bool]:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = Upstream(
        url=f"http://127.0.0.1:{port}",
        scheme="http",
        host="127.0.0.1",
        port=port,
        base_path="",
        host_header=f"127.0.0.1:{port}",
        timeout=0.5,
        max_connections=1,
    )
    loop = asyncio.get_running_loop()
    pool = UpstreamPool(upstream, loop)
    try:
        first = await pool.acquire()
        waiting = loop.create_task(pool.acquire())
        await asyncio.sleep(0.05)
        # What a timeout firing in the same loop turn as a release looks like: the
        # waiter already holds the connection when its task is cancelled.
        pool.release(first, reusable=True)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        again = await pool.acquire()  # the one connection must still be usable
        return pool.open_connections, len(pool._idle), again is first
    finally:
        pool.close()
        server.close()


def test_a_connection_handed_to_a_cancelled_waiter_goes_back_to_the_pool() -> None:
    open_connections, idle, same = asyncio.run(_handed_over_while_cancelled())
    assert (open_connections, idle, same) == (1, 0, True)
