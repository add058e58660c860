"""What each passed step established, in words, for `keyproxy explain`."""

from __future__ import annotations

from datetime import UTC, datetime

from keyproxy.request import RequestContext


def credential(ctx: RequestContext) -> str:
    key = ctx.key
    assert key is not None
    expiry = "never expires"
    if key.expires_at is not None:
        when = datetime.fromtimestamp(key.expires_at, UTC).isoformat().replace("+00:00", "Z")
        expiry = f"expires {when}"
    text = f"key '{key.id}' ({key.type.value}) via {ctx.credential_source}; {expiry}"
    if key.rotation is not None:  # a rotated key: which of its hashes, and until when
        text += f"; hash #{key.rotation.position + 1} {key.rotation.label}"
        if key.rotation.until is not None:
            until = datetime.fromtimestamp(key.rotation.until, UTC).isoformat()
            text += f" (until {until.replace('+00:00', 'Z')})"
    if ctx.user is not None:
        text += f"; user '{ctx.user}' (token roles: {', '.join(ctx.token_roles)})"
    return text


def constraints(ctx: RequestContext) -> str:
    key = ctx.key
    assert key is not None
    ips = "any address" if key.ips is None else "allowed by ips"
    referer = "any referer" if key.referers is None else "referer allowed"
    return f"client {ctx.client_ip}: {ips}; {referer}"


def route(ctx: RequestContext) -> str:
    r = ctx.route
    assert r is not None and ctx.target is not None
    params = "".join(f" {k}={v}" for k, v in ctx.params.items())
    shown = f"routes[{r.index}] '{r.match}' (line {r.line}) matches {ctx.target.path}{params}"
    if ctx.effective_method and ctx.effective_method != ctx.method:
        shown += f"; decided as {ctx.effective_method} (method override)"
    return shown


def key_type(ctx: RequestContext) -> str:
    assert ctx.key is not None and ctx.access is not None
    return f"{ctx.access.value} request; {ctx.key.type.value} key may"


def acl(ctx: RequestContext) -> str:
    assert ctx.route is not None
    return f"key has ACL '{ctx.route.acl}'"


def scopes(ctx: RequestContext) -> str:
    assert ctx.key is not None and ctx.route is not None
    if ctx.key.scopes is None:
        return "key has no scopes (any table and operation)"
    return f"key scope includes {ctx.table or '*'}:{ctx.route.op}"


def roles(ctx: RequestContext) -> str:
    permissions = ctx.config.permissions
    assert ctx.route is not None
    if permissions is None:
        return "no roles, system tables or users configured: the key decides"
    parts = []
    if permissions.system_tables:
        parts.append("no system table")
    if not permissions.roles_enabled:
        parts.append("roles not in use")
    elif ctx.route.op is None:
        parts.append(f"roles [{', '.join(ctx.roles)}]; the route names no op")
    else:
        table = ctx.table or "any table"
        scope = " on the caller's own records only" if ctx.self_only else ""
        parts.append(f"roles [{', '.join(ctx.roles)}] allow {ctx.route.op} on {table}{scope}")
    return "; ".join(parts)


def self_records(ctx: RequestContext) -> str:
    if not ctx.self_only:
        return "not limited to own records"
    permissions = ctx.config.permissions
    assert permissions is not None and ctx.route is not None
    records = permissions.self_records
    assert records is not None
    if ctx.owner_filter is not None:
        return f"list limited to the caller's records: ?{ctx.owner_filter} added"
    return (
        f"the record is read from the upstream first and must have "
        f"{records.owner_field} = '{ctx.user}' (explain does not contact the upstream)"
    )
