"""A recording REST upstream for keyproxy's end-to-end tests.

Run as its own process (`python tests/upstream_server.py --port 0 ...`) so the
proxy under test talks to it over a real socket, exactly as it would talk to a
production backend. It prints `READY <port>` on stdout once listening and
serves until SIGTERM.

Like the backends keyproxy fronts, it accepts only its own secret: every
configured form (`--header-secret`, `--basic`, `--query-secret`) must be
present once and exact, or it answers 401. It records every request as it
arrived on the wire -- raw request target, every header line in order with
repeats -- so a test can prove both halves of the proxy's promise: the client's
key never reached the upstream, and the upstream's secret always did.

Control endpoints under `/__control/` skip the secret and are not recorded;
tests call them directly, never through the proxy. Every other path that is
not a behaviour endpoint below is echoed, so a proxy configured with the
example configuration's routes can be pointed here as is.

With `--tls-cert FILE --tls-key FILE` it serves HTTPS instead, like a backend
behind an internal CA.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import gzip
import hashlib
import json
import signal
import ssl
import sys
import zlib
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

MAX_RECORDS = 10_000
BODY_PREVIEW = 64 * 1024
MAX_GENERATED = 256 * 1024 * 1024
MAX_WAIT_MS = 120_000
BIG_PATTERN = bytes(range(256)) * 256


@dataclass
class UpstreamConfig:
    """The secret this upstream insists on, in each form a backend might use."""

    header_secrets: dict[str, str] = field(default_factory=dict)
    basic: tuple[str, str] | None = None
    query_secrets: dict[str, str] = field(default_factory=dict)
    base_url: str = ""  # filled in once the port is known; used by /redirect and /leak

    def secret_values(self) -> list[str]:
        values = [*self.header_secrets.values(), *self.query_secrets.values()]
        if self.basic:
            values += [self.basic[1], self.basic_header()]
        return values

    def basic_header(self) -> str:
        assert self.basic is not None
        return "Basic " + base64.b64encode(":".join(self.basic).encode()).decode()


CONFIG = web.AppKey("config", UpstreamConfig)
RECORDS = web.AppKey("records", collections.deque)
SEQ = web.AppKey("seq", list)
# The record of the request being handled: handlers run in the middleware's context.
CURRENT: ContextVar[dict[str, Any]] = ContextVar("current_record")


def _text(raw: bytes) -> str:
    # Lossless for any byte; tests mostly send ASCII, which stays readable.
    return raw.decode("utf-8", "surrogateescape")


def _authorized(request: web.Request, config: UpstreamConfig) -> bool:
    for name, value in config.header_secrets.items():
        if request.headers.getall(name, []) != [value]:
            return False
    for name, value in config.query_secrets.items():
        if request.rel_url.query.getall(name, []) != [value]:
            return False
    if config.basic:
        given = request.headers.getall("Authorization", [])
        if len(given) != 1:
            return False
        scheme, _, token = given[0].partition(" ")
        try:
            decoded = base64.b64decode(token, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        if scheme.lower() != "basic" or decoded != ":".join(config.basic):
            return False
    return True


async def _consume_body(request: web.Request) -> tuple[int, str, bytes]:
    """Read the body in chunks, hashing as it goes, so huge uploads stay cheap."""
    digest, length, preview = hashlib.sha256(), 0, bytearray()
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
        if len(preview) < BODY_PREVIEW:
            preview += chunk[: BODY_PREVIEW - len(preview)]
    return length, digest.hexdigest(), bytes(preview)


@web.middleware
async def record_and_authorize(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.raw_path.startswith("/__control/"):
        return await handler(request)
    app = request.app
    body_len, body_sha256, preview = await _consume_body(request)
    app[SEQ][0] += 1
    record: dict[str, Any] = {
        "seq": app[SEQ][0],
        "method": request.method,
        "raw_path": request.raw_path,
        "version": f"{request.version.major}.{request.version.minor}",
        "headers": [[_text(n), _text(v)] for n, v in request.raw_headers],
        "body_len": body_len,
        "body_sha256": body_sha256,
        "body": _text(preview) if body_len <= BODY_PREVIEW else None,
        "peer": request.remote,
        "authorized": _authorized(request, app[CONFIG]),
        "status": None,
        "aborted": False,  # the server reset the connection on purpose (/crash...)
        "client_gone": False,  # the client hung up while the response was streaming
    }
    app[RECORDS].append(record)
    CURRENT.set(record)
    if not record["authorized"]:
        record["status"] = 401
        return web.json_response({"error": "bad upstream secret"}, status=401)
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # bad parameters: 400, routed 405...
        record["status"] = exc.status
        raise
    if not record["aborted"]:
        record["status"] = response.status
    return response


def _body_info() -> dict[str, Any]:
    record = CURRENT.get()
    return {"body_len": record["body_len"], "body_sha256": record["body_sha256"]}


def _int(request: web.Request, name: str, upper: int) -> int:
    try:
        value = int(request.match_info.get(name) or request.query.get(name, ""))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None
    if not 0 <= value <= upper:
        raise web.HTTPBadRequest(text=f"{name} must be between 0 and {upper}")
    return value


def _opt_int(request: web.Request, name: str, default: int, upper: int) -> int:
    return _int(request, name, upper) if name in request.query else default


def sample_item(i: int) -> dict[str, Any]:
    """Carries the fields the README's `fields` examples name, so bodies can be filtered."""
    return {
        "id": i,
        "title": f"Post {i}",
        "createdBy": f"user{i % 7}",
        "email": f"user{i}@example.com",
        "author": {"name": f"Author {i}", "phone": f"+1-555-{i % 10000:04d}"},
    }


