"""Steps 6 and 7: key scopes, system tables, roles and self records (docs/decision.md).

Each check starts with one test of whether its feature is configured, so a file
without scopes, roles or system tables pays nothing more per request.
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Awaitable
from fnmatch import fnmatchcase
from urllib.parse import quote, unquote

import aiohttp
from yarl import URL

from keyproxy.checks.route import PARAM_SEPARATORS
from keyproxy.config.model import Config, KeyType
from keyproxy.policy.credentials import upstream_query
from keyproxy.policy.headers import owner_read_headers
from keyproxy.policy.paths import decoded_name, param_readings
from keyproxy.policy.permissions import (
    ANY_TABLE,
    DENIED,
    FULL,
    NOT_A_TABLE,
    identity_pairs,
    key_roles,
    request_name,
    scope_allows,
    table_name,
    table_position,
    upstream_user_id,
)
from keyproxy.request import Deny, RequestContext

#: An entity tag as RFC 9110 spells it (weak or strong): anything else is not sent back.
_ETAG = re.compile(r'(?:W/)?"[\x21\x23-\x7e]{0,200}"')
#: Methods whose request the owner filter or owner read describes in full.
_BODILESS_READS = frozenset({"GET", "HEAD"})
#: Largest record read to find its owner.
MAX_RECORD_BYTES = 1024 * 1024


def request_table(ctx: RequestContext) -> str:
    """The table the route's table parameter names, read strictly for granting.

    ANY_TABLE when the segment targets several tables (`a,b`, `a*`, `_all`) or the
    route names no table at all (the body may name any); NOT_A_TABLE when it is
    no exact lower-case name.
    """
    if ctx.table is None:
        route, target = ctx.route, ctx.target
        assert route is not None and target is not None
        position = table_position(route.segments)
        if position is None:
            ctx.table = ANY_TABLE
        else:
            segment = target.segments[position]
            name = _TABLE_NAMES.get(segment)
            if name is None:
                if len(_TABLE_NAMES) >= 4096:
                    _TABLE_NAMES.clear()
                name = _TABLE_NAMES[segment] = request_name(segment)
            ctx.table = name
    return ctx.table


#: Path segment -> table name: a few tables are named over and over (bounded).
_TABLE_NAMES: dict[str, str] = {}


def _not_a_table(ctx: RequestContext) -> Deny:
    route, target = ctx.route, ctx.target
    assert route is not None and target is not None
    position = table_position(route.segments)
    shown = target.segments[position] if position is not None else ""
    shown = shown if len(shown) <= 64 else shown[:64] + "..."
    return Deny(
        400,
        "INVALID_PATH",
        f"'{shown}' is not a table name keyproxy can decide on: write the table in "
        "lower case letters, digits, _ and - only",
    )


def check_scopes(ctx: RequestContext) -> Deny | None:
    key, route = ctx.key, ctx.route
    assert key is not None and route is not None
    scopes = key.scopes
    if scopes is None:
        return None
    op = route.op
    if op is None:
        return Deny(
            403,
            "SCOPE_INSUFFICIENT",
            f"API key scope does not cover {route.match}: the route names no op",
        )
    table = request_table(ctx)
    if table == NOT_A_TABLE:
        return _not_a_table(ctx)
    if scope_allows(scopes, table, op):
        return None
    return Deny(403, "SCOPE_INSUFFICIENT", f"API key scope does not include {table}:{op}")


def system_table_in(ctx: RequestContext, tables: frozenset[str]) -> str | None:
    """A system table the request could reach, in any spelling (read leniently: deny only).

    Every path segment is read the way the most lenient backend would, each part of
    a `,` list on its own, a `*` pattern as every table it could match; and the
    route's table segment naming several tables (`_all`) reaches them all.
    """
    route, target = ctx.route, ctx.target
    assert route is not None and target is not None
    position = table_position(route.segments)
    if position is not None and request_table(ctx) == ANY_TABLE:
        return min(tables)
    for segment in target.segments:
        if segment in tables:
            return segment
        if _EXACT_NAME.fullmatch(segment):
            continue  # one lower-case name, not a system table (the common case)
        # Decoded before it is split: a backend reads `posts%2Cusers` as `posts,users`.
        # Every run of name characters is a name a backend may read: `<users>` (date
        # math), `remote:users` (another cluster), `users.json`, each part of a list.
        text = unquote(segment).lower() if "%" in segment else segment.lower()
        for name in _NAME_RUN.findall(text):
            if "*" in name:
                hit = next((t for t in sorted(tables) if fnmatchcase(t, name)), None)
                if hit is not None:
                    return hit
            elif name in tables:
                return name
    return None


#: One lower-case table name, as `request_name` grants it.
_EXACT_NAME = re.compile(r"[a-z0-9_-]+")
#: What a lenient backend may read as one name (or a `*` pattern of names) in a segment.
_NAME_RUN = re.compile(r"[a-z0-9_*-]+")


def check_roles(ctx: RequestContext) -> Deny | None:
    permissions = ctx.config.permissions
    if permissions is None:
        return None
    key, route = ctx.key, ctx.route
    assert key is not None and route is not None
    admin = key.type is KeyType.ADMIN
    op = route.op
    if not admin:
        if permissions.system_tables:
            hit = system_table_in(ctx, permissions.system_tables)
            if hit is None and op is not None and request_table(ctx) == ANY_TABLE:
                hit = min(permissions.system_tables)
            if hit is not None:
                return Deny(
                    403,
                    "SYSTEM_TABLE_ACCESS",
                    f"'{hit}' is a system table: only admin keys reach it",
                )
        if op is None and not route.no_table_op:
            return Deny(
                403,
                "PERMISSION_DENIED",
                f"{route.match} names no op: with roles, users or system tables configured "
                "only admin keys use such a route",
            )
        if op is not None and request_table(ctx) == NOT_A_TABLE:
            return _not_a_table(ctx)
    if not permissions.roles_enabled:
        return None
    roles = key_roles(key.roles, admin)
    if ctx.token_roles:
        roles = roles + tuple([r for r in ctx.token_roles if r not in roles])
    ctx.roles = roles
    if op is None:
        return None  # `op: none` (or an admin key): not a table operation
    table = request_table(ctx)
    if table == NOT_A_TABLE:
        # a spelling no grant covers; a `!table` deny still reads it leniently
        position = table_position(route.segments)
        assert position is not None and ctx.target is not None
        lenient = table_name(ctx.target.segments[position])
        if permissions.allows(roles, lenient, op) is DENIED:
            return Deny(
                403,
                "PERMISSION_DENIED",
                f"roles [{', '.join(roles)}] do not allow {op} on {lenient}",
            )
        return _not_a_table(ctx)
    verdict = permissions.allows(roles, table, op)
    if verdict is FULL:
        return None
    what = f"roles [{', '.join(roles)}] do not allow {op} on {table}"
    if verdict is DENIED:
        return Deny(403, "PERMISSION_DENIED", what)
    if ctx.user is None:
        return Deny(
            403,
            "PERMISSION_DENIED",
            f"{what} except on a user's own records, and no user is logged in",
        )
    ctx.self_only = True
    return None


class OwnershipCheck:
    """Self records: the list filter, and the owner check before a read or a write.

    For a read, update or delete the record is first read from the upstream with
    the secret (one extra upstream request), and the request goes on only if its
    owner field names the caller: a refused write never reaches the upstream.
    Without a `fetch_owner` session (offline `explain`), the check says what it
    would ask and passes.
    """

    __slots__ = ("_session", "_tls", "online")

    def __init__(self, online: bool = True) -> None:
        self.online = online
        self._session: aiohttp.ClientSession | None = None
        self._tls: dict[str, ssl.SSLContext] = {}

    def __call__(self, ctx: RequestContext) -> Deny | Awaitable[Deny | None] | None:
        if not ctx.self_only:
            return None
        permissions = ctx.config.permissions
        route = ctx.route
        assert permissions is not None and route is not None and ctx.target is not None
        records = permissions.self_records
        user = ctx.user
        assert records is not None and user is not None
        if route.op in ("list", "read") and ctx.effective_method not in _BODILESS_READS:
            # A read-only POST (`access: read`, like _search) is decided by its body: the
            # owner filter in the query would not limit it, nor the owner read before it.
            return Deny(
                403,
                "PERMISSION_DENIED",
                f"{route.op} of your own records is only allowed with GET: keyproxy cannot "
                f"limit what a {ctx.effective_method} body asks for",
            )
        if route.op in ("list", "read") and ctx.has_body:
            # The owner read happens on the head; a body sent slowly would hold the real
            # read back until the record is someone else's (ids are reused), and a body
            # is a query the owner filter does not limit (GET _search).
            return Deny(
                403,
                "PERMISSION_DENIED",
                f"a {route.op} of your own records carries no request body",
            )
        if route.op == "list":
            if not records.list_filter:
                return Deny(
                    403,
                    "PERMISSION_DENIED",
                    "this list is allowed only over your own records, and no list_filter "
                    "is configured to limit it",
                )
            names = {name.lower() for name, _ in records.list_filter}
            query = ctx.target.query
            for pair in PARAM_SEPARATORS.split(query) if query else ():
                raw = pair.partition("=")[0]
                sent = next(iter(param_readings(raw) & names), None)
                if sent is None and records.widened_by(raw):
                    sent = decoded_name(raw)[:64]
                if sent is not None:
                    return Deny(
                        403,
                        "PERMISSION_DENIED",
                        f"the query may not set '{sent}': keyproxy limits this list to your "
                        "own records",
                    )
            ctx.owner_filter = records.filter_query(user)
            return None
        if not self.online:
            return None
        return self._check_owner(ctx, records.owner_field, user)

    async def _check_owner(self, ctx: RequestContext, owner_field: str, user: str) -> Deny | None:
        config = ctx.config
        assert ctx.target is not None and ctx.route is not None
        shown = ctx.target.path if len(ctx.target.path) <= 120 else ctx.target.path[:120] + "..."
        try:
            status, body, etag = await self._read(config, ctx)
        except TimeoutError:
            return Deny(504, "UPSTREAM_TIMEOUT", "the upstream did not answer the owner check")
        except (aiohttp.ClientError, OSError):
            return Deny(502, "UPSTREAM_UNAVAILABLE", "the upstream is unavailable")
        if status == 404:
            return Deny(404, "NOT_FOUND", f"no record at {shown}")
        if status != 200 or body is None:
            return Deny(502, "UPSTREAM_UNAVAILABLE", "the record's owner could not be read")
        try:
            record = json.loads(body)
        except ValueError:
            return Deny(502, "UPSTREAM_UNAVAILABLE", "the record's owner could not be read")
        owner = record.get(owner_field) if isinstance(record, dict) else None
        # The stored owner is what the upstream was told: the upstream form of the id.
        if isinstance(owner, str) and owner == upstream_user_id(user):
            if etag is not None and ctx.route.op != "read":
                ctx.owner_etag = etag
            return None
        return Deny(
            403,
            "PERMISSION_DENIED",
            f"only the record's owner may {ctx.route.op} {shown}",
        )

    async def _read(
        self, config: Config, ctx: RequestContext
    ) -> tuple[int, bytes | None, bytes | None]:
        """The record's status, body and ETag (a strong or weak entity tag, else None)."""
        up = config.upstream
        assert ctx.target is not None
        # The query the request is forwarded with, which may pick another record (an
        # `?id=` some frameworks read before the path's): the owner read asks the same.
        query = upstream_query(
            ctx.target.query,
            ctx.credential_source == "query",
            config.server.query_param,
            tuple(name for name, _ in up.inject_query),
            "&".join(f"{quote(n, safe='')}={quote(v, safe='')}" for n, v in up.inject_query),
        )
        url = URL(
            up.origin + up.base_path + ctx.target.path + (f"?{query}" if query else ""),
            encoded=True,
        )
        # The client's headers as the request carries them upstream: a backend may pick
        # the record by one (a tenant, PostgREST's `Accept-Profile` schema). Then who
        # asks, as the request itself will say it: a backend that scopes records by
        # these (a tenant per key) must answer the owner read as it will the request.
        injected = [name for name, _ in up.inject_headers]
        headers = owner_read_headers(
            ctx.headers, [*injected, *(name for _, name in up.identity_headers)]
        )
        headers.update(identity_pairs(ctx, up.identity_headers))
        headers.update(up.inject_headers)
        auth = aiohttp.BasicAuth(*up.inject_basic) if up.inject_basic is not None else None
        headers["X-Request-Id"] = ctx.request_id
        headers["Accept"] = "application/json"
        session = self._session
        if session is None or session.closed:
            session = self._session = aiohttp.ClientSession(
                auto_decompress=True, cookie_jar=aiohttp.DummyCookieJar()
            )
        tls: ssl.SSLContext | bool = True
        if up.ca_file is not None:
            tls = self._tls.get(up.ca_file) or self._tls.setdefault(
                up.ca_file, ssl.create_default_context(cafile=up.ca_file)
            )
        async with session.get(
            url,
            headers=headers,
            auth=auth,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=up.timeout),
            ssl=tls if up.scheme == "https" else False,
        ) as response:
            if response.status != 200:
                return response.status, None, None
            body = await response.content.read(MAX_RECORD_BYTES + 1)
            etag = response.headers.get("ETag")
            tag = etag.encode() if etag is not None and _ETAG.fullmatch(etag) else None
            return 200, body if len(body) <= MAX_RECORD_BYTES else None, tag

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
