"""An identity provider's JWKS endpoint, as its own process, for the token tests.

`python tests/jwks_server.py --file keys.json --port 0` serves the file's current
content at `/jwks.json` (re-read on every request, so a test rotates the keys by
rewriting the file) and counts the fetches at `/__control/fetches`. It prints
`READY <port>` once listening and serves until SIGTERM; stopping it is how a
test takes the identity provider down.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from aiohttp import web

FETCHES = web.AppKey("fetches", list)
FILE = web.AppKey("file", Path)


async def jwks(request: web.Request) -> web.Response:
    request.app[FETCHES].append(1)
    return web.Response(body=request.app[FILE].read_bytes(), content_type="application/json")


async def fetches(request: web.Request) -> web.Response:
    return web.json_response(len(request.app[FETCHES]))


async def serve(file: Path, port: int) -> None:
    app = web.Application()
    app[FETCHES] = []
    app[FILE] = file
    app.router.add_get("/jwks.json", jwks)
    app.router.add_get("/__control/fetches", fetches)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"READY {runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--file", type=Path, required=True)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    asyncio.run(serve(args.file, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
