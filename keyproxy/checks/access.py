"""Steps 4 and 5: the key's type and its ACLs (docs/decision.md)."""

from __future__ import annotations

from keyproxy.config.model import Access, KeyType
from keyproxy.request import Deny, RequestContext


def check_key_type(ctx: RequestContext) -> Deny | None:
    key, route = ctx.key, ctx.route
    assert key is not None and route is not None
    method = ctx.effective_method or ctx.method
    access = route.access_for(method)
    ctx.access = access
    if method != ctx.method and route.access_for(ctx.method) is not access:
        # An upstream may honour the override or not (many do only on POST): the key
        # must be allowed both readings, which only an admin key is.
        if key.type is not KeyType.ADMIN:
            return Deny(
                403,
                "PERMISSION_DENIED",
                f"{key.type.value} keys cannot send {ctx.method} overridden to {method}:"
                f" on {route.match} one reads and the other changes data",
            )
        return None
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
