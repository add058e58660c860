"""Steps 4 and 5: the key's type and its ACLs (SPEC §3.4–5)."""

from __future__ import annotations

from keyproxy.config.model import Access, KeyType
from keyproxy.request import Deny, RequestContext


def check_key_type(ctx: RequestContext) -> Deny | None:
    key, route = ctx.key, ctx.route
    assert key is not None and route is not None
    access = route.access_for(ctx.method)
    ctx.access = access
    if key.type is KeyType.READ and access is Access.WRITE:
        return Deny(403, "PERMISSION_DENIED", f"read keys cannot write: {route.match} changes data")
    if key.type is KeyType.WRITE and access is Access.READ:
        return Deny(403, "PERMISSION_DENIED", f"write keys cannot read: {route.match} reads data")
    return None


def check_acl(ctx: RequestContext) -> Deny | None:
    key, route = ctx.key, ctx.route
    assert key is not None and route is not None
    if route.acl not in key.acls:
        return Deny(
            403,
            "PERMISSION_DENIED",
            f"this key lacks the ACL '{route.acl}' that {route.match} requires",
        )
    return None
