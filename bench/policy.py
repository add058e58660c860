"""The realistic keyproxy policy the benchmark runs against.

A proxy is only fast if it is fast with the policy users actually have, so
this is deliberately not a toy: 10,000 keys, 200 routes over ~20 ACLs, and a
benchmarked key that exercises every check (type, several ACLs, referer and
IP allowlists, a rate limit that is computed but never triggers). The route
the benchmark hits sits late in the table, so a matcher that scans routes
one by one pays for it as it would in production.

The policy grows with every capability keyproxy gains (scopes, roles, JWT,
field filtering, cache, CORS ...): add them here when the loader accepts them.

Usage: python bench/policy.py --upstream http://127.0.0.1:8000 --listen 127.0.0.1:8080
       --admin 127.0.0.1:9901 -o policy.yaml   (prints the benchmark key)
"""

from __future__ import annotations

import argparse
import hashlib
import random
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

#: The environment variable the generated config reads the upstream secret from.
SECRET_ENV = "UPSTREAM_SECRET"

ACLS = (
    "get", "list", "search", "index", "delete", "bulk", "stream", "settings", "reports",
    "export", "metrics", "billing", "users", "audit", "upload", "webhooks", "comments",
    "media", "analytics", "admin",
)  # fmt: skip

RESOURCES = (
    "posts", "comments", "users", "orders", "invoices", "products", "carts", "payments",
    "shipments", "reviews", "tags", "categories", "events", "sessions", "teams", "projects",
    "tasks", "files", "folders", "messages", "threads", "notifications", "subscriptions",
    "plans", "coupons", "webhooks", "apikeys", "audit",
)  # fmt: skip

#: Where the benchmark's requests go; both match `GET /v1/data/{table}/{id}`.
SMALL_PATH = "/v1/data/posts/42"
LARGE_PATH = "/v1/data/reports/2024"
BENCH_ROUTE = "GET /v1/data/{table}/{id}"

#: The Referer wrk sends; only the last of the key's five patterns accepts it.
BENCH_REFERER = "https://app.example.com/dashboard"
BENCH_REFERERS = (
    "https://example.com/*",
    "https://www.example.net/*",
    "https://*.example.org/*",
    "https://static.example.com/app/*",
    "https://*.example.com/*",
)
#: Loopback last, so an allowlist walked in order checks all five.
BENCH_IPS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "2001:db8::/32", "127.0.0.0/8")
BENCH_RATE = "100000000/second"  # computed on every request, never reached
BENCH_QUOTA = "1000000000"  # counted on every request (full policy), never reached

#: The full policy's end-user tokens: HS256, verified once, then found in the token cache.
JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123"
JWT_ISSUER = "keyproxy-bench"
JWT_AUDIENCE = "keyproxy-bench"
#: What a key's `fields: {exclude: [...]}` hides in the full policy's filtering target.
FIELDS_EXCLUDE = ("author.email", "internal")


@dataclass(frozen=True)
class Features:
    """What the policy turns on beyond keys, allowlists, routes and a memory rate limit.

    The minimal policy (all defaults) is what keyproxy was first benchmarked with;
    `full()` is what a real deployment runs: a logged-in user's token next to the
    key, roles, system tables, own records configured, identity headers, a quota,
    the access log to a file. Metrics are always on; body scrubbing is whatever
    the build does for every response.
    """

    users: bool = False
    access_log: str | None = None  # a file path; None leaves the default
    store: str = "memory"  # or a redis:// URL
    fields_exclude: tuple[str, ...] = ()

    @classmethod
    def full(
        cls,
        access_log: str,
        store: str = "memory",
        fields_exclude: tuple[str, ...] = (),
    ) -> Features:
        return cls(True, access_log, store, fields_exclude)


def bench_token(exp: int = 4102444800) -> str:
    """The fixed end-user token the full policy's requests carry (expires in 2100)."""
    import jwt

    claims = {
        "sub": "bench-user",
        "iss": JWT_ISSUER,
        "aud": JWT_AUDIENCE,
        "exp": exp,
        "roles": ["user"],
    }
    return jwt.encode(claims, JWT_SECRET, "HS256")


@dataclass(frozen=True)
class BenchPolicy:
    yaml: str
    key: str  # the benchmarked key in clear: sent by wrk, never written to the file
    key_id: str
    referer: str
    n_keys: int
    n_routes: int
    token: str | None = None  # sent as `Authorization: Bearer` when the policy has users


#: (match, acl, extra fields) - 200 routes: literal, `{param}`, `**` and multi-method patterns.
Route = tuple[str, str, str]


