"""`keyproxy demo`: the sample backend, keyproxy in front of it, curl lines, a browser page.

The backend accepts one secret that only keyproxy knows (a fresh random one
per run); the sample keys in `config.example.yaml` are public demo keys whose
hashes the example file holds. A small page on its own origin (a third port)
calls keyproxy from the browser with the publishable key and a custom header,
which is the first user's story: CORS preflight, a filtered read, the
rate-limit headers and a refusal the script can read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

import asyncio
import dataclasses
import os
import secrets
import socket
import sys
import time
from importlib import resources

from keyproxy.config import parse_config
from keyproxy.config.model import Config, HostPort
from keyproxy.config.reload import ConfigHolder
from keyproxy.lifecycle import install_uvloop, serve

#: Public sample keys matching the hashes in config.example.yaml. Demo only.
DEMO_KEYS = {
    "website": "pk_5f89f583e09133e1d06f543f6424af13789de09e649e0a2af706d5bd390ebcdc",
    "batch-writer": "sk_dc3283f4f8ea8d3b2b5fceb4ad2e4fa7fdc93ceb260d5c678d098bb328d210e1",
    "app": "sk_1cff6356cd2d6d70d985fb38607be1934a3e5aecf549184f8c89235686aed041",
    "admin": "sk_a91ce2de0b0d34b3b3cd268c3b2778d61fca5039eabde514c8bb41c54333fce5",
}
DEMO_REFERER = "https://app.example.com/"
#: The demo page's origin as config.example.yaml writes it (in cors and the website
#: key's referers); the demo swaps in the port it actually serves the page on.
DEMO_PAGE_ORIGIN = "http://127.0.0.1:8081"
#: The demo's logged-in user and how long the printed token lasts.
DEMO_USER = "bob"
DEMO_TOKEN_TTL = 24 * 3600


def demo_token(config: Config, user: str = DEMO_USER, now: float | None = None) -> str:
    """A token for `user`, signed as the example's `users.jwt` section expects (demo only)."""
    import jwt

    users = config.users
    assert users is not None
    s = users.settings
    assert s.secret is not None
    issued = int(time.time() if now is None else now)
    claims = {"sub": user, "iat": issued, "exp": issued + DEMO_TOKEN_TTL}
    if s.issuer is not None:
        claims["iss"] = s.issuer
    if s.audience is not None:
        claims["aud"] = s.audience
    return jwt.encode(claims, s.secret, algorithm=s.algorithms[0])


def example_config_text() -> str:
    return resources.files("keyproxy").joinpath("config.example.yaml").read_text()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_config(
    secret: str, backend_port: int, proxy_port: int, admin_port: int, page_port: int = 8081
) -> Config:
    """The example configuration, pointed at this run's backend, ports and page origin."""
    text = example_config_text().replace(DEMO_PAGE_ORIGIN, f"http://127.0.0.1:{page_port}")
    config = parse_config(text, "config.example.yaml", {**os.environ, "UPSTREAM_SECRET": secret})
    upstream = dataclasses.replace(
        config.upstream,
        url=f"http://127.0.0.1:{backend_port}",
        host="127.0.0.1",
        port=backend_port,
        host_header=f"127.0.0.1:{backend_port}",
    )
    server = dataclasses.replace(
        config.server,
        listen=HostPort("127.0.0.1", proxy_port),
        admin_listen=HostPort("127.0.0.1", admin_port),
    )
    return dataclasses.replace(config, upstream=upstream, server=server, source="demo")


def _self_command() -> str:
    """How this user ran keyproxy, so the printed explain line works when pasted."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0.endswith("__main__.py") or not argv0:
        return "python -m keyproxy"
    return argv0 if os.sep in argv0 else "keyproxy"


def _example_path() -> str:
    if os.path.exists("config.example.yaml"):
        return "config.example.yaml"
    return str(resources.files("keyproxy").joinpath("config.example.yaml"))


def demo_page(proxy: str, key: str) -> str:
    """The browser half of the demo: one page, three fetches, what came back shown."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>keyproxy demo</title>
