"""The configuration as immutable data.

A `Config` is built once per load by `keyproxy.config.load` and never mutated:
a reload builds a new one and swaps a single reference, so a request always
sees one consistent snapshot. Everything that can be computed ahead of a
request (hashed key index, compiled route table, parsed CIDRs, referer
matchers, the token verifier and role tables) is computed by the section readers
and the loader, at load time, and held here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from keyproxy.config.response_sections import CacheSettings
    from keyproxy.policy.allowlists import IpAllowlist, RefererPattern
    from keyproxy.policy.permissions import Permissions
    from keyproxy.policy.routes import RouteTable
    from keyproxy.policy.users import TokenVerifier
    from keyproxy.response.cors import CorsPolicy
    from keyproxy.response.fields import DocumentPath, FieldFilter

MiB = 1024 * 1024


class KeyType(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


class Access(enum.StrEnum):
    """Whether a request only reads or may change data (decision step 4, docs/decision.md)."""

    READ = "read"
    WRITE = "write"


#: Methods that read by default; every other method writes unless a route says `access: read`.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: The methods a route may name. Anything else never matches a route.
ROUTE_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

#: Operations a route may declare with `op:` (used by scopes and roles).
OPS = ("create", "read", "update", "delete", "list")

#: Where a client may send its key (`server.credential_sources`), in the order error
#: messages list them and `keyproxy explain` picks its default from.
CREDENTIAL_SOURCES = ("header", "basic", "query")


@dataclass(frozen=True, slots=True)
class Rate:
    """`N/period`: a bucket of `limit` requests refilled continuously over `period` seconds."""

    limit: int
    period: float
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: HostPort = HostPort("0.0.0.0", 8080)
    admin_listen: HostPort = HostPort("127.0.0.1", 9901)
    #: The proxies whose X-Forwarded-For / Forwarded are believed; None: the peer is the client.
    trusted_proxies: IpAllowlist | None = None
    max_body: int = 10 * MiB
    credential_sources: frozenset[str] = frozenset({"header", "basic"})
    query_param: str = "api_key"
    max_header_size: int = 32 * 1024
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    drain_timeout: float = 30.0
    #: Most time between two reads of a request body before 408 (or an abort).
    body_timeout: float = 10.0
    #: Open client connections at once, in total and from one peer address;
    #: None: sized from the file-descriptor limit when serving starts.
    max_connections: int | None = None
    max_connections_per_ip: int | None = None
    #: Field filtering's caps: the decoded body it will buffer, and how deep it may nest.
    filter_max_body: int = 8 * MiB
    filter_max_depth: int = 254


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str
    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/prefix" without a trailing slash
    host_header: str  # the Host value sent upstream: host, plus ":port" when not the default
    timeout: float = 30.0
    connect_timeout: float = 5.0
    max_connections: int = 512
    # The upstream's secrets: kept out of repr, so no traceback or debug print shows them.
    inject_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    inject_basic: tuple[str, str] | None = field(default=None, repr=False)
    inject_query: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    #: Absolute path of a PEM bundle: the only CAs trusted for an https upstream
    #: (a private CA's backend). None: the system trust store.
    ca_file: str | None = None
    #: Headers telling the backend who calls: ("key_id" | "user" | "roles", header name).
    identity_headers: tuple[tuple[str, str], ...] = ()

    @property
    def origin(self) -> str:
        """`scheme://host[:port]` as the upstream writes it in absolute `Location`s."""
        return f"{self.scheme}://{self.host_header}"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every value keyproxy injects that must never travel back to a client."""
        values = [v for _, v in self.inject_headers] + [v for _, v in self.inject_query]
        if self.inject_basic is not None:
            values.append(self.inject_basic[1])
        return tuple(v for v in values if v)


@dataclass(frozen=True, slots=True)
class QueryRule:
    """A route's `query:` list: names (lower-case) it allows, or names it denies; one is None."""

    allow: frozenset[str] | None = None
    deny: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Route:
    index: int  # position in the file: first match wins
    match: str  # the pattern as written, e.g. "GET|PUT /{index}/_settings"
    methods: frozenset[str]
    segments: tuple[str, ...]  # literal, "{name}", "*" (one segment) or "**" (the rest, last only)
    acl: str
    op: str | None = None
    access: Access | None = None  # explicit override; None means "by method"
    #: `op: none`: the route says it is no table operation (roles and own records skip it).
    no_table_op: bool = False
    allow_method_override: bool = False
    line: int = 0
    query: QueryRule | None = None  # None: any query parameter
    #: Requests to this route in flight upstream at once; None: no cap of its own.
    max_concurrency: int | None = None
    #: False: response bodies of this route are not scanned for the upstream's secret
    #: (large binary downloads); the one way an unscanned body is let through.
    scrub_body: bool = True
    #: Where this endpoint's documents sit in its JSON bodies (`data[*]`); (): the body itself.
    fields_at: tuple[DocumentPath, ...] = ()

    def params(self, segments: tuple[str, ...]) -> dict[str, str]:
        """The `{name}` parameters of canonical `segments` this route matched."""
        return {s[1:-1]: segments[i] for i, s in enumerate(self.segments) if s.startswith("{")}

    def access_for(self, method: str) -> Access:
        if self.access is not None:
            return self.access
        return Access.READ if method in READ_METHODS else Access.WRITE


