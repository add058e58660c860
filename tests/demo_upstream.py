"""The demo backend (records with an owner field) as its own process, for self-record tests.

`python tests/demo_upstream.py SECRET` prints `READY <port>` and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from keyproxy.commands.demo_backend import start_backend


async def serve(secret: str) -> None:
    runner, port = await start_backend(secret)
    print(f"READY {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