<style>body{{font:15px system-ui;margin:2em;max-width:50em}}
pre{{background:#f4f4f4;padding:1em}}</style>
</head><body>
<h1>A web app calling keyproxy</h1>
<p>This page is on its own origin; it calls <code>{proxy}</code> with the publishable
key <code>website</code> and a custom header, so the browser sends a CORS preflight first.</p>
<h2>Posts, as the public key sees them (no email, no author.phone)</h2><pre id="read">pending</pre>
<p>X-RateLimit-Remaining, read by the script: <b id="remaining">pending</b></p>
<h2>A DELETE the key may not make</h2><pre id="refusal">pending</pre>
<script>
const headers = {{"X-API-Key": "{key}", "X-Demo-Client": "demo-page"}};
function put(id, value) {{ document.getElementById(id).textContent = value; }}
async function run() {{
  try {{
    const answer = await fetch("{proxy}/v1/data/posts", {{headers}});
    put("read", answer.status + "\\n" + JSON.stringify(await answer.json(), null, 2));
    put("remaining", answer.headers.get("X-RateLimit-Remaining") ?? "unreadable");
  }} catch (error) {{ put("read", "fetch failed: " + error); }}
  try {{
    const refused = await fetch("{proxy}/v1/data/posts/1", {{method: "DELETE", headers}});
    put("refusal", refused.status + " " + JSON.stringify(await refused.json(), null, 2));
  }} catch (error) {{ put("refusal", "fetch failed: " + error); }}
}}
run();
</script>
</body></html>
"""


async def start_page(proxy: str, key: str, port: int) -> web.AppRunner:
    """Serve the demo page on 127.0.0.1:`port` (its own origin); returns the runner."""
    from aiohttp import web

    page = demo_page(proxy, key)

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def instructions(base: str, token: str, page: str | None = None) -> str:
    read, admin, app = DEMO_KEYS["website"], DEMO_KEYS["admin"], DEMO_KEYS["app"]
    explain = f"UPSTREAM_SECRET=x {_self_command()} explain -c {_example_path()}"
    browser = (
        f"  # and in a browser: a page on its own origin calling keyproxy with the\n"
        f"  # browser key (CORS preflight, a filtered read, the rate-limit headers):\n"
        f"  open {page}\n\n"
        if page
        else ""
    )
    return f"""
keyproxy demo: a sample REST backend, reachable only through keyproxy at {base}
(the backend's secret was generated for this run and never leaves keyproxy).

  # the browser key reads (it may only be used from *.example.com pages), and its
  # answers never show email or author.phone (fields: exclude in the config):
  curl -s {base}/v1/data/posts/1 -H 'X-API-Key: {read}' -e {DEMO_REFERER}

  # the admin key sees the whole record (the cache holds it once, filtered per key):
  curl -s {base}/v1/data/posts/1 -H 'X-API-Key: {admin}'

  # the same key is refused a DELETE, with a JSON error:
  curl -s -X DELETE {base}/v1/data/posts/1 -H 'X-API-Key: {read}' -e {DEMO_REFERER}

  # the admin key deletes:
  curl -si -X DELETE {base}/v1/data/posts/1 -H 'X-API-Key: {admin}'

  # a logged-in user ({DEMO_USER}, with a demo token valid for 24 h) creates a post...
  curl -s -X POST {base}/v1/data/posts -H 'X-API-Key: {app}' \\
      -H 'Authorization: Bearer {token}' \\
      -H 'Content-Type: application/json' -d '{{"title": "Hello from {DEMO_USER}"}}'

  # ...and is refused deleting alice's post 3 (only the owner may):
  curl -s -X DELETE {base}/v1/data/posts/3 -H 'X-API-Key: {app}' \\
      -H 'Authorization: Bearer {token}'

  # and why was the first one refused? (offline, against the same file)
  {explain} --key {read} \\
      --referer {DEMO_REFERER} DELETE {base}/v1/data/posts/1

{browser}Press Ctrl-C to stop.
"""


async def _run(port: int | None) -> int:
    from keyproxy.commands.demo_backend import start_backend

    secret = secrets.token_hex(24)
    runner, backend_port = await start_backend(secret)
    proxy_port = port if port is not None else (8080 if _port_free(8080) else _free_port())
    admin_port = 9901 if _port_free(9901) and proxy_port != 9901 else _free_port()
    page_port = 8081 if _port_free(8081) and 8081 not in (proxy_port, admin_port) else _free_port()
    holder = ConfigHolder(demo_config(secret, backend_port, proxy_port, admin_port, page_port))
    base = f"http://127.0.0.1:{proxy_port}"
    page_runner = await start_page(base, DEMO_KEYS["website"], page_port)
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve(holder, ready=ready))
    done, _ = await asyncio.wait({server, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready in done:
        token = demo_token(holder.config)
        print(instructions(base, token, f"http://127.0.0.1:{page_port}/"), flush=True)
    try:
        return await server
    finally:
        await page_runner.cleanup()
        await runner.cleanup()


def run_demo(port: int | None = None) -> int:
    install_uvloop()
    try:
        return asyncio.run(_run(port))
    except KeyboardInterrupt:
        return 0