def _routes() -> list[Route]:
    out: list[Route] = []
    for res in RESOURCES:  # 28 x 6 = 168
        out += [
            (f"GET /v1/{res}", "list", ", op: list"),
            (f"GET /v1/{res}/{{id}}", "get", ", op: read"),
            (f"POST /v1/{res}", "index", ", op: create"),
            (f"PATCH /v1/{res}/{{id}}", "index", ", op: update"),
            (f"DELETE /v1/{res}/{{id}}", "delete", ", op: delete"),
            (f"GET /v1/{res}/{{id}}/history", "audit", ""),
        ]
    out += [
        ("GET /v1/tenants/{tenant}/projects/{project}", "get", ", op: read"),
        ("GET /v1/tenants/{tenant}/projects/{project}/tasks/{task}", "get", ", op: read"),
        ("PUT /v1/tenants/{tenant}/projects/{project}/members/{user}", "users", ""),
        ("GET /v1/reports/{year}/{month}", "reports", ""),
        ("POST /v1/reports/{year}/export", "export", ", access: read"),
        ("GET /v1/billing/invoices/{invoice}/pdf", "billing", ""),
        ("POST /v1/uploads", "upload", ""),
        ("GET /v1/media/**", "media", ""),
        ("GET /v1/analytics/{dashboard}/**", "analytics", ""),
        ("POST /v1/webhooks/{hook}/test", "webhooks", ""),
        ("GET|HEAD /metrics/{name}", "metrics", ""),
        ("GET|PUT /{index}/_settings", "settings", ""),
        ("POST /{index}/_search", "search", ", access: read"),
        ("POST /_bulk", "bulk", ""),
        ("GET /_stream/**", "stream", ""),
        ("GET /v1/data/{table}", "search", ", op: list"),
        (BENCH_ROUTE, "get", ", op: read"),  # the benchmarked route, 185th of 200
        ("POST /v1/data/{table}", "index", ", op: create"),
        ("PATCH /v1/data/{table}/{id}", "index", ", op: update"),
        ("DELETE /v1/data/{table}/{id}", "delete", ", op: delete"),
        ("GET /v1/comments/{id}/replies/{reply}", "comments", ""),
        ("GET /v1/admin/users/{user}", "admin", ""),
        ("DELETE /v1/admin/users/{user}/sessions", "admin", ""),
        ("GET /v1/audit/{table}/{id}/**", "audit", ""),
        ("GET /v1/search/{index}/suggest", "search", ""),
        ("GET /v2/{res}/_count", "list", ", op: list"),
        ("POST /v2/{res}/_mget", "get", ", access: read"),
        ("GET /v2/export/**", "export", ""),
        ("POST /v2/{res}/{id}/_update", "index", ", op: update"),
        ("DELETE /v2/{res}/_all", "admin", ""),
        ("GET /v2/{res}/{id}", "get", ", op: read"),
        ("GET /health/upstream", "metrics", ""),
    ]
    assert len(out) == 200, len(out)
    return out


def _acls_by_access(routes: list[Route]) -> dict[str, tuple[str, ...]]:
    """ACLs a read key and a write key can use: keyproxy refuses a key holding a useless ACL."""
    reads: set[str] = set()
    writes: set[str] = set()
    for match, acl, extra in routes:
        if "access: read" in extra:
            reads.add(acl)
            continue
        for method in match.split()[0].split("|"):
            (reads if method in ("GET", "HEAD", "OPTIONS") else writes).add(acl)
    return {
        "read": tuple(a for a in ACLS if a in reads),
        "write": tuple(a for a in ACLS if a in writes),
        "admin": ACLS,
    }


