"""Step 1: who is calling — the key, and the end user a Bearer token names (docs/decision.md)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

from keyproxy.policy import credentials
from keyproxy.policy.credentials import Presented
from keyproxy.policy.users import Identity
from keyproxy.request import Deny, RequestContext, Vouched

if TYPE_CHECKING:
    from keyproxy.config.model import Config, Key

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
    # `explain --key-id` and `replay` name the caller instead of presenting a key.
    vouched = ctx.vouched
    if isinstance(presented, Deny):
        if vouched is None or presented.code != "UNAUTHORIZED":
            return presented
        return _take_vouched(ctx, vouched, None)
    token = presented.bearer
    if token is not None and ctx.config.users is None:
        # Ignoring a token would forward a request the caller believes carries a user.
        return BEARER_NOT_ENABLED
    if vouched is not None:
        return _take_vouched(ctx, vouched, presented)
    if presented.source == "bearer":
        return BEARER_WITHOUT_KEY
    key = credentials.lookup(presented, ctx.config.keys_by_digest, ctx.now)
    if isinstance(key, Deny):
        return key
    ctx.key = key
    ctx.credential_source = presented.source
    if token is None:
        return None
    return _verify_token(ctx, token)


def _verify_token(ctx: RequestContext, token: str) -> Deny | Awaitable[Deny | None] | None:
    users = ctx.config.users
    assert users is not None
    identity = users.verify(token, ctx.now)
    if identity.__class__ is Identity:
        ctx.user, ctx.token_roles = identity[0], identity[1]
        ctx.token_until = identity[2] + users.leeway
        return None
    if identity.__class__ is Deny:
        return identity
    return _identity_later(ctx, identity, users.leeway)  # type: ignore[arg-type]  # a check returns Deny | None or an awaitable of it; `__class__ is` does not narrow it


def _take_vouched(
    ctx: RequestContext, vouched: Vouched, presented: Presented | None
) -> Deny | Awaitable[Deny | None] | None:
    """The caller named by `vouched`, held to the same rules as a presented key:
    a key id the snapshot lacks is unknown, a revoked or expired key is refused."""
    key = key_by_id(ctx.config, vouched.key_id, vouched.key_hash)
    if key is None:
        if vouched.key_hash is not None and key_by_id(ctx.config, vouched.key_id) is not None:
            return Deny(
                401,
                "INVALID_TOKEN",
                f"key {vouched.key_id!r} no longer lists the hash {vouched.key_hash}",
            )
        return Deny(
            401, "INVALID_TOKEN", f"no key with id {vouched.key_id!r} in this configuration"
        )
    found = credentials.usable(key, ctx.now)
    if found.__class__ is Deny:
        return found
    ctx.key = key
    if presented is not None and presented.source != "bearer":
        ctx.credential_source = presented.source
    if vouched.user is not None:
        if ctx.config.users is None:
            return BEARER_NOT_ENABLED  # the user's token would be refused now
        ctx.user, ctx.token_roles = vouched.user, vouched.roles
        return None
    token = presented.bearer if presented is not None else None
    return None if token is None else _verify_token(ctx, token)


#: The last snapshot's key indexes (the snapshot is held, so its id is not reused).
_BY_ID: list[tuple[Config, dict[str, Key], dict[tuple[str, str], Key]]] = []


def hash_label(key: Key) -> str:
    """The label of the hash `key` was found by, as the access log writes it."""
    return key.rotation.label if key.rotation is not None else "sha256:" + key.digest[:4].hex()


def key_by_id(config: Config, key_id: str, key_hash: str | None = None) -> Key | None:
    """A configured key by its id (its newest hash), or by id and hash label; the
    indexes are built once per snapshot, on first use."""
    if not _BY_ID or _BY_ID[0][0] is not config:
        by_id: dict[str, Key] = {}
        for key in config.keys:
            by_id.setdefault(key.id, key)
        by_hash = {(key.id, hash_label(key)): key for key in config.keys_by_digest.values()}
        _BY_ID[:] = [(config, by_id, by_hash)]
    if key_hash is None:
        return _BY_ID[0][1].get(key_id)
    return _BY_ID[0][2].get((key_id, key_hash))


async def _identity_later(
    ctx: RequestContext, pending: Awaitable[Identity | Deny], leeway: float
) -> Deny | None:
    """A token signed with a key id the JWKS cache does not know yet: one bounded refresh."""
    identity = await pending
    if isinstance(identity, Deny):
        return identity
    ctx.user, ctx.token_roles = identity.user, identity.roles
    ctx.token_until = identity.expires_at + leeway
    return None
