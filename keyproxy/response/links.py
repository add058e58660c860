"""The header work every forwarded answer gets, as links of the response chain.

`build_chain` puts them in the chain's order for one configuration snapshot:
header hygiene (origin URLs made relative, Location included, and every spelling
of the upstream's secrets redacted) → limit headers → CORS. Body links (scrubbing,
the cache tee, fields filtering) are inserted between hygiene and limit headers.

Framing and hop-by-hop headers, X-Request-Id and the upstream's own limit headers
never reach a link: the upstream parser leaves them out as it reads them
(`keyproxy.policy.headers.RESPONSE_DROP`), which costs nothing per header.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from keyproxy.request import Deny, RequestContext
from keyproxy.response.chain import Chain, LinkFactory, ResponseHead
from keyproxy.response.cors import single_header, strip_upstream_cors

if TYPE_CHECKING:
    from keyproxy.config.model import Config
    from keyproxy.ratelimit import LimitResult
    from keyproxy.response.cors import CorsPolicy
    from keyproxy.response.headers import SecretScrubber


class HeaderLink:
    """A link that edits the head only; the exchange never calls its body methods
    (it skips instances of this class when passing body chunks)."""

    __slots__ = ()

    def on_head(self, head: ResponseHead) -> Deny | None:
        return None

    def on_body(self, chunk: bytes) -> bytes:
        return chunk

    def on_end(self) -> bytes | Deny:
        return b""


class HeaderHygiene(HeaderLink):
    """URLs of the upstream's origin made proxy-relative and its secrets redacted in
    every header, Location included; one object serves every response of a snapshot."""

    __slots__ = ("clean", "scrubber")

    def __init__(self, scrubber: SecretScrubber) -> None:
        self.scrubber = scrubber
        #: Header blocks already found clean. An upstream sends the same few blocks over
        #: and over (they differ by `Date` once a second, by `ETag` per record), so the
        #: scan of a repeat is one dict probe: ~1.5 of ~2 µs per answer saved.
        self.clean: set[bytes] = set()

    def __call__(self, ctx: RequestContext) -> HeaderHygiene:
        return self

    def on_head(self, head: ResponseHead) -> Deny | None:
        lines = head.lines
        block = b"".join(lines)
        if block in self.clean:
            return None
        if b"\t" in block:
            # Browsers drop tabs inside URLs, so `ht\ttp://host` is the upstream's URL.
            location = head.get(b"location")
            if location is not None and b"\t" in location:
                head.set(b"Location", location.replace(b"\t", b""))
                block = b"".join(lines)
        scrubber = self.scrubber
        if scrubber.found_in(block):
            scrubbed = scrubber.scrub(block)
            # Values hold no CR or LF (the parser refuses them): lines split back exactly.
            lines[:] = [line + b"\r\n" for line in scrubbed.split(b"\r\n")[:-1]]
        elif len(block) <= MAX_REMEMBERED_BLOCK:
            clean = self.clean
            if len(clean) >= MAX_REMEMBERED_BLOCKS:
                clean.clear()
            clean.add(block)
        return None


#: Clean header blocks remembered per snapshot, and the longest one remembered.
MAX_REMEMBERED_BLOCKS = 1024
MAX_REMEMBERED_BLOCK = 4096


def rate_limit_lines(limit: LimitResult) -> list[bytes]:
    """X-RateLimit-* and X-Quota-* lines for the caller's own limits."""
    lines: list[bytes] = []
    if limit.limit is not None:
        lines += (
            b"X-RateLimit-Limit: %d\r\n" % limit.limit,
            b"X-RateLimit-Remaining: %d\r\n" % (limit.remaining or 0),
            b"X-RateLimit-Reset: %d\r\n" % int(-(-(limit.reset or 0) // 1)),
        )
    if limit.quota is not None:
        lines += (
            b"X-Quota-Limit: %d\r\n" % limit.quota,
            b"X-Quota-Remaining: %d\r\n" % (limit.quota_remaining or 0),
        )
        if limit.quota_reset is not None:  # a quota that refills: when it does
            lines.append(b"X-Quota-Reset: %d\r\n" % -(-limit.quota_reset // 1))
    return lines


def rate_limit_headers(limit: LimitResult | None) -> bytes:
    """The same lines as one block, for answers keyproxy gives itself."""
    return b"".join(rate_limit_lines(limit)) if limit is not None else b""


class LimitHeaders(HeaderLink):
    """The caller's rate-limit and quota state on the answer."""

    __slots__ = ("lines",)

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    def on_head(self, head: ResponseHead) -> Deny | None:
        head.lines += self.lines
        return None


def limit_headers(ctx: RequestContext) -> LimitHeaders | None:
    """Factory: a link only for requests that were counted against a limit."""
    limit = ctx.limit
    if limit is None:
        return None
    lines = rate_limit_lines(limit)
    return LimitHeaders(lines) if lines else None


class CorsHeaders(HeaderLink):
    """keyproxy alone speaks CORS when it is configured: the upstream's own
    `Access-Control-*` lines go, keyproxy's for the request's origin come."""

    __slots__ = ("block",)

    def __init__(self, block: bytes) -> None:
        self.block = block

    def on_head(self, head: ResponseHead) -> Deny | None:
        lines = strip_upstream_cors(head.lines)
        lines += [line + b"\r\n" for line in self.block.split(b"\r\n")[:-1]]
        head.lines[:] = lines
        return None


class CorsFactory:
    """Makes the CORS link for one request from the snapshot's CORS settings."""

    __slots__ = ("cors",)

    def __init__(self, cors: CorsPolicy) -> None:
        self.cors = cors

    def __call__(self, ctx: RequestContext) -> CorsHeaders:
        origin = single_header(ctx.headers, "origin")
        return CorsHeaders(self.cors.response_headers(origin))


def build_chain(
    config: Config, scrubber: SecretScrubber, body: Sequence[LinkFactory] = ()
) -> Chain:
    """The snapshot's response chain, in order; links that have nothing to do are left out.
    `body`: the body links (scrub, cache, fields; `keyproxy.response.body_links`)."""
    links: list[LinkFactory] = []
    if scrubber:
        links.append(HeaderHygiene(scrubber))
    links.extend(body)
    links.append(limit_headers)
    if config.cors is not None:
        links.append(CorsFactory(config.cors))
    return tuple(links)
