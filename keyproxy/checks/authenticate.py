"""Step 1: who is calling (SPEC §3.1)."""

from __future__ import annotations

from keyproxy import credentials
from keyproxy.request import Deny, RequestContext

BEARER_NOT_ENABLED = Deny(
    401,
    "INVALID_TOKEN",
    "end-user tokens (Authorization: Bearer) are not enabled on this proxy",
)


def authenticate(ctx: RequestContext) -> Deny | None:
    server = ctx.config.server
    # The query is read even when the query source is off, so a key sent there
    # is refused by name instead of travelling to the upstream's logs.
    query = ctx.raw_target.partition("?")[2]
    presented = credentials.extract(
        ctx.headers, query, server.credential_sources, server.query_param
    )
    if isinstance(presented, Deny):
        return presented
    if presented.bearer is not None:
        # Until `users.jwt` is supported a token can only be refused: ignoring
        # it would forward a request the caller believes carries a user.
        return BEARER_NOT_ENABLED
    key = credentials.lookup(presented, ctx.config.keys_by_digest, ctx.now)
    if isinstance(key, Deny):
        return key
    ctx.key = key
    ctx.credential_source = presented.source
    return None