def json_body(nbytes: int) -> bytes:
    """A JSON array of sample items, as long as fits in `nbytes` (at least one item)."""
    parts: list[str] = []
    size = 2
    while True:
        item = json.dumps(sample_item(len(parts)), separators=(",", ":"))
        if parts and size + len(item) + 1 > nbytes:
            break
        parts.append(item)
        size += len(item) + (1 if len(parts) > 1 else 0)
    return ("[" + ",".join(parts) + "]").encode()


def big_body(nbytes: int) -> bytes:
    """The exact bytes `/big/{nbytes}` sends, for tests that compare content."""
    whole, rest = divmod(nbytes, len(BIG_PATTERN))
    return BIG_PATTERN * whole + BIG_PATTERN[:rest]


async def echo(request: web.Request) -> web.Response:
    path, _, query = request.raw_path.partition("?")
    response = web.json_response(
        {
            "method": request.method,
            "path": path,
            "query": query,
            "headers": [[_text(n), _text(v)] for n, v in request.raw_headers],
            **_body_info(),
        }
    )
    # `X-Echo-Response-Header: Name=value` asks for that header in the answer.
    for wanted in request.headers.getall("X-Echo-Response-Header", []):
        name, _, value = wanted.partition("=")
        response.headers.add(name, value)
    return response


async def json_sized(request: web.Request) -> web.Response:
    body = json_body(_int(request, "nbytes", MAX_GENERATED))
    return web.Response(body=body, content_type="application/json")


async def big(request: web.Request) -> web.StreamResponse:
    nbytes = _int(request, "nbytes", MAX_GENERATED)
    digest = hashlib.sha256()
    for offset in range(0, nbytes, len(BIG_PATTERN)):
        digest.update(BIG_PATTERN[: nbytes - offset])
    response = web.StreamResponse(
        headers={"Content-Type": "application/octet-stream", "X-Body-Sha256": digest.hexdigest()}
    )
    response.content_length = nbytes
    chunks = (BIG_PATTERN[: nbytes - offset] for offset in range(0, nbytes, len(BIG_PATTERN)))
    return await _send(request, response, chunks)


async def _send(
    request: web.Request,
    response: web.StreamResponse,
    chunks: Iterable[bytes],
    delay_ms: int = 0,
    first_delay_ms: int = 0,
) -> web.StreamResponse:
    """Headers now, then the chunks; a client that leaves midway is normal, not an error.

    Proxy tests hang up on purpose (timeouts, cancelled streams); the server
    must stay quiet and keep serving.
    """
    await response.prepare(request)
    try:
        if first_delay_ms:
            await asyncio.sleep(first_delay_ms / 1000)
        for chunk in chunks:
            await response.write(chunk)
            if delay_ms:
                await asyncio.sleep(delay_ms / 1000)
        await response.write_eof()
    except ConnectionResetError:
        CURRENT.get()["client_gone"] = True
    return response


