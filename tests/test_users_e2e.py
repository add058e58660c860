"""Logged-in users through the real `keyproxy serve`: tokens, roles, scopes, system tables,
identity headers and self records, against real upstreams and a real JWKS endpoint."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.procs import Process, UpstreamServer, spawn, start_demo_backend, start_upstream
from tests.proxy_process import CRUD_ROUTES, Keyproxy, base_config, digest, error_of, start_keyproxy

SECRET = "hs256-secret-for-tests-0123456789abcdef"
ISSUER = "https://auth.test/"
AUDIENCE = "keyproxy-tests"
UPSTREAM_SECRET = "upstream-secret-users-0123456789"

KEYS = {
    "admin": "sk_" + "a" * 64,
    "reader": "pk_" + "b" * 64,
    "guest": "sk_" + "c" * 64,  # an admin-type key acting as a guest: every method passes step 4
    "scoped": "sk_" + "d" * 64,
    "two-roles": "sk_" + "e" * 64,
}

ROUTES = [*CRUD_ROUTES, {"match": "GET /_stream/**", "acl": "stream"}]

OP_REQUESTS = {
    "create": ("POST", "/v1/data/posts", b"{}"),
    "read": ("GET", "/v1/data/posts/1", None),
    "update": ("PATCH", "/v1/data/posts/1", b"{}"),
    "delete": ("DELETE", "/v1/data/posts/1", None),
    "list": ("GET", "/v1/data/posts", None),
}


def token(claims: dict[str, Any] | None = None, key: Any = SECRET, alg: str = "HS256", **kw: Any):
    base = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600}
    base.update(claims or {})
    return jwt.encode({k: v for k, v in base.items() if v is not None}, key, algorithm=alg, **kw)


def bearer(tok: str, key: str = KEYS["guest"]) -> list[tuple[str, str]]:
    return [("X-API-Key", key), ("Authorization", f"Bearer {tok}")]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def keys_section() -> list[dict[str, Any]]:
    return [
        {"id": "admin", "hash": digest(KEYS["admin"]), "type": "admin"},
        {"id": "reader", "hash": digest(KEYS["reader"]), "type": "read"},
        {"id": "guest", "hash": digest(KEYS["guest"]), "type": "admin", "roles": ["guest"]},
        {
            "id": "scoped",
            "hash": digest(KEYS["scoped"]),
            "type": "admin",
            "scopes": ["posts:read", "posts:list"],
        },
    ]


# --------------------------------------------------------------------------- HS256


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with start_upstream(header_secrets={"X-Upstream-Key": UPSTREAM_SECRET}) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyproxy]:
    config = base_config(upstream.url, upstream.inject())
    config["routes"] = ROUTES
    config["keys"] = keys_section()
    config["upstream"]["identity_headers"] = {
        "key_id": "X-Keyproxy-Key-Id",
        "user": "X-Keyproxy-User",
        "roles": "X-Keyproxy-Roles",
    }
    config["users"] = {
        "jwt": {
            "algorithms": ["HS256"],
            "secret": "${JWT_SECRET}",
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "roles_claim": "role",
            "leeway": "5s",
        }
    }
    config["system_tables"] = ["users", "audit_log"]
    kp = start_keyproxy(tmp_path_factory.mktemp("users"), config, env={"JWT_SECRET": SECRET})
    yield kp
    kp.stop()


def test_a_valid_token_names_the_user_to_the_upstream(proxy: Keyproxy, upstream: UpstreamServer):
    upstream.reset()
    spoofed = [
        ("X-Keyproxy-User", "root"),
        ("x-keyproxy-roles", "admin"),
        ("X-KEYPROXY-KEY-ID", "admin"),
    ]
    status, _, body, _ = proxy.request(
        "GET", "/v1/data/posts", bearer(token({"role": ["editor"]})) + spoofed
    )
    assert status == 200, body
    (record,) = upstream.records()
    sent = [(n.lower(), v) for n, v in record["headers"]]
    assert [v for n, v in sent if n == "x-keyproxy-user"] == ["alice"]
    assert [v for n, v in sent if n == "x-keyproxy-roles"] == ["guest,editor"]
    assert [v for n, v in sent if n == "x-keyproxy-key-id"] == ["guest"]
    assert not [v for n, v in sent if n == "authorization"]  # the token stays with keyproxy


def test_without_a_token_the_identity_is_the_key_alone(proxy: Keyproxy, upstream: UpstreamServer):
    upstream.reset()
    spoofed = [("X-Keyproxy-User", "root")]
    status, _, _, _ = proxy.request("GET", "/v1/data/posts", spoofed, key=KEYS["reader"])
    assert status == 200
    sent = [(n.lower(), v) for n, v in upstream.records()[0]["headers"]]
    assert not [v for n, v in sent if n == "x-keyproxy-user"]
    assert [v for n, v in sent if n == "x-keyproxy-roles"] == ["guest"]


def _forged_none() -> str:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    claims = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600}
    return f"{header}.{b64(json.dumps(claims).encode())}."


def _forged_signature() -> str:
    head, body, _ = token().split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["sub"] = "mallory"
    return f"{head}.{b64(json.dumps(claims).encode())}.{token().split('.')[2]}"


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (lambda: token(), None, None),
        (_forged_none, "INVALID_TOKEN", "algorithm 'none' is not accepted"),
        (lambda: token(alg="HS512", key=SECRET * 2), "INVALID_TOKEN", "'HS512' is not accepted"),
        (lambda: token({"aud": "another-api"}), "INVALID_TOKEN", "audience"),
        (lambda: token({"aud": None}), "INVALID_TOKEN", "'aud' claim is required"),
        (lambda: token({"iss": "https://evil.test/"}), "INVALID_TOKEN", "issuer"),
        (lambda: token({"exp": int(time.time()) - 60}), "TOKEN_EXPIRED", "expired"),
        (lambda: token({"exp": int(time.time()) - 2}), None, None),  # within the 5 s leeway
        (lambda: token({"exp": None}), "INVALID_TOKEN", "'exp' claim is required"),
        (lambda: token(key="another-secret-0123456789abcdef0123"), "INVALID_TOKEN", "signature"),
        (_forged_signature, "INVALID_TOKEN", "signature"),
        (lambda: token({"nbf": int(time.time()) + 600}), "INVALID_TOKEN", "not valid yet"),
        (lambda: token({"sub": None}), "INVALID_TOKEN", "'sub' claim"),
        (lambda: token({"sub": " alice"}), "INVALID_TOKEN", "without outer spaces"),
        (lambda: token({"role": {"a": 1}}), "INVALID_TOKEN", "'role' claim"),
        (lambda: "not-a-jwt", "INVALID_TOKEN", "not a well-formed JWT"),
        (lambda: token({"exp": float("inf")}), "INVALID_TOKEN", "'exp' claim must be a number"),
        (lambda: token({"exp": float("nan")}), "INVALID_TOKEN", "'exp' claim must be a number"),
        (lambda: token({"iat": int(time.time()) + 600}), "INVALID_TOKEN", "issued in the future"),
        (lambda: token({"iat": int(time.time()) + 2}), None, None),  # within the 5 s leeway
    ],
)
def test_token_checks(proxy: Keyproxy, make: Any, code: str | None, words: str | None):
    tok = make()
    status, _, body, _ = proxy.request("GET", "/v1/data/posts", bearer(tok))
    if code is None:
        assert status == 200, body
        return
    assert status == 401 and error_of(body) == code, body
    message = json.loads(body)["message"]
    assert words in message
    signature = tok.split(".")[-1]
    assert tok not in body.decode() and (not signature or signature not in message)


def test_bearer_needs_a_key_and_keys_never_add_up(proxy: Keyproxy):
    status, _, body, _ = proxy.request(
        "GET", "/v1/data/posts", [("Authorization", f"Bearer {token()}")]
    )
    assert (status, error_of(body)) == (401, "UNAUTHORIZED")
    status, _, body, _ = proxy.request(
        "GET",
        "/v1/data/posts",
        [
            ("X-API-Key", KEYS["guest"]),
            ("X-API-Key", KEYS["reader"]),
            ("Authorization", f"Bearer {token()}"),
        ],
    )
    assert (status, error_of(body)) == (400, "AMBIGUOUS_CREDENTIALS")
    basic = base64.b64encode(f"guest:{KEYS['guest']}".encode()).decode()
    status, _, _, _ = proxy.request("GET", "/v1/data/posts", [("Authorization", f"Basic {basic}")])
    assert status == 200  # Basic is still a key credential


def test_a_repeated_token_is_served_from_the_cache_until_it_expires(proxy: Keyproxy):
    exp = int(time.time()) - 3  # already past exp, still within the 5 s leeway
    tok = token({"exp": exp})
    assert proxy.request("GET", "/v1/data/posts", bearer(tok))[0] == 200
    assert proxy.request("GET", "/v1/data/posts", bearer(tok))[0] == 200
    time.sleep(max(0.0, exp + 5 - time.time()) + 0.3)  # past exp + leeway
    status, _, body, _ = proxy.request("GET", "/v1/data/posts", bearer(tok))
    assert (status, error_of(body)) == (401, "TOKEN_EXPIRED")


# The default role table (README, Logged-in users, roles and scopes), cell by cell:
# (roles, op) -> allowed.
DEFAULT_TABLE = {
    "admin": {"create", "read", "update", "delete", "list"},
    "user": {"create", "read", "list"},
    "guest": {"read", "list"},
}


@pytest.mark.parametrize("op", list(OP_REQUESTS))
@pytest.mark.parametrize("role", list(DEFAULT_TABLE))
def test_each_cell_of_the_default_role_table(proxy: Keyproxy, role: str, op: str):
    method, target, body = OP_REQUESTS[op]
    if role == "admin":
        headers = [("X-API-Key", KEYS["admin"])]
    elif role == "user":  # the guest key plus a user's token without a role claim
        headers = bearer(token())
    else:
        headers = [("X-API-Key", KEYS["guest"])]
    status, _, answer, _ = proxy.request(method, target, headers, body=body)
    if op in DEFAULT_TABLE[role]:
        assert status == 200, answer
    else:
        assert (status, error_of(answer)) == (403, "PERMISSION_DENIED")
        message = json.loads(answer)["message"]
        assert op in message and "guest" in message


def test_scopes_are_checked_even_for_admin_keys(proxy: Keyproxy):
    assert proxy.request("GET", "/v1/data/posts/1", key=KEYS["scoped"])[0] == 200
    status, _, body, _ = proxy.request("DELETE", "/v1/data/posts/1", key=KEYS["scoped"])
    assert status == 403 and json.loads(body)["error"] == "SCOPE_INSUFFICIENT"
    assert json.loads(body)["message"] == "API key scope does not include posts:delete"
    status, _, body, _ = proxy.request("GET", "/v1/data/comments", key=KEYS["scoped"])
    assert json.loads(body)["message"] == "API key scope does not include comments:list"


@pytest.mark.parametrize(
    "target",
    [
        "/v1/data/users",
        "/v1/data/USERS",
        "/v1/data/Users/1",
        "/v1/data/%75sers",
        "/v1/data/%55%53%45%52%53",
        "/v1/data/users/",
        "/v1/data/users.json",
        "/v1/data/users%2Ejson",
        "/v1/data/users~",
        "/v1/data/users%3A1",
        "/v1/data/audit_log",
        "/v1/data/audit%5Flog",
        "/v1/data/AUDIT_LOG.xml",
        "/_stream/users",
        "/_stream/a/Users",
    ],
)
def test_system_tables_in_every_spelling(proxy: Keyproxy, target: str):
    # A read key, with or without a user whose token claims the admin role.
    for headers in (
        bearer(token({"role": "admin"}), KEYS["reader"]),
        [("X-API-Key", KEYS["reader"])],
    ):
        status, _, body, _ = proxy.request("GET", target, headers)
        if status == 400:  # a spelling the path rules already refuse
            assert error_of(body) in ("INVALID_PATH", "AMBIGUOUS_PATH"), body
            continue
        if error_of(body) == "ROUTE_NOT_ALLOWED":  # no route takes this spelling at all
            continue
        assert (status, error_of(body)) == (403, "SYSTEM_TABLE_ACCESS"), (target, body)
    status, _, body, _ = proxy.request("GET", target, key=KEYS["admin"])
    assert status == 200 or error_of(body) != "SYSTEM_TABLE_ACCESS"


def test_without_users_a_bearer_token_is_refused(upstream: UpstreamServer, tmp_path: Path):
    config = base_config(upstream.url, upstream.inject())
    config["keys"] = keys_section()[:2]
    kp = start_keyproxy(tmp_path, config)
    try:
        status, _, body, _ = kp.request("GET", "/v1/data/posts", bearer(token(), KEYS["reader"]))
        assert (status, error_of(body)) == (401, "INVALID_TOKEN")
        assert kp.request("GET", "/v1/data/posts", key=KEYS["reader"])[0] == 200
    finally:
        kp.stop()


def test_an_explicit_deny_wins_across_roles(upstream: UpstreamServer, tmp_path: Path):
    config = base_config(upstream.url, upstream.inject())
    config["routes"] = ROUTES
    config["keys"] = [
        {"id": "two", "hash": digest(KEYS["two-roles"]), "type": "admin", "roles": ["editor"]},
    ]
    config["roles"] = {
        "editor": {"*": ["create", "read", "update", "delete", "list"]},
        "auditor": {"*": ["read", "list"], "!comments": []},
    }
    config["users"] = {
        "jwt": {"algorithms": ["HS256"], "secret": SECRET, "issuer": "any", "audience": "any"}
    }
    kp = start_keyproxy(tmp_path, config)
    try:
        key = KEYS["two-roles"]
        assert kp.request("DELETE", "/v1/data/comments/1", key=key)[0] == 200
        tok = token({"roles": ["auditor"], "iss": None, "aud": None})
        status, _, body, _ = kp.request("DELETE", "/v1/data/comments/1", bearer(tok, key))
        assert (status, error_of(body)) == (403, "PERMISSION_DENIED")
        assert "editor, auditor" in json.loads(body)["message"]
        status, _, body, _ = kp.request("GET", "/v1/data/Comments", bearer(tok, key))
        assert (status, error_of(body)) == (403, "PERMISSION_DENIED")
        assert kp.request("DELETE", "/v1/data/posts/1", bearer(tok, key))[0] == 200
    finally:
        kp.stop()


# --------------------------------------------------------------------------- RS256 + JWKS


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(private: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


def _fetches(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__control/fetches", timeout=5) as r:
        return json.load(r)


def _jwks_config(
    upstream_url: str, key: str, port: int, refresh: str, min_refresh: str
) -> dict[str, Any]:
    """One reader key and a route taking RS256 tokens whose keys come from the JWKS
    served on `port`, refreshed every `refresh` (unknown kids at most every `min_refresh`)."""
    config = base_config(upstream_url, {})
    config["routes"] = [{"match": "GET /v1/data/{table}", "acl": "search", "op": "list"}]
    config["keys"] = [{"id": "reader", "hash": digest(key), "type": "read"}]
    config["users"] = {
        "jwt": {
            "algorithms": ["RS256"],
            "audience": "api",
            "issuer": "any",
            "jwks_url": f"http://127.0.0.1:{port}/jwks.json",
            "jwks_refresh": refresh,
            "jwks_min_refresh": min_refresh,
        }
    }
    return config


def _start_jwks(path: Path, port: int = 0) -> tuple[Process, int]:
    process, match = spawn(
        [
            sys.executable,
            str(Path(__file__).with_name("jwks_server.py")),
            "--file",
            str(path),
            "--port",
            str(port),
        ],
        ready=r"READY (\d+)",
        name="jwks",
    )
    assert match is not None
    return process, int(match.group(1))


def test_rs256_tokens_with_a_jwks_that_rotates_and_goes_down(
    upstream: UpstreamServer, tmp_path: Path
):
    first, second, third = _rsa(), _rsa(), _rsa()
    keys_file = tmp_path / "jwks.json"
    keys_file.write_text(json.dumps({"keys": [_jwk(first, "k1")]}))
    jwks, jwks_port = _start_jwks(keys_file)
    config = base_config(upstream.url, upstream.inject())
    config["routes"] = ROUTES
    config["keys"] = keys_section()[:2]
    config["users"] = {
        "jwt": {
            "algorithms": ["RS256"],
            "jwks_url": f"http://127.0.0.1:{jwks_port}/jwks.json",
            "issuer": ISSUER,
            "audience": "any",
            "jwks_refresh": "1h",
            "jwks_min_refresh": "1s",
        }
    }
    kp = start_keyproxy(tmp_path, config)
    reader = KEYS["reader"]

    def rs(private: Any, kid: str, **kw: Any) -> str:
        return token({"aud": None}, key=private, alg="RS256", headers={"kid": kid, **kw})

    try:
        assert kp.request("GET", "/v1/data/posts", bearer(rs(first, "k1"), reader))[0] == 200
        public_pem = first.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # RS/HS confusion: an HMAC token "signed" with the public key.
        head = b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
        claims = {"sub": "alice", "iss": ISSUER, "exp": int(time.time()) + 600}
        body = b64(json.dumps(claims).encode())
        sig = b64(hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
        status, _, answer, _ = kp.request(
            "GET", "/v1/data/posts", bearer(f"{head}.{body}.{sig}", reader)
        )
        assert (status, error_of(answer)) == (401, "INVALID_TOKEN")
        assert "'HS256' is not accepted" in json.loads(answer)["message"]
        # An embedded key (jwk header) is never used: the token stays unverified.
        attacker = _rsa()
        embedded = rs(attacker, "k1", jwk=_jwk(attacker, "k1"), jku="http://evil.test/jwks")
        status, _, answer, _ = kp.request("GET", "/v1/data/posts", bearer(embedded, reader))
        assert (status, error_of(answer)) == (401, "INVALID_TOKEN")
        assert "signature" in json.loads(answer)["message"]

        # Rotation: the provider now signs with k2; the first k2 token waits for one refresh.
        time.sleep(1.1)  # past jwks_min_refresh since the start-up fetch
        keys_file.write_text(json.dumps({"keys": [_jwk(second, "k2")]}))
        before = _fetches(jwks_port)
        assert kp.request("GET", "/v1/data/posts", bearer(rs(second, "k2"), reader))[0] == 200
        assert _fetches(jwks_port) == before + 1
        # k1 is gone from the set now: its tokens are unknown, and a second unknown kid
        # within jwks_min_refresh does not fetch again.
        status, _, answer, _ = kp.request("GET", "/v1/data/posts", bearer(rs(first, "k1"), reader))
        assert (status, error_of(answer)) == (401, "INVALID_TOKEN")
        assert "unknown key id" in json.loads(answer)["message"]
        assert _fetches(jwks_port) == before + 1

        # The provider goes down: tokens signed with a known key still pass.
        jwks.stop()
        time.sleep(1.1)
        k2_token = rs(second, "k2", typ="JWT")
        assert kp.request("GET", "/v1/data/posts", bearer(k2_token, reader))[0] == 200
        started = time.monotonic()
        status, _, answer, _ = kp.request("GET", "/v1/data/posts", bearer(rs(third, "k3"), reader))
        assert (status, error_of(answer)) == (401, "INVALID_TOKEN")
        assert time.monotonic() - started < 5  # a dead provider costs a bounded wait
        assert (
            kp.request("GET", "/v1/data/posts", bearer(rs(second, "k2", cty="x"), reader))[0] == 200
        )
        assert "jwks_refresh_failed" in kp.process.stderr
    finally:
        kp.stop()
        jwks.stop()


# --------------------------------------------------------------------------- self records

DEMO_SECRET = "demo-backend-secret-for-self-tests"


@pytest.fixture
def demo_backend() -> Iterator[int]:
    with start_demo_backend(DEMO_SECRET) as port:
        yield port


def _backend_record(port: int, table: str, record_id: int) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/data/{table}/{record_id}",
        headers={"X-API-Key": DEMO_SECRET},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, None


def test_self_records_against_a_real_backend(demo_backend: int, tmp_path: Path):
    config = base_config(
        f"http://127.0.0.1:{demo_backend}", {"headers": {"X-API-Key": DEMO_SECRET}}
    )
    config["routes"] = ROUTES
    config["keys"] = [
        {"id": "app", "hash": digest(KEYS["guest"]), "type": "admin", "roles": ["anonymous"]},
    ]
    config["users"] = {
        "jwt": {"algorithms": ["HS256"], "secret": SECRET, "issuer": "any", "audience": "any"}
    }
    config["roles"] = {
        "anonymous": {"*": []},
        "user": {
            "posts": ["create", "list:self", "read:self", "update:self", "delete:self"],
        },
    }
    config["self"] = {"owner_field": "createdBy", "list_filter": {"query": {"createdBy": "{user}"}}}
    config["upstream"]["identity_headers"] = {"user": "X-Keyproxy-User"}
    kp = start_keyproxy(tmp_path, config)
    alice = bearer(token({"iss": None, "aud": None}))
    try:
        # list: only alice's posts, whatever the query says
        status, _, body, _ = kp.request("GET", "/v1/data/posts", alice)
        assert status == 200, body
        assert sorted(r["id"] for r in json.loads(body)) == [1, 3]
        for query in ("createdBy=bob", "CreatedBy=bob", "createdBy%5B%5D=bob", "createdby=alice"):
            status, _, body, _ = kp.request("GET", f"/v1/data/posts?{query}", alice)
            assert (status, error_of(body)) == (403, "PERMISSION_DENIED"), query
        # read: own record yes, another's no, a missing one 404
        status, _, body, _ = kp.request("GET", "/v1/data/posts/1", alice)
        assert status == 200 and json.loads(body)["createdBy"] == "alice"
        status, _, body, _ = kp.request("GET", "/v1/data/posts/2", alice)
        assert (status, error_of(body)) == (403, "PERMISSION_DENIED")
        assert b"Shipping" not in body
        status, _, body, _ = kp.request("GET", "/v1/data/posts/99", alice)
        assert (status, error_of(body)) == (404, "NOT_FOUND")
        # update: refused on bob's post, which stays exactly as it was
        before = _backend_record(demo_backend, "posts", 2)
        status, _, body, _ = kp.request(
            "PATCH", "/v1/data/posts/2", alice, body=b'{"title": "hijacked"}'
        )
        assert (status, error_of(body)) == (403, "PERMISSION_DENIED")
        assert _backend_record(demo_backend, "posts", 2) == before
        status, _, body, _ = kp.request(
            "PATCH", "/v1/data/posts/1", alice, body=b'{"title": "mine"}'
        )
        assert status == 200 and json.loads(body)["title"] == "mine"
        # delete: refused on bob's post (still there), allowed on alice's
        status, _, body, _ = kp.request("DELETE", "/v1/data/posts/2", alice)
        assert (status, error_of(body)) == (403, "PERMISSION_DENIED")
        assert _backend_record(demo_backend, "posts", 2) == before
        assert kp.request("DELETE", "/v1/data/posts/3", alice)[0] == 204
        assert _backend_record(demo_backend, "posts", 3)[0] == 404
        # without a user, "self" grants nothing
        status, _, body, _ = kp.request("GET", "/v1/data/posts/1", key=KEYS["guest"])
        assert (status, error_of(body)) == (403, "PERMISSION_DENIED")
    finally:
        kp.stop()


def test_explain_with_a_token_and_a_key_id(proxy: Keyproxy):
    args = [sys.executable, "-m", "keyproxy", "explain", "-c", str(proxy.config_path)]
    env = {"JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [*args, "--key-id", "guest", "--jwt", token(), "POST", "/v1/data/posts"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "user 'alice'" in result.stdout and "roles [guest, user] allow create" in result.stdout
    result = subprocess.run(
        [*args, "--key-id", "guest", "DELETE", "/v1/data/posts/1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 1
    assert "DENY  7 roles" in result.stdout and "PERMISSION_DENIED" in result.stdout
    result = subprocess.run(
        [*args, "--key-id", "nobody", "GET", "/v1/data/posts"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 2 and "no key with id 'nobody'" in result.stderr
