"""The sample REST backend that `keyproxy demo` puts behind the proxy.

It behaves like the backends keyproxy is made for: one all-powerful secret in
`X-API-Key`, no notion of users or permissions, every request either fully
trusted or refused. Its endpoints are the ones the routes of the example
configuration (`keyproxy/config.example.yaml`) describe, so that configuration works
against it unchanged. Data lives in memory and is reseeded on every start, so the
demo can be broken freely.
"""

from __future__ import annotations

import copy
import hmac
import json
import re
from typing import Any

from aiohttp import web

JSONObject = dict[str, Any]

_NAME = r"[A-Za-z0-9_-]+"
_MAX_LIMIT = 1000
_SETTINGS: JSONObject = {"number_of_replicas": 1, "refresh_interval": "1s"}

SEED: dict[str, list[JSONObject]] = {
    "posts": [
        {
            "id": 1,
            "title": "Hello, world",
            "body": "First post on the new site.",
            "createdBy": "alice",
            "author": {"name": "Alice Martin", "phone": "+1-555-0101"},
        },
        {
            "id": 2,
            "title": "Shipping keyproxy",
            "body": "Keys, not one shared secret.",
            "createdBy": "bob",
            "author": {"name": "Bob Okafor", "phone": "+1-555-0102"},
        },
        {
            "id": 3,
            "title": "Rate limits explained",
            "body": "Per key, per client IP.",
            "createdBy": "alice",
            "author": {"name": "Alice Martin", "phone": "+1-555-0101"},
        },
    ],
    "comments": [
        {"id": 1, "postId": 1, "body": "Welcome!", "createdBy": "bob"},
        {"id": 2, "postId": 2, "body": "Finally.", "createdBy": "carol"},
    ],
    "users": [
        {"id": 1, "name": "alice", "email": "alice@example.com", "role": "admin"},
        {"id": 2, "name": "bob", "email": "bob@example.com", "role": "user"},
        {"id": 3, "name": "carol", "email": "carol@example.com", "role": "user"},
    ],
    "audit_log": [
        {"id": 1, "at": "2025-01-01T09:00:00Z", "actor": "alice", "action": "create posts/1"},
        {"id": 2, "at": "2025-01-02T10:30:00Z", "actor": "bob", "action": "create posts/2"},
    ],
}