async def _stream_lines(
    request: web.Request, lines: Iterable[bytes], content_type: str, delay_ms: int
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.enable_chunked_encoding()
    return await _send(request, response, lines, delay_ms)


async def chunked(request: web.Request) -> web.StreamResponse:
    """Delays between chunks let a test see the first chunk before the last is sent."""
    n = _int(request, "n", 100_000)
    delay = _opt_int(request, "delay_ms", 20, 10_000)
    lines = (f"chunk {i}\n".encode() for i in range(n))
    return await _stream_lines(request, lines, "text/plain", delay)


async def ndjson(request: web.Request) -> web.StreamResponse:
    n = _int(request, "n", 1_000_000)
    delay = _opt_int(request, "delay_ms", 0, 10_000)
    lines = (json.dumps(sample_item(i)).encode() + b"\n" for i in range(n))
    return await _stream_lines(request, lines, "application/x-ndjson", delay)


async def slow(request: web.Request) -> web.Response:
    ms = _int(request, "ms", MAX_WAIT_MS)
    await asyncio.sleep(ms / 1000)
    return web.json_response({"slept_ms": ms})


async def slow_body(request: web.Request) -> web.StreamResponse:
    """Headers go out at once; a proxy timeout must also cover the body."""
    ms = _int(request, "ms", MAX_WAIT_MS)
    body = json.dumps({"slept_ms": ms}).encode()
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    return await _send(request, response, [body], first_delay_ms=ms)


async def status(request: web.Request) -> web.Response:
    code = _int(request, "code", 599)
    if code < 200:
        raise web.HTTPBadRequest(text="code must be between 200 and 599")
    if code in (204, 304):
        return web.Response(status=code)
    return web.json_response({"status": code}, status=code)


async def redirect(request: web.Request) -> web.Response:
    """A redirect to the upstream itself, with the secret in the URL as some backends do."""
    config = request.app[CONFIG]
    query = list(config.query_secrets.items()) or [
        ("apikey", v) for v in config.secret_values()[:1]
    ]
    location = f"{config.base_url}/next" + (f"?{urlencode(query)}" if query else "")
    code = _opt_int(request, "status", 302, 399)
    if code not in (301, 302, 303, 307, 308):
        raise web.HTTPBadRequest(text="status must be a redirect code")
    return web.Response(status=code, headers={"Location": location})


async def leak(request: web.Request) -> web.Response:
    """Every secret, in every response header a careless backend might put it in."""
    config = request.app[CONFIG]
    response = web.json_response({"ok": True})
    for name, value in config.header_secrets.items():
        response.headers.add(name, value)
    if config.basic:
        response.headers.add("X-Echo-Authorization", config.basic_header())
    for value in config.secret_values():
        response.headers.add("X-Echo-Key", value)
        response.headers.add("Set-Cookie", f"sess={value}; Path=/; HttpOnly")
        link = f"{config.base_url}/next?{urlencode({'apikey': value})}"
        response.headers.add("Link", f'<{link}>; rel="next"')
    return response


async def hop(request: web.Request) -> web.Response:
    response = web.json_response({"hop": True})
    for name, value in [
        ("Connection", "close, X-Private"),
        ("X-Private", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "x"),
        ("Upgrade", "h2c"),
        ("X-End-To-End", "kept"),
    ]:
        response.headers[name] = value
    response.force_close()  # honour the Connection: close we just sent
    return response


def _abort(request: web.Request) -> None:
    """Reset the connection the way a crashing backend does; recorded as aborted."""
    CURRENT.get()["aborted"] = True
    assert request.transport is not None
    request.transport.abort()


async def crash(request: web.Request) -> web.StreamResponse:
    _abort(request)
    return web.Response()  # never reaches the client


async def crash_mid_body(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = 100_000
    await response.prepare(request)
    await response.write(b"x" * 64)
    await asyncio.sleep(0.05)  # let the partial body leave before the reset
    _abort(request)
    return response


async def gzipped(request: web.Request) -> web.Response:
    """`?size=` is the decompressed size, for decompression-limit tests."""
    body = gzip.compress(json_body(_opt_int(request, "size", 2048, MAX_GENERATED)))
    return web.Response(
        body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )


SHAPES = ("object", "array", "ndjson", "envelope")


def shaped_body(shape: str) -> tuple[bytes, str]:
    """Two sample records in one of the body shapes field filtering must handle."""
    items = [sample_item(1), sample_item(2)]
    if shape == "object":
        return json.dumps(items[0]).encode(), "application/json"
    if shape == "array":
        return json.dumps(items).encode(), "application/json"
    if shape == "ndjson":
        return b"".join(json.dumps(i).encode() + b"\n" for i in items), "application/x-ndjson"
    if shape == "envelope":
        return json.dumps({"data": items, "total": 2}).encode(), "application/json"
    raise web.HTTPBadRequest(text="unknown shape")


def _compress(body: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(body)
    if coding == "deflate":
        return zlib.compress(body)
    if coding == "br":
        import brotli

        return brotli.compress(body)
    return body


async def shaped(request: web.Request) -> web.StreamResponse:
    """`/shaped/{shape}?coding=gzip|deflate|br&framing=length|chunked&etag=1`.

    The coding is applied whatever the request's Accept-Encoding says, as some
    servers do; a chunked answer is cut into small pieces.
    """
    body, content_type = shaped_body(request.match_info["shape"])
    coding = request.query.get("coding", "identity")
    data = _compress(body, coding)
    headers = {"Content-Type": content_type, "ETag": '"v1"', "Accept-Ranges": "bytes"}
    if coding != "identity":
        headers["Content-Encoding"] = coding
    response = web.StreamResponse(headers=headers)
    if request.query.get("framing") == "chunked":
        response.enable_chunked_encoding()
    else:
        response.content_length = len(data)
    if request.method == "HEAD":
        await response.prepare(request)
        return response
    return await _send(request, response, [data[i : i + 7] for i in range(0, len(data), 7)])


async def echo_page(request: web.Request) -> web.StreamResponse:
    """A debug page quoting the request's headers in HTML (the secret among them),
    optionally gzip-compressed and cut so a header value spans two chunks."""
    rows = "".join(
        f"<tr><td>{_text(n)}</td><td>{_text(v)}</td></tr>" for n, v in request.raw_headers
    )
    body = f"<html><body><table>{rows}</table></body></html>".encode()
    coding = request.query.get("coding", "identity")
    data = _compress(body, coding)
    headers = {"Content-Type": "text/html"}
    if coding != "identity":
        headers["Content-Encoding"] = coding
    response = web.StreamResponse(headers=headers)
    response.content_length = len(data)
    cut = int(request.query.get("cut", "0")) or len(data) // 2
    return await _send(request, response, [data[:cut], data[cut:]], delay_ms=20)


async def echo_escaped(request: web.Request) -> web.Response:
    """The secret quoted as encoders escape it: `?style=json` every character as
    `\\u00hh` in a JSON string, `?style=html` every character as `&#ddd;` in a page."""
    secret = request.app[CONFIG].secret_values()[0]
    if request.query.get("style") == "html":
        page = "".join(f"&#{ord(c)};" for c in secret)
        return web.Response(text=f"<p>key: {page}</p>", content_type="text/html")
    escaped = "".join(f"\\u{ord(c):04x}" for c in secret)
    return web.Response(text=f'{{"key":"{escaped}"}}', content_type="application/json")


async def literal_body(request: web.Request) -> web.Response:
    """`/body?type=...&text=...`: exactly that body with that Content-Type."""
    return web.Response(
        body=request.query.get("text", "").encode(),
        headers={"Content-Type": request.query.get("type", "application/json")},
    )


async def express_redirect(request: web.Request) -> web.Response:
    """Express's `res.redirect(url)` body, with the secret in the URL."""
    config = request.app[CONFIG]
    secret = config.secret_values()[0]
    target = f"/posts?apikey={secret}"
    return web.Response(
        status=302,
        text=f"Found. Redirecting to {target}",
        headers={"Location": target},
        content_type="text/plain",
    )


async def upload(request: web.Request) -> web.Response:
    return web.json_response(_body_info())


#: `/owned/{table}/{id}`: two records with owners, for the self-record tests.
OWNED = {"1": {"id": 1, "createdBy": "alice"}, "2": {"id": 2, "createdBy": "bob"}}
#: The same ids in another tenant (`X-Tenant: other`), owned the other way round.
OWNED_OTHER_TENANT = {"1": {"id": 1, "createdBy": "bob"}, "2": {"id": 2, "createdBy": "alice"}}


async def owned_record(request: web.Request) -> web.Response:
    """A record read the way Laravel's `$request->id` reads it: a query (or body) `id`
    wins over the route's `{id}`, so `/owned/posts/1?id=2` answers record 2. A request
    header picks the tenant (or schema: PostgREST's `Accept-Profile`) it is read in."""
    records = OWNED_OTHER_TENANT if request.headers.get("X-Tenant") == "other" else OWNED
    record = records.get(request.query.get("id") or request.match_info["id"])
    if record is None:
        return web.json_response({"error": "not_found"}, status=404)
    if request.method in ("PATCH", "DELETE"):
        # answered as done, and changing nothing: the test reads the answer
        return web.json_response({**record, "changed": True})
    return web.json_response(record)


async def control_records(request: web.Request) -> web.Response:
    return web.json_response(list(request.app[RECORDS]))


async def control_reset(request: web.Request) -> web.Response:
    request.app[RECORDS].clear()
    return web.json_response({"reset": True})


def create_app(config: UpstreamConfig) -> web.Application:
    app = web.Application(middlewares=[record_and_authorize])
    app[CONFIG] = config
    app[RECORDS] = collections.deque(maxlen=MAX_RECORDS)
    app[SEQ] = [0]
    app.router.add_get("/__control/records", control_records)
    app.router.add_post("/__control/reset", control_reset)
    for path, handler in [
        ("/echo{tail:(/.*)?}", echo),
        ("/json/{nbytes}", json_sized),
        ("/big/{nbytes}", big),
        ("/raw/big/{nbytes}", big),  # the same bytes on another path (benchmarks)
        ("/cached/json/{nbytes}", json_sized),
        ("/chunked/{n}", chunked),
        ("/ndjson/{n}", ndjson),
        ("/slow/{ms}", slow),
        ("/slow-body/{ms}", slow_body),
        ("/status/{code}", status),
        ("/redirect", redirect),
        ("/leak", leak),
        ("/hop", hop),
        ("/crash", crash),
        ("/crash-mid-body", crash_mid_body),
        ("/gzip", gzipped),
        ("/shaped/{shape}", shaped),
        ("/echo-page", echo_page),
        ("/echo-escaped", echo_escaped),
        ("/express-redirect", express_redirect),
        ("/body", literal_body),
        ("/owned/{table}/{id}", owned_record),
    ]:
        app.router.add_route("*", path, handler)
    app.router.add_post("/upload", upload)
    app.router.add_put("/upload", upload)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def _pair(text: str, sep: str) -> tuple[str, str]:
    name, found, value = text.partition(sep)
    if not found or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME{sep}VALUE, got {text!r}")
    return name, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    named = {"action": "append", "default": [], "type": lambda s: _pair(s, "=")}
    parser.add_argument("--header-secret", metavar="NAME=VALUE", **named)
    parser.add_argument("--basic", metavar="USER:PASS", type=lambda s: _pair(s, ":"))
    parser.add_argument("--query-secret", metavar="NAME=VALUE", **named)
    parser.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS: PEM certificate chain")
    parser.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    return args


def _server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """HTTPS when a certificate is given, so tests can put a private-CA backend behind keyproxy."""
    if args.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    return context


async def serve(args: argparse.Namespace) -> None:
    config = UpstreamConfig(
        header_secrets=dict(args.header_secret),
        basic=args.basic,
        query_secrets=dict(args.query_secret),
    )
    # Generous header limits: the proxy under test, not this server, must be the one to refuse.
    runner = web.AppRunner(
        create_app(config),
        access_log=None,
        shutdown_timeout=1.0,
        max_line_size=65536,
        max_field_size=65536,
    )
    await runner.setup()
    tls = _server_tls(args)
    site = web.TCPSite(runner, args.host, args.port, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    config.base_url = f"{'https' if tls else 'http'}://{host}:{port}"

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {port}", flush=True)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
