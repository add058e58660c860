"""The admin listener: health and readiness, never on the public port.

Not on the hot path, so it uses aiohttp's web application for clarity.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from keyproxy.app import ProxyServer

READY_PROBE_TIMEOUT = 1.0


async def upstream_reachable(host: str, port: int, tls: ssl.SSLContext | None = None) -> bool:
    """A connection (and, for HTTPS, a verified TLS handshake) to the upstream succeeds."""
    try:
        async with asyncio.timeout(READY_PROBE_TIMEOUT):
            _, writer = await asyncio.open_connection(
                host, port, ssl=tls, server_hostname=host if tls else None
            )
    except (OSError, TimeoutError, ssl.SSLError):
        return False
    writer.close()
    return True


def create_admin_app(proxy: ProxyServer) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        config = proxy.serving.config
        holder = proxy.holder
        body = {
            "config": config.summary(),
            "reloads": dict(holder.reloads),
            "last_reload_error": holder.last_error,
            "rate_limit_store_failures": proxy.services.limits.store_failures,
        }
        if proxy.draining:
            return web.json_response({"status": "draining", **body}, status=503)
        up = config.upstream
        if not await upstream_reachable(up.host, up.port, proxy.serving.pool.ssl_context):
            return web.json_response(
                {"status": "not ready", "reason": "upstream unreachable", **body}, status=503
            )
        return web.json_response({"status": "ready", **body})

    async def metrics(request: web.Request) -> web.Response:
        registry = proxy.observer.registry()  # this process's counts, copied on the loop
        # Reading the other workers' snapshots touches files: off the loop.
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_admin(proxy: ProxyServer, sockets: list[socket.socket]) -> web.AppRunner:
    """Serve the admin app on already bound sockets (with workers, each worker accepts on
    the supervisor's one admin socket, so /healthz and /readyz answer whichever is free)."""
    runner = web.AppRunner(create_admin_app(proxy), access_log=None)
    await runner.setup()
    for sock in sockets:
        await web.SockSite(runner, sock).start()
    return runner
