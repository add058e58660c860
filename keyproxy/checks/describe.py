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
    used = ""
    if key.rotation is not None:  # a rotated key: which of its hashes, and until when
        used = f"; hash #{key.rotation.index + 1} {key.rotation.label}"
        if key.rotation.until is not None:
            until = datetime.fromtimestamp(key.rotation.until, UTC).isoformat()
            used += f" (until {until.replace('+00:00', 'Z')})"
    return f"key '{key.id}' ({key.type.value}) via {ctx.credential_source}; {expiry}{used}"


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
    shown = f"#{r.index + 1} '{r.match}' (line {r.line}) matches {ctx.target.path}{params}"
    if ctx.effective_method and ctx.effective_method != ctx.method:
        shown += f"; decided as {ctx.effective_method} (method override)"
    return shown


def key_type(ctx: RequestContext) -> str:
    assert ctx.key is not None and ctx.access is not None
    return f"{ctx.access.value} request; {ctx.key.type.value} key may"


def acl(ctx: RequestContext) -> str:
    assert ctx.route is not None
    return f"key has ACL '{ctx.route.acl}'"
