"""Step 1: who is calling — the key, and the end user a Bearer token names (docs/decision.md)."""

from __future__ import annotations

from collections.abc import Awaitable

from keyproxy.policy import credentials
from keyproxy.policy.users import Identity
from keyproxy.request import Deny, RequestContext

BEARER_NOT_ENABLED = Deny(
    401,
    "INVALID_TOKEN",
    "end-user tokens (Authorization: Bearer) are not enabled on this proxy",
)
BEARER_WITHOUT_KEY = Deny(
    401,
    "UNAUTHORIZED",
    "missing API key: an end-user token (Authorization: Bearer) is sent next to a key "
    "in the X-API-Key header",
)


def authenticate(ctx: RequestContext) -> Deny | Awaitable[Deny | None] | None:
    server = ctx.config.server
    # The query is read even when the query source is off, so a key sent there
    # is refused by name instead of travelling to the upstream's logs.
    query = ctx.raw_target.partition("?")[2]
    presented = credentials.extract(
        ctx.headers, query, server.credential_sources, server.query_param
    )
    # `keyproxy explain --key-id` names the key instead of presenting it.
    named = ctx.key
    if isinstance(presented, Deny):
        if named is None or presented.code != "UNAUTHORIZED":
            return presented
        return None
    token = presented.bearer
    if token is not None and ctx.config.users is None:
        # Ignoring a token would forward a request the caller believes carries a user.
        return BEARER_NOT_ENABLED
    if named is None:
        if presented.source == "bearer":
            return BEARER_WITHOUT_KEY
        key = credentials.lookup(presented, ctx.config.keys_by_digest, ctx.now)
        if isinstance(key, Deny):
            return key
        ctx.key = key
        ctx.credential_source = presented.source
    if token is None:
        return None
    users = ctx.config.users
    assert users is not None
    identity = users.verify(token, ctx.now)
    if identity.__class__ is Identity:
        ctx.user, ctx.token_roles = identity[0], identity[1]
        return None
    if identity.__class__ is Deny:
        return identity
    return _identity_later(ctx, identity)  # type: ignore[arg-type]  # a check returns Deny | None or an awaitable of it; `__class__ is` does not narrow it


async def _identity_later(ctx: RequestContext, pending: Awaitable[Identity | Deny]) -> Deny | None:
    """A token signed with a key id the JWKS cache does not know yet: one bounded refresh."""
    identity = await pending
    if isinstance(identity, Deny):
        return identity
    ctx.user, ctx.token_roles = identity.user, identity.roles
    return None