def _sha256(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _other_key(rng: random.Random, i: int, acls: dict[str, tuple[str, ...]]) -> str:
    """One of the 9,999 keys that are not benchmarked: a realistic mix of every field."""
    key = ("pk_" if i % 3 else "sk_") + rng.randbytes(32).hex()
    kind = rng.choices(("read", "write", "admin"), weights=(6, 3, 1))[0]
    n_acls = {"read": 3, "write": 3, "admin": 8}[kind]
    fields = [
        f"id: key-{i:05d}",
        f'hash: "{_sha256(key)}"',
        f"type: {kind}",
        f"acls: [{', '.join(rng.sample(acls[kind], n_acls))}]",
    ]
    if rng.random() < 0.3:
        fields.append(f'referers: ["https://*.customer{i}.example/*"]')
    if rng.random() < 0.3:
        fields.append(f'ips: ["10.{i % 256}.0.0/16", "192.0.2.{i % 256}/32"]')
    if rng.random() < 0.5:
        fields.append(f"rate_limit: {rng.choice(('100/minute', '1000/hour', '10/second'))}")
    if rng.random() < 0.1:
        fields.append(f"quota: {rng.choice((10000, 100000, 1000000))}")
    if rng.random() < 0.2:
        fields.append(
            f"expires: {rng.choice(('2025-06-30', '2027-01-01', '2030-12-31'))}T00:00:00Z"
        )
    if rng.random() < 0.02:
        fields.append("revoked: true")
    return "  - {" + ", ".join(fields) + "}"


def build_policy(
    upstream_url: str,
    listen: str = "127.0.0.1:8080",
    admin_listen: str = "127.0.0.1:9901",
    n_keys: int = 10_000,
    seed: int = 20240601,
    bench_key: str | None = None,
    features: Features = Features(),  # frozen: one shared default is safe
) -> BenchPolicy:
    """The config text plus what a client needs to pass every check with the benchmarked key."""
    full = features.users
    rng = random.Random(seed)
    key = bench_key or "pk_" + secrets.token_hex(32)
    key_id = "bench-web"
    routes = _routes()
    acls = _acls_by_access(routes)
    bench_entry = [
        f"  - id: {key_id}",
        f'    hash: "{_sha256(key)}"',
        "    type: read",
        "    acls: [get, list, search, stream, reports]",
        "    referers:",
        *(f'      - "{r}"' for r in BENCH_REFERERS),
        "    ips:",
        *(f'      - "{c}"' for c in BENCH_IPS),
        f"    rate_limit: {BENCH_RATE}",
        "    expires: 2099-01-01T00:00:00Z",
    ]
    if full:
        bench_entry += [f"    quota: {BENCH_QUOTA}", "    roles: [guest]"]
    if features.fields_exclude:
        bench_entry.append(f"    fields: {{exclude: [{', '.join(features.fields_exclude)}]}}")
    keys: list[str] = []
    middle = n_keys // 2
    for i in range(1, n_keys):
        if i == middle:
            keys.extend(bench_entry)
        keys.append(_other_key(rng, i, acls))
    if n_keys == 1:
        keys.extend(bench_entry)
    text = "\n".join(
        [
            "# Generated by bench/policy.py: the realistic policy keyproxy is benchmarked with.",
            "server:",
            f"  listen: {listen}",
            f"  admin_listen: {admin_listen}",
            "  trusted_proxies: 0",
            "  max_body: 10MiB",
            "  credential_sources: [header, basic]",
            "",
            "upstream:",
            f"  url: {upstream_url}",
            "  timeout: 30s",
            "  inject:",
            "    headers:",
            f"      X-API-Key: ${{{SECRET_ENV}}}",
            *(_IDENTITY_HEADERS if full else ()),
            "",
            "rate_limits:",
            f"  store: {features.store}",
            # The harness's redis-server shares the saturated load CPU with wrk and the
            # upstream: a round trip can exceed the 100 ms default there and be refused
            # (fail closed), which would measure the harness, not the store's cost.
            *(["  timeout: 1s"] if features.store != "memory" else ()),
            "",
            *(_users_sections() if full else ()),
            *(["log:", f"  access: {features.access_log}", ""] if features.access_log else ()),
            "routes:",
            *(f'  - {{match: "{match}", acl: {acl}{extra}}}' for match, acl, extra in routes),
            "",
            "keys:",
            *keys,
            "",
        ]
    )
    token = bench_token() if full else None
    return BenchPolicy(text, key, key_id, BENCH_REFERER, n_keys, len(routes), token)


_IDENTITY_HEADERS = (
    "  identity_headers:",
    "    key_id: X-Keyproxy-Key-Id",
    "    user: X-Keyproxy-User",
    "    roles: X-Keyproxy-Roles",
)


def _users_sections() -> list[str]:
    """Logged-in users with the roles, system tables and own-records sections (steps 6-7).

    The benchmarked request (GET a post, `op: read`) is allowed by the token's `user`
    role in full, so no extra upstream read for an owner check is made.
    """
    return [
        "users:",
        "  jwt:",
        "    algorithms: [HS256]",
        f"    secret: {JWT_SECRET}",
        f"    issuer: {JWT_ISSUER}",
        f"    audience: {JWT_AUDIENCE}",
        "    roles_claim: roles",
        "    leeway: 30s",
        "",
        "roles:",
        '  admin:   {"*": [create, read, update, delete, list]}',
        '  service: {"*": [create, read, update, list]}',
        '  user:    {"*": [read, list], posts: [create, read, list, update:self, delete:self]}',
        '  guest:   {"*": [read, list], "!audit_log": []}',
        "system_tables: [users, audit_log]",
        "",
        "self:",
        "  owner_field: createdBy",
        '  list_filter: {query: {createdBy: "{user}"}}',
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write the benchmark's keyproxy config")
    p.add_argument("--upstream", required=True, help="upstream URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--listen", default="127.0.0.1:8080")
    p.add_argument("--admin", default="127.0.0.1:9901", help="admin listener host:port")
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument(
        "--full",
        metavar="ACCESS_LOG",
        help="the full policy (users, roles, quota, identity headers), logging to this file",
    )
    p.add_argument("--store", default="memory", help="rate_limits.store (full policy)")
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)
    features = Features.full(args.full, args.store) if args.full else Features()
    policy = build_policy(
        args.upstream, args.listen, args.admin, n_keys=args.keys, features=features
    )
    args.output.write_text(policy.yaml)
    print(f"wrote {args.output}: {policy.n_keys} keys, {policy.n_routes} routes")
    print(f"benchmark key ({policy.key_id}): {policy.key}")
    print(f"send it with Referer: {policy.referer}; set {SECRET_ENV} for the upstream secret")
    if policy.token:
        print(f"and Authorization: Bearer {policy.token}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