class KeyHash(NamedTuple):
    """One of the hashes a rotated key lists under `hashes:` (newest first).

    `label` is what logs and metrics may show of it ("sha256:" and the first 8 hex
    digits of the digest): enough to tell the old hash from the new, never the key.
    """

    position: int  # index in the key's `hashes:` list; 0 is the newest
    label: str
    until: float | None  # epoch seconds after which this hash is refused; None: no end


class Key(NamedTuple):
    """One configured key. A named tuple rather than a frozen dataclass: a large
    deployment builds 100,000 of them on every load, and a tuple is built in one
    step where a frozen dataclass sets each field through `object.__setattr__`."""

    id: str
    digest: bytes  # SHA-256 of the key; the key itself is never stored
    type: KeyType
    acls: frozenset[str]
    referers: tuple[RefererPattern, ...] | None = None  # None: any referer
    ips: IpAllowlist | None = None  # None: any client address
    expires_at: float | None = None  # epoch seconds
    # One window, or a tuple of them for a list (`[10/second, 1000/hour]`).
    rate_limit: Rate | tuple[Rate, ...] | None = None
    quota: int | None = None
    revoked: bool = False
    line: int = 0
    # A refilling quota's period ("day", "week", "month"); None: a lifetime total.
    quota_period: str | None = None
    report: bool = False  # `mode: report`: refusals after the credential are only recorded
    # Keys listed with `hashes:` only: which of them this Key object was found by.
    # The loader indexes one Key per hash, so the lookup needs no second search.
    rotation: KeyHash | None = None
    scopes: frozenset[str] | None = None  # None: any table and operation
    roles: tuple[str, ...] | None = None  # None: admin for admin keys, guest otherwise
    fields: FieldFilter | None = None  # None: every field of a JSON answer is shown
    file: str | None = None  # the `keys_file` this key's `line` is in; None: the YAML file

    def __repr__(self) -> str:  # never print the digest in logs or tracebacks
        return f"Key(id={self.id!r}, type={self.type.value})"


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    store: str = field(default="memory", repr=False)  # or a redis:// URL (may hold a password)
    on_store_error: str = "deny"  # deny | allow
    timeout: float = 0.1  # per store round trip
    max_buckets: int = 100_000  # memory store: least recently used buckets are dropped beyond this
    #: One bucket per client network of this prefix length (32 / 128: per address).
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64


@dataclass(frozen=True, slots=True)
class LogSettings:
    access: str = "stdout"  # stdout | stderr | off | a file path (reopened on SIGUSR1)


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    #: The first `per_key` key ids seen label their own series; later ones count as "_other".
    per_key: int = 100


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerSettings
    upstream: Upstream
    routes: tuple[Route, ...]
    keys: tuple[Key, ...]
    rate_limits: RateLimitSettings = RateLimitSettings()
    source: str = ""
    #: End users' tokens (`users.jwt`); None: a Bearer token is refused.
    users: TokenVerifier | None = field(default=None, repr=False, compare=False)
    #: Roles, system tables and self records; None: keys alone decide.
    permissions: Permissions | None = field(default=None, repr=False, compare=False)
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    # Indexes derived from the fields above by the loader.
    route_table: RouteTable = field(default=None, repr=False, compare=False)  # type: ignore[assignment]  # the loader always sets it; None only while it builds
    keys_by_digest: Mapping[bytes, Key] = field(default_factory=dict, repr=False, compare=False)
    #: `cors:` compiled; None when the section is absent (CORS headers are never sent).
    cors: CorsPolicy | None = field(default=None, compare=False)
    #: `cache:`; None: nothing is cached.
    cache: CacheSettings | None = field(default=None, compare=False)
    #: Absolute path of `keys_file:` (watched for changes with the file itself); None: none.
    keys_file: str | None = None
    #: Whether some key has `fields:`, so answers may need filtering (True, the safe side,
    #: unless the loader says otherwise): a swap need not walk 100,000 keys to learn it.
    any_key_fields: bool = field(default=True, compare=False)

    def summary(self) -> str:
        keys = "1 key" if len(self.keys) == 1 else f"{len(self.keys)} keys"
        routes = "1 route" if len(self.routes) == 1 else f"{len(self.routes)} routes"
        return f"{keys}, {routes}"