class ApiError(Exception):
    """A refusal raised from anywhere in a handler and answered as JSON by `json_errors`."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


class Store:
    """In-memory tables; one per application so tests and demo runs never share state."""

    def __init__(self) -> None:
        self.tables: dict[str, list[JSONObject]] = copy.deepcopy(SEED)
        self.settings: dict[str, JSONObject] = {name: dict(_SETTINGS) for name in self.tables}
        #: Each record's version (its ETag), by (table, id): a new version on every create
        #: and update, so a record re-created under a reused id has another ETag.
        self.versions: dict[tuple[str, str], int] = {}
        self.serial = 0

    def touch(self, name: str, record: JSONObject) -> None:
        self.serial += 1
        self.versions[name, str(record.get("id"))] = self.serial

    def etag(self, name: str, record: JSONObject) -> str:
        return f'"v{self.versions.get((name, str(record.get("id"))), 0)}"'

    def check_if_match(self, request: web.Request, name: str, record: JSONObject) -> None:
        """`If-Match` (RFC 9110): a write to a record that changed since is refused."""
        wanted = request.headers.get("If-Match")
        if wanted is None:
            return
        tags = [tag.strip() for tag in wanted.split(",")]
        if "*" not in tags and self.etag(name, record) not in tags:
            raise ApiError(412, "precondition_failed", "the record changed since it was read")

    def table(self, name: str) -> list[JSONObject]:
        if name not in self.tables:
            raise ApiError(404, "table_not_found", f"no table named {name!r}")
        return self.tables[name]

    def find(self, name: str, record_id: str) -> JSONObject:
        for record in self.table(name):
            if str(record.get("id")) == record_id:
                return record
        raise ApiError(404, "not_found", f"no record {record_id!r} in {name!r}")

    def create(self, name: str, doc: JSONObject) -> JSONObject:
        # Writing to a new table creates it, as document stores do.
        rows = self.tables.setdefault(name, [])
        self.settings.setdefault(name, dict(_SETTINGS))
        next_id = max((r["id"] for r in rows if isinstance(r.get("id"), int)), default=0) + 1
        record = {**doc, "id": next_id}
        rows.append(record)
        self.touch(name, record)
        return record


STORE = web.AppKey("store", Store)
SECRET = web.AppKey("secret", str)


def _json_error(status: int, error: str, message: str) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status)


async def _json_object(request: web.Request) -> JSONObject:
    try:
        doc = await request.json()
    except ValueError:
        raise ApiError(400, "bad_json", "the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "bad_json", "the request body must be a JSON object")
    return doc


def _matches(value: Any, needle: str) -> bool:
    """Full-text search over every string in a record, nested ones included."""
    if isinstance(value, str):
        return needle in value.lower()
    if isinstance(value, dict):
        return any(_matches(v, needle) for v in value.values())
    if isinstance(value, list):
        return any(_matches(v, needle) for v in value)
    return False


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answer every failure in JSON, aiohttp's own 404 and 405 included."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _json_error(exc.status, exc.error, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _json_error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


@web.middleware
async def require_secret(request: web.Request, handler: Any) -> web.StreamResponse:
    """The one secret or nothing: a repeated header is refused, not read twice."""
    given = request.headers.getall("X-API-Key", [])
    secret = request.app[SECRET]
    # surrogatepass: a header with undecodable bytes must be refused, not crash the check.
    if len(given) != 1 or not hmac.compare_digest(
        given[0].encode("utf-8", "surrogatepass"), secret.encode()
    ):
        raise ApiError(401, "unauthorized", "a valid X-API-Key header is required")
    return await handler(request)


async def list_records(request: web.Request) -> web.Response:
    """`?limit=` caps the result; every other query parameter is an equality filter.

    The filters are what keyproxy's `self.list_filter` adds for callers that
    may only see their own records.
    """
    rows = request.app[STORE].table(request.match_info["table"])
    query = request.query
    try:
        limit = int(query.get("limit", _MAX_LIMIT))
    except ValueError:
        raise ApiError(400, "bad_limit", "limit must be an integer") from None
    if not 0 <= limit <= _MAX_LIMIT:
        raise ApiError(400, "bad_limit", f"limit must be between 0 and {_MAX_LIMIT}")
    filters = [(k, v) for k, v in query.items() if k != "limit"]
    found = [r for r in rows if all(str(r.get(k)) == v for k, v in filters)]
    return web.json_response(found[:limit])


async def read_record(request: web.Request) -> web.Response:
    info = request.match_info
    store = request.app[STORE]
    record = store.find(info["table"], info["id"])
    return web.json_response(record, headers={"ETag": store.etag(info["table"], record)})


#: Set by keyproxy (`upstream.identity_headers.user`) for a logged-in user.
USER_HEADER = "X-Keyproxy-User"


async def create_record(request: web.Request) -> web.Response:
    """A logged-in user's record is theirs: the owner comes from keyproxy, never the body."""
    table = request.match_info["table"]
    doc = await _json_object(request)
    users = request.headers.getall(USER_HEADER, [])
    if len(users) == 1:
        doc["createdBy"] = users[0]
    record = request.app[STORE].create(table, doc)
    return web.json_response(
        record, status=201, headers={"Location": f"/v1/data/{table}/{record['id']}"}
    )


async def update_record(request: web.Request) -> web.Response:
    info = request.match_info
    store = request.app[STORE]
    record = store.find(info["table"], info["id"])
    store.check_if_match(request, info["table"], record)
    changes = await _json_object(request)
    changes.pop("id", None)  # ids are the store's, not the client's
    record.update(changes)
    store.touch(info["table"], record)
    return web.json_response(record, headers={"ETag": store.etag(info["table"], record)})


async def delete_record(request: web.Request) -> web.Response:
    info = request.match_info
    store = request.app[STORE]
    record = store.find(info["table"], info["id"])
    store.check_if_match(request, info["table"], record)
    store.table(info["table"]).remove(record)
    return web.Response(status=204)


