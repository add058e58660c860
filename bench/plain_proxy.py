"""The pass-through proxy users write by hand, kept as the baseline keyproxy must beat.

It is deliberately the common ~40 lines (aiohttp app, one ClientSession,
uvloop, streamed body, secret header added) and deliberately fair: its only
check is comparing one header, so any gap to keyproxy is the price of policy.

Usage: BENCH_SECRET=... python bench/plain_proxy.py --port 8001 --upstream http://127.0.0.1:8000
       --key pk_...
"""

from __future__ import annotations

import argparse
import os

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host",
     "proxy-authorization", "proxy-authenticate", "x-api-key"}
)  # fmt: skip


def make_app(upstream: str, key: str, secret: str) -> web.Application:
    async def session_ctx(app: web.Application):
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            app["session"] = session
            yield

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-API-Key") != key:
            return web.json_response({"error": "unauthorized"}, status=401)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["X-API-Key"] = secret
        body = request.content if request.body_exists else None
        async with request.app["session"].request(
            request.method, upstream + request.rel_url.raw_path_qs, headers=headers, data=body,
            allow_redirects=False,
        ) as up:  # fmt: skip
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP})  # fmt: skip
            await resp.prepare(request)
            async for chunk in up.content.iter_chunked(65536):
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description="plain aiohttp pass-through proxy (bench baseline)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--key", required=True)
    args = p.parse_args()
    app = make_app(args.upstream.rstrip("/"), args.key, os.environ["BENCH_SECRET"])
    try:
        import uvloop
    except ImportError:
        loop = None
    else:
        loop = uvloop.new_event_loop()
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
