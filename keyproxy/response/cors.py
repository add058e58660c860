"""CORS for browser apps: preflights answered by keyproxy, origins echoed on every answer.

A browser sends its preflight `OPTIONS` without credentials, so a proxy that
demands a key first can never let a cross-origin app call it with an
`X-API-Key` header. With `cors:` configured keyproxy answers a preflight from an
allowed origin itself (what Kong calls `run_on_preflight`), and every answer to
an allowed origin, keyproxy's own refusals included, names that origin so the
app can read the rate-limit headers and why it was refused.

Everything that does not depend on the request is built once per configuration
snapshot: the header blocks are bytes ready to append. Origins are matched with
the referer matcher (`keyproxy.policy.allowlists`): linear time, no regular expression
built from configuration text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from keyproxy.policy.allowlists import RefererPattern, match_referer
from keyproxy.request import Reply, RequestContext

#: Headers a browser app may read on an answer from an allowed origin.
EXPOSED = (
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "X-Quota-Limit",
    "X-Quota-Remaining",
    "X-Quota-Reset",
    "X-Request-Id",
    "Retry-After",
)
#: Request headers a preflight always allows: how a key and a JSON body travel.
ALWAYS_ALLOWED = ("X-API-Key", "Authorization", "Content-Type")
MAX_ORIGINS = 100
#: An `Access-Control-Request-Headers` list longer than this is not echoed.
MAX_REQUESTED_HEADERS = 2048
_TOKEN_LIST = re.compile(r"[!#$%&'*+.^`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^`|~0-9A-Za-z-]+)*")
_ORIGIN_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class CorsSettings:
    """The `cors:` section as written."""

    allow_origins: tuple[RefererPattern, ...]
    max_age: int = 600
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()


def parse_origin_pattern(text: str) -> RefererPattern:
    """An origin pattern: `scheme://host[:port]`, with `*` as for referers, and no path.

    A browser's `Origin` never carries a path, so a pattern with one could never
    match; it is refused instead of silently allowing nothing.
    """
    pattern = RefererPattern.parse(text)
    if pattern.path is not None:
        raise ValueError(
            f"origin pattern {text!r} has a path: an Origin is only scheme://host[:port]"
        )
    return pattern


@dataclass(slots=True)
class CorsPolicy:
    """`cors:` compiled for one configuration snapshot."""

    settings: CorsSettings
    methods: str  # the Access-Control-Allow-Methods value
    preflight_tail: bytes = b""
    response_tail: bytes = b""
    _origins: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: CorsSettings, methods: Iterable[str]) -> CorsPolicy:
        allowed = ", ".join(sorted(set(methods) | {"OPTIONS"}))
        policy = cls(settings, allowed)
        expose = ", ".join(dict.fromkeys((*EXPOSED, *settings.expose_headers)))
        policy.response_tail = (
            b"Access-Control-Expose-Headers: " + expose.encode("latin-1") + b"\r\nVary: Origin\r\n"
        )
        policy.preflight_tail = (
            b"Access-Control-Allow-Methods: " + allowed.encode("latin-1") + b"\r\n"
            b"Access-Control-Max-Age: %d\r\n"
            b"Vary: Origin, Access-Control-Request-Method, Access-Control-Request-Headers\r\n"
            % settings.max_age
        )
        return policy

    @property
    def allow_headers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*ALWAYS_ALLOWED, *self.settings.allow_headers)))

    def allows(self, origin: str | None) -> bool:
        """Whether `origin` (the request's one `Origin` header) is allowed; `null` never is."""
        if not origin or origin == "null":
            return False
        known = self._origins.get(origin)
        if known is None:
            known = match_referer(self.settings.allow_origins, origin)
            if len(self._origins) >= _ORIGIN_CACHE_SIZE:
                self._origins.clear()
            self._origins[origin] = known
        return known

    def response_headers(self, origin: str | None) -> bytes:
        """Header lines for any answer to a request carrying `origin`.

        `Vary: Origin` goes on every answer, allowed or not, so a shared cache
        never hands the answer for one origin to another.
        """
        if self.allows(origin):
            assert origin is not None
            return (
                b"Access-Control-Allow-Origin: "
                + origin.encode("latin-1")
                + b"\r\n"
                + self.response_tail
            )
        return b"Vary: Origin\r\n"

    def preflight(self, origin: str, requested_headers: str | None) -> Reply:
        names = list(self.allow_headers)
        if (
            requested_headers
            and len(requested_headers) <= MAX_REQUESTED_HEADERS
            and _TOKEN_LIST.fullmatch(requested_headers.strip())
        ):
            known = {n.lower() for n in names}
            for name in requested_headers.split(","):
                name = name.strip()
                if name.lower() not in known and "_" not in name:
                    known.add(name.lower())
                    names.append(name)
        headers = (
            b"Access-Control-Allow-Origin: " + origin.encode("latin-1") + b"\r\n"
            b"Access-Control-Allow-Headers: "
            + ", ".join(names).encode("latin-1")
            + b"\r\n"
            + self.preflight_tail
        )
        return Reply(204, headers, f"CORS preflight from allowed origin {origin} answered")


def single_header(items: Iterable[tuple[str, str]], name: str) -> str | None:
    """The value of a header sent exactly once; None when absent or repeated."""
    found: str | None = None
    for n, v in items:
        if n == name:
            if found is not None:
                return None
            found = v
    return found


def check_preflight(ctx: RequestContext) -> Reply | None:
    """Step 0: a CORS preflight from an allowed origin is answered here, without a key.

    Anything else, a preflight from another origin included, goes on to the
    normal decision (which refuses it for want of a key).
    """
    cors = ctx.config.cors
    if cors is None or ctx.method != "OPTIONS":
        return None
    headers = ctx.headers
    origin = single_header(headers, "origin")
    if not cors.allows(origin) or single_header(headers, "access-control-request-method") is None:
        return None
    assert origin is not None
    return cors.preflight(origin, single_header(headers, "access-control-request-headers"))


def describe_preflight(ctx: RequestContext) -> str:
    if ctx.config.cors is None:
        return "no cors section"
    return "not a CORS preflight from an allowed origin"


def strip_upstream_cors(lines: list[bytes]) -> list[bytes]:
    """The upstream's own `Access-Control-*` lines: keyproxy alone speaks CORS when it is on."""
    return [line for line in lines if not line[:15].lower().startswith(b"access-control-")]