async def search(request: web.Request) -> web.Response:
    rows = request.app[STORE].table(request.match_info["index"])
    query = (await _json_object(request)).get("query", "")
    if not isinstance(query, str):
        raise ApiError(400, "bad_query", "query must be a string")
    return web.json_response([r for r in rows if _matches(r, query.lower())])


async def bulk(request: web.Request) -> web.Response:
    """All lines are checked before any is applied, so a bad line changes nothing."""
    try:
        text = (await request.read()).decode()
    except UnicodeDecodeError:
        raise ApiError(400, "bad_encoding", "the request body must be UTF-8") from None
    docs: list[tuple[str, JSONObject]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise ApiError(400, "bad_json", f"line {number} is not valid JSON") from None
        table = item.get("table") if isinstance(item, dict) else None
        doc = item.get("doc") if isinstance(item, dict) else None
        if (
            not isinstance(table, str)
            or not re.fullmatch(_NAME, table)
            or not isinstance(doc, dict)
        ):
            raise ApiError(
                400, "bad_line", f'line {number} must be {{"table": ..., "doc": {{...}}}}'
            )
        docs.append((table, doc))
    store = request.app[STORE]
    created = [{"table": t, "id": store.create(t, d)["id"]} for t, d in docs]
    return web.json_response({"created": created, "errors": False})


async def stream(request: web.Request) -> web.StreamResponse:
    """One record per chunk, the way log and export endpoints stream."""
    rows = list(request.app[STORE].table(request.match_info["table"]))
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for record in rows:
        await response.write(json.dumps(record).encode() + b"\n")
    await response.write_eof()
    return response


async def get_settings(request: web.Request) -> web.Response:
    index = request.match_info["index"]
    store = request.app[STORE]
    store.table(index)
    return web.json_response({index: {"settings": store.settings[index]}})


async def put_settings(request: web.Request) -> web.Response:
    index = request.match_info["index"]
    store = request.app[STORE]
    store.table(index)
    store.settings[index].update(await _json_object(request))
    return web.json_response({"acknowledged": True, index: {"settings": store.settings[index]}})


def create_app(secret: str) -> web.Application:
    """The demo backend; `secret` is the only credential it will ever accept."""
    if not secret:
        raise ValueError("the backend secret must not be empty")
    app = web.Application(middlewares=[json_errors, require_secret])
    app[SECRET] = secret
    app[STORE] = Store()
    table = f"{{table:{_NAME}}}"
    index = f"{{index:{_NAME}}}"
    app.router.add_routes(
        [
            web.get(f"/v1/data/{table}", list_records),
            web.get(f"/v1/data/{table}/{{id}}", read_record),
            web.post(f"/v1/data/{table}", create_record),
            web.patch(f"/v1/data/{table}/{{id}}", update_record),
            web.delete(f"/v1/data/{table}/{{id}}", delete_record),
            web.post(f"/{index}/_search", search),
            web.post("/_bulk", bulk),
            web.get(f"/_stream/{table}", stream),
            web.get(f"/{index}/_settings", get_settings),
            web.put(f"/{index}/_settings", put_settings),
        ]
    )
    return app


async def start_backend(
    secret: str, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Serve the demo backend; the caller owns the runner and must `cleanup()` it.

    Port 0 lets the OS pick, so a demo never fails on a busy port 3000.
    """
    runner = web.AppRunner(create_app(secret), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


def run_backend(host: str, port: int, secret: str) -> int:
    """`keyproxy demo-backend`: the sample backend on its own, for docker-compose.

    The secret comes from the environment (`UPSTREAM_SECRET`), the same variable
    keyproxy's configuration injects, so the two containers share it.
    """
    import asyncio
    import signal

    from keyproxy.observability import log_event

    async def main() -> int:
        runner, bound = await start_backend(secret, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log_event("listening", url=f"http://{host}:{bound}", service="demo-backend")
        await stop.wait()
        await runner.cleanup()
        return 0

    try:
        return asyncio.run(main())
    except OSError as exc:
        print(f"demo-backend: cannot listen on {host}:{port}: {exc.strerror}; use --port")
        return 1
