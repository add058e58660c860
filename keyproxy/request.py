"""What the decision sees of a request, and what it can answer.

The same `RequestContext` is built by the live server (from the wire) and by
`keyproxy explain` (from command-line arguments), and both run the same
pipeline over it, so an explanation cannot drift from what traffic gets.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from keyproxy.config.model import Access, Config, Key, Route
    from keyproxy.policy.paths import Target
    from keyproxy.ratelimit import LimitResult


@dataclass(frozen=True, slots=True)
class Deny:
    """A refusal: the HTTP status, the error code (README, Errors) and a message for humans.

    `headers` carries extras such as `Retry-After`. A denial is a value, passed
    back up the pipeline, never an exception thrown across layers.
    """

    status: int
    code: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer keyproxy gives itself without a key and without the upstream.

    The one case today is a CORS preflight from an allowed origin: browsers send
    it without credentials, so it can never pass step 1. It is a value like
    `Deny`, returned up the pipeline, so `explain` shows it as the verdict.
    """

    status: int
    headers: bytes  # ready header lines, each ending in CRLF
    why: str  # what `explain` prints


class Headers:
    """Request headers as an ordered list of (lower-case name, value).

    A mapping's `headers[name]` would silently return one of repeated headers;
    here `getall` is the natural call, so credential checks see every copy.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(n.lower(), v) for n, v in items]

    @classmethod
    def from_lowered(cls, items: list[tuple[str, str]]) -> Headers:
        """Wrap a list whose names are already lower-case (the server's fast path)."""
        self = cls.__new__(cls)
        self._items = items
        return self

    def get(self, name: str, default: str | None = None) -> str | None:
        for n, v in self._items:
            if n == name:
                return v
        return default

    def getall(self, name: str) -> list[str]:
        return [v for n, v in self._items if n == name]

    def __contains__(self, name: object) -> bool:
        return any(n == name for n, _ in self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:  # values may hold credentials
        return f"Headers({[n for n, _ in self._items]!r})"


IPAddress = IPv4Address | IPv6Address


class Vouched(NamedTuple):
    """An identity established before the decision, instead of a presented credential.

    `keyproxy explain --key-id` (the operator names a key) and `keyproxy replay` (an
    access-log line names the key id, user and roles that were verified live) set
    `RequestContext.vouched`; the credential step then takes the key by id from the
    snapshot and still refuses it when it is missing, revoked or expired, so no check
    is skipped or implemented twice. The live server never sets it.
    """

    key_id: str
    user: str | None = None  # the end user a verified token named
    roles: tuple[str, ...] = ()  # the roles that token granted
    #: Which of the key's hashes was used ("sha256:" + 8 hex digits, as the access log
    #: shows it); None: the key's newest hash.
    key_hash: str | None = None


@dataclass(slots=True)
class RequestContext:
    """One request on its way through the pipeline.

    The first block is the input; each check fills in what it established
    (the key, the client address, the canonical target, the route) so later
    checks, the forwarder and the access log can use it.
    """

    config: Config
    method: str
    raw_target: str  # the request-target exactly as received
    headers: Headers
    peer_ip: str  # the socket peer
    now: float  # wall-clock epoch seconds, passed in so tests and explain control time
    request_id: str = ""

    #: The method the upstream will act on: the wire method, or the override a route
    #: allows (`X-HTTP-Method-Override`, `?_method=`). Set by the route check; every
    #: later check decides on it.
    effective_method: str = ""
    key: Key | None = None
    #: "header", "basic", "query" or "bearer"; `explain --key-id` sets "--key-id".
    credential_source: str | None = None
    client_ip: IPAddress | None = None
    target: Target | None = None
    route: Route | None = None
    access: Access | None = None
    limit: LimitResult | None = None
    #: `mode: report` keys: the first refusal the decision would have made, had it been
    #: enforced (the request went through). Read by the access log and metrics.
    would_deny: Deny | None = None

    @property
    def key_hash(self) -> str | None:
        """Which of a rotated key's hashes the request used ("sha256:" + 8 hex digits),
        so logs and metrics show when the last client moved to the new key; None for
        keys with a single `hash:`. A label of the digest, never the key."""
        key = self.key
        if key is None or key.rotation is None:
            return None
        return key.rotation.label

    user: str | None = None  # the end user a verified Bearer token names
    token_roles: tuple[str, ...] = ()  # the roles that token grants
    #: When that token stops being accepted (its `exp` plus the configured leeway).
    token_until: float | None = None
    table: str | None = None  # the table the route's {table} names, as compared (steps 6-7)
    roles: tuple[str, ...] = ()  # the key's roles plus the token's (once step 7 has run)
    self_only: bool = False  # the roles allow this operation only on the caller's records
    owner_filter: str | None = None  # query parameters added to a self-only list request
    #: The ETag of the record the owner check read before a self-only write: the write
    #: is sent with `If-Match` so a record that changed since fails at the upstream.
    owner_etag: bytes | None = None
    #: The response cache's key for this request (a `CacheKey`), once looked up.
    cache_key: Any = None
    vouched: Vouched | None = None  # explain/replay only: who step 1 takes the caller to be
    #: The request announces a body (a non-zero Content-Length or chunked framing).
    has_body: bool = False
    #: Shared by every repeat of a remembered verdict (`keyproxy.checks.memo`): what the
    #: metrics and the access log derive from the verdict is kept here once. None when
    #: the verdict is not remembered.
    notes: dict[Any, Any] | None = None

    @property
    def params(self) -> dict[str, str]:
        """The matched route's `{name}` parameters; built on demand, as few callers need them."""
        if self.route is None or self.target is None:
            return {}
        return self.route.params(self.target.segments)
