"""The pure parts of logged-in users: permission tables, scopes, table names, the
token verifier and its cache, the JWKS cache, and the configuration's refusals."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from keyproxy.config import ConfigError, parse_config
from keyproxy.jwks import jwks_cache, refresh_counts
from keyproxy.policy.permissions import (
    DEFAULT_ROLES,
    DENIED,
    FULL,
    SELF,
    Permissions,
    SelfRecords,
    build_roles,
    scope_allows,
    table_name,
)
from keyproxy.policy.users import Identity, JwtSettings, TokenVerifier
from keyproxy.request import Deny

SECRET = "0123456789abcdef0123456789abcdef"
NOW = 1_800_000_000.0


# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize(
    ("segment", "name"),
    [
        ("users", "users"),
        ("USERS", "users"),
        ("Users.json", "users"),
        ("users%2Ejson", "users"),
        ("%75sers", "users"),
        ("users~1", "users"),
        ("users%3Aadmin", "users"),
        ("audit_log", "audit_log"),
        ("audit-log.xml", "audit-log"),
        ("", ""),
    ],
)
def test_table_name_reads_every_spelling_as_one(segment: str, name: str):
    assert table_name(segment) == name


DEFAULT = Permissions(roles=build_roles(DEFAULT_ROLES), roles_enabled=True)


@pytest.mark.parametrize("op", ["create", "read", "update", "delete", "list"])
@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        ("admin", {"create", "read", "update", "delete", "list"}),
        ("user", {"create", "read", "list"}),
        ("guest", {"read", "list"}),
        ("unknown-role", set()),
    ],
)
def test_default_role_table(role: str, allowed: set[str], op: str):
    expected = FULL if op in allowed else DENIED
    assert DEFAULT.allows((role,), "posts", op) == expected
    assert DEFAULT.allows((role,), None, op) == expected


EXAMPLE_ROLES = Permissions(
    roles=build_roles(
        {
            "admin": {"*": ["create", "read", "update", "delete", "list"]},
            "user": {
                "*": ["create", "read", "list"],
                "posts": ["create", "read", "list", "update:self", "delete:self"],
            },
            "guest": {"*": ["read", "list"], "!audit_log": []},
        }
    ),
    roles_enabled=True,
    self_records=SelfRecords("createdBy", (("createdBy", "{user}"),)),
)


def test_a_table_entry_replaces_the_default_and_self_grants_are_self():
    assert EXAMPLE_ROLES.allows(("user",), "posts", "update") == SELF
    assert EXAMPLE_ROLES.allows(("user",), "posts", "delete") == SELF
    assert EXAMPLE_ROLES.allows(("user",), "comments", "update") == DENIED
    assert EXAMPLE_ROLES.allows(("user", "admin"), "posts", "update") == FULL  # the widest grant


def test_an_explicit_deny_wins_over_every_grant_of_every_role():
    assert EXAMPLE_ROLES.allows(("admin",), "audit_log", "read") == FULL
    assert EXAMPLE_ROLES.allows(("admin", "guest"), "audit_log", "read") == DENIED
    assert EXAMPLE_ROLES.allows(("guest", "admin"), "audit_log", "list") == DENIED
    assert EXAMPLE_ROLES.allows(("guest", "admin"), "posts", "delete") == FULL


def test_the_verdict_memo_stays_bounded():
    permissions = Permissions(roles=build_roles(DEFAULT_ROLES), roles_enabled=True)
    for i in range(10_000):
        permissions.allows(("guest",), f"t{i}", "read")
    assert len(permissions._memo) <= 4096


def test_list_filter_query_is_escaped():
    records = SelfRecords("owner", (("owner", "{user}"), ("tenant", "t-{user}")))
    assert records.filter_query("a&b=c d") == "owner=a%26b%3Dc%20d&tenant=t-a%26b%3Dc%20d"


@pytest.mark.parametrize(
    ("scopes", "table", "op", "allowed"),
    [
        ({"posts:read"}, "posts", "read", True),
        ({"posts:read"}, "posts", "delete", False),
        ({"posts:read"}, "comments", "read", False),
        ({"*:read"}, "comments", "read", True),
        ({"*:read"}, "comments", "list", False),
        ({"posts:*"}, "posts", "delete", True),
        ({"posts:*"}, "comments", "delete", False),
        ({"*:*"}, None, "delete", True),
        ({"posts:list"}, None, "list", False),
        ({"*:list"}, None, "list", True),
    ],
)
def test_scope_matching(scopes: set[str], table: str | None, op: str, allowed: bool):
    assert scope_allows(frozenset(scopes), table, op) is allowed


# --------------------------------------------------------------------------- tokens


def hs_verifier(**kw: Any) -> TokenVerifier:
    return TokenVerifier(JwtSettings(algorithms=("HS256",), secret=SECRET, **kw))


def hs_token(claims: dict[str, Any], key: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode({"sub": "alice", "exp": NOW + 60, **claims}, key, algorithm=alg)


def test_a_verified_token_gives_user_and_roles():
    verifier = hs_verifier(roles_claim="role")
    assert verifier.verify(hs_token({"role": "editor"}), NOW) == Identity(
        "alice", ("editor",), NOW + 60
    )
    assert verifier.verify(hs_token({"role": ["a", "b", "a"]}), NOW).roles == ("a", "b")
    assert verifier.verify(hs_token({}), NOW).roles == ("user",)


def test_the_cache_answers_until_exp_and_never_after():
    verifier = hs_verifier()
    token = hs_token({})
    assert isinstance(verifier.verify(token, NOW), Identity)
    assert len(verifier.cache) == 1
    # A cached verdict is used as is: a changed secret would not be consulted again...
    verifier.settings = JwtSettings(algorithms=("HS256",), secret="x" * 32, leeway=0.0)
    assert isinstance(verifier.verify(token, NOW + 59), Identity)
    # ...but never past exp.
    expired = verifier.verify(token, NOW + 61)
    assert isinstance(expired, Deny) and expired.code == "TOKEN_EXPIRED"
    assert len(verifier.cache) == 0


def test_the_cache_is_bounded():
    verifier = hs_verifier(cache_size=10)
    for i in range(50):
        verifier.verify(hs_token({"sub": f"u{i}"}), NOW)
    assert len(verifier.cache) == 10


@pytest.mark.parametrize(
    ("token", "words"),
    [
        (lambda: hs_token({"exp": None}), "'exp' claim is required"),
        (lambda: hs_token({}, key="y" * 32), "signature"),
        (lambda: hs_token({}, key="y" * 64, alg="HS512"), "'HS512' is not accepted"),
        (lambda: hs_token({"exp": "soon"}), "must be a number"),
    ],
)
def test_token_refusals(token: Any, words: str):
    result = hs_verifier().verify(token(), NOW)
    assert isinstance(result, Deny) and result.code == "INVALID_TOKEN"
    assert words in result.message


@pytest.mark.parametrize(
    ("claims", "words"),
    [
        ({"exp": float("inf")}, "'exp' claim must be a number, and finite"),
        ({"exp": float("nan")}, "'exp' claim must be a number, and finite"),
        ({"exp": True}, "'exp' claim must be a number, and finite"),
        ({"nbf": float("nan")}, "'nbf' claim must be a number, and finite"),
        ({"iat": NOW + 3600}, "issued in the future (iat)"),
        ({"iat": "yesterday"}, "'iat' claim must be a number, and finite"),
        ({"iat": float("-inf")}, "'iat' claim must be a number, and finite"),
    ],
    ids=["exp-infinity", "exp-nan", "exp-bool", "nbf-nan", "iat-future", "iat-text", "iat-inf"],
)
def test_time_claims_are_finite_numbers_and_never_in_the_future(
    claims: dict[str, Any], words: str
) -> None:
    """JSON as Python reads it (pyjwt's parser) takes `Infinity` and `NaN`: a token
    signed with either would never expire. A token issued in the future is refused
    as pyjwt refuses it by default (its own time checks are off here)."""
    verifier = hs_verifier()
    result = verifier.verify(hs_token(claims), NOW)
    assert isinstance(result, Deny) and result.code == "INVALID_TOKEN", result
    assert words in result.message
    # Nothing was remembered: much later it is refused still, never served from a cache.
    assert not verifier.cache
    assert isinstance(verifier.verify(hs_token(claims), NOW + 10**9), Deny)


def test_an_iat_within_the_leeway_or_past_is_accepted() -> None:
    verifier = hs_verifier(leeway=30.0)
    for iat in (NOW - 3600, NOW + 20, int(NOW)):
        assert isinstance(verifier.verify(hs_token({"iat": iat}), NOW), Identity)


def test_no_exp_claim_at_all():
    token = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    result = hs_verifier().verify(token, NOW)
    assert isinstance(result, Deny) and "'exp' claim is required" in result.message


def test_leeway_counts_both_ways():
    verifier = hs_verifier(leeway=30.0)
    assert isinstance(verifier.verify(hs_token({"exp": NOW - 10}), NOW), Identity)
    assert verifier.verify(hs_token({"exp": NOW - 40}), NOW).code == "TOKEN_EXPIRED"
    assert isinstance(verifier.verify(hs_token({"nbf": NOW + 10}), NOW), Identity)


# --------------------------------------------------------------------------- JWKS


async def test_jwks_cache_counts_refreshes_and_keeps_keys_on_failure():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    state = {"status": 200, "doc": {"keys": [{**jwk, "kid": "k1"}, {"kty": "oct", "kid": "h"}]}}

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(state["doc"], status=state["status"])

    app = web.Application()
    app.router.add_get("/jwks.json", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        cache = jwks_cache(f"http://127.0.0.1:{port}/jwks.json")
        before = refresh_counts()
        await cache.refresh()
        assert cache.refreshes == {"ok": 1}
        assert refresh_counts().get("ok", 0) == before.get("ok", 0) + 1
        assert cache.key("k1", "RS256") is not None
        assert cache.key("h", "HS256") is None  # HMAC keys from a JWKS are never used
        assert cache.key("k1", "ES256") is None  # nor a key of another type
        state["status"] = 500
        await cache.refresh()
        assert cache.refreshes == {"ok": 1, "error": 1}
        assert cache.key("k1", "RS256") is not None  # kept through the failure
        verifier = TokenVerifier(
            JwtSettings(algorithms=("RS256",), jwks_url=cache.url, jwks_min_refresh=60.0), cache
        )
        token = jwt.encode(
            {"sub": "bob", "exp": time.time() + 60}, private, "RS256", headers={"kid": "k1"}
        )
        assert verifier.verify(token, time.time()).user == "bob"
        unknown = jwt.encode(
            {"sub": "bob", "exp": time.time() + 60}, private, "RS256", headers={"kid": "k9"}
        )
        # The last attempt was just now: no new fetch within jwks_min_refresh.
        assert verifier.verify(unknown, time.time()).code == "INVALID_TOKEN"
        assert cache.refreshes == {"ok": 1, "error": 1}
    finally:
        await runner.cleanup()
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- configuration

BASE = """\
upstream:
  url: http://127.0.0.1:3000
routes:
  - {match: "GET /v1/data/{table}", acl: search, op: list}
"""


def issues(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.yaml", env or {})
    return [f"{i.line}: {i.where}: {i.message} ({i.hint})" for i in info.value.issues]


@pytest.mark.parametrize(
    ("users", "words"),
    [
        ("{jwt: {algorithms: [none], secret: " + SECRET + "}}", "'none' is never accepted"),
        ("{jwt: {algorithms: [RS256], secret: " + SECRET + "}}", "need a public key"),
        (
            "{jwt: {algorithms: [HS256, RS256], jwks_url: 'https://a.test/j'}}",
            "would use the public key as an HMAC secret",
        ),
        ("{jwt: {algorithms: [HS256], secret: short}}", "shorter than 32 bytes"),
        ("{jwt: {algorithms: [HS512], secret: " + SECRET + "}}", "shorter than 64 bytes"),
        ("{jwt: {algorithms: [HS256], secret: '${JWT}'}}", "JWT is empty"),
        ("{jwt: {algorithms: [RS256], jwks_url: 'http://idp.test/j'}}", "http:// only on a"),
        ("{jwt: {algorithms: [RS256]}}", "exactly one of secret, public_key_file or jwks_url"),
        (
            "{jwt: {algorithms: [RS256], jwks_url: 'https://a/j', public_key_file: k.pem}}",
            "exactly one of",
        ),
        ("{jwt: {algorithms: [HS256], secret: " + SECRET + ", jwks_refresh: 1m}}", "only applies"),
    ],
)
def test_users_refusals(users: str, words: str):
    found = issues(BASE + f"users: {users}\n", {"JWT": ""})
    assert any(words in issue for issue in found), found


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ('roles: {guest: {"*": [read, drop]}}', "unknown operation 'drop'"),
        ('roles: {guest: {"*": [create:self]}}', "create:self is not supported"),
        ('roles: {guest: {"!users": [read]}}', "an explicit deny lists no operations"),
        ('roles: {guest: {"Posts": [read]}}', "is not a table name"),
        ('roles: {guest: {"*": [read:self]}}', "need the self section"),
        ("system_tables: [Users.json]", "is not a table name"),
        ("self: {list_filter: {query: {owner: me}}}", "'owner_field' is required"),
        ("self: {owner_field: owner, list_filter: {query: {owner: me}}}", "must contain {user}"),
    ],
)
def test_roles_refusals(section: str, words: str):
    found = issues(BASE + section + "\n")
    assert any(words in issue for issue in found), found


KEY = "  - {id: k, hash: 'sha256:" + "0" * 64 + "', type: admin, %s}\n"


@pytest.mark.parametrize(
    ("field", "words"),
    [
        ("scopes: [posts]", "is not a scope"),
        ("scopes: ['posts:drop']", "is not a scope"),
        ("scopes: ['Posts:read']", "is not a scope"),
        ("roles: [editor]", "no role named 'editor'"),
    ],
)
def test_key_scope_and_role_refusals(field: str, words: str):
    found = issues(BASE + "keys:\n" + KEY % field)
    assert any(words in issue for issue in found), found


def test_identity_headers_refusals():
    text = BASE.replace(
        "3000\n",
        "3000\n  inject: {headers: {X-Secret: s}}\n"
        "  identity_headers: {user: X-Secret, roles: X-Forwarded-User, key_id: X_Key}\n",
    )
    found = issues(text)
    assert len(found) == 3, found


def test_a_full_users_config_loads():
    text = (
        BASE
        + "keys:\n"
        + KEY % "scopes: ['posts:read', '*:list'], roles: [guest]"
        + "users: {jwt: {algorithms: [HS256, HS384], secret: "
        + SECRET * 2
        + ", issuer: me, audience: any, leeway: 30s}}\n"
        + 'roles: {guest: {"*": [read, list], "!audit_log": []}}\n'
        + "system_tables: [users]\n"
    )
    config = parse_config(text, "t.yaml", {})
    assert config.keys[0].scopes == frozenset({"posts:read", "*:list"})
    assert config.keys[0].roles == ("guest",)
    assert config.users is not None and config.users.settings.leeway == 30.0
    assert config.permissions is not None and config.permissions.system_tables == {"users"}
    # Without users, roles or system tables, step 7 is off.
    assert parse_config(BASE, "t.yaml", {}).permissions is None


@pytest.mark.parametrize(
    ("route", "refused"),
    [
        ('"PUT /v1/data/{table}/{id}", acl: put, op: create', True),
        ('"POST|PUT /v1/data/{table}/{id}", acl: put, op: create', True),
        ('"PUT /v1/data/{table}/**", acl: put, op: create', True),
        ('"PUT /v1/data/{table}/{id}", acl: put, op: update', False),
        ('"POST /v1/data/{table}", acl: put, op: create', False),
        ('"PUT /v1/data/{table}", acl: put, op: create', False),
    ],
)
def test_a_create_grant_cannot_put_over_an_existing_record(route: str, refused: bool):
    """`PUT /{table}/{id}` replaces the record when it exists: decided as a create, a
    user allowed to create but not to update would overwrite another's record."""
    text = BASE + f"  - {{match: {route}}}\n"
    if not refused:
        parse_config(text, "t.yaml", {})
        return
    found = issues(text)
    assert any("op: create with PUT on a record's path" in i and "op: update" in i for i in found)


# --------------------------------------------------------------------------- step order


async def test_scopes_come_before_roles_and_roles_before_the_rate_limit():
    from keyproxy.commands.explain import explain

    key = "sk_" + "7" * 64
    import hashlib

    text = (
        BASE.replace(
            "op: list}\n",
            'op: list}\n  - {match: "DELETE /v1/data/{table}/{id}", acl: delete, op: delete}\n',
        )
        + "keys:\n"
        + f"  - {{id: k, hash: 'sha256:{hashlib.sha256(key.encode()).hexdigest()}', type: admin,"
        + " scopes: ['posts:list'], roles: [guest], rate_limit: 1/hour}\n"
        + "system_tables: [users]\n"
    )
    config = parse_config(text, "t.yaml", {})
    steps = (await explain(config, "DELETE", "/v1/data/posts/1", key=key)).steps
    assert (steps[-1].name, steps[-1].deny.code) == ("6 scopes", "SCOPE_INSUFFICIENT")
    steps = (await explain(config, "GET", "/v1/data/posts", key=key)).steps
    assert steps[-1].deny is None and [s.name for s in steps][-3:] == [
        "7 roles",
        "7 self records",
        "8 rate limit",
    ]
    text = text.replace("scopes: ['posts:list']", "scopes: ['*:*']")
    config = parse_config(text, "t.yaml", {})
    steps = (await explain(config, "DELETE", "/v1/data/posts/1", key=key)).steps
    assert (steps[-1].name, steps[-1].deny.code) == ("7 roles", "PERMISSION_DENIED")


def test_public_key_file_verifies_es256_and_refuses_a_key_of_another_type(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "ec.pem").write_bytes(pem)
    source = str(tmp_path / "t.yaml")
    config = parse_config(
        BASE
        + "users: {jwt: {algorithms: [ES256], public_key_file: ec.pem,"
        + " issuer: any, audience: any}}\n",
        source,
        {},
    )
    assert config.users is not None
    token = jwt.encode({"sub": "carol", "exp": NOW + 60}, private, "ES256")
    assert config.users.verify(token, NOW).user == "carol"
    # an HMAC token signed with the public key's PEM is refused by the allowlist
    forged = jwt.encode({"sub": "carol", "exp": NOW + 60}, "x" * 32, "HS256")
    assert config.users.verify(forged, NOW).code == "INVALID_TOKEN"
    with pytest.raises(ConfigError) as info:
        parse_config(
            BASE
            + "users: {jwt: {algorithms: [RS256], public_key_file: ec.pem,"
            + " issuer: any, audience: any}}\n",
            source,
            {},
        )
    assert "cannot verify RS256" in str(info.value)
