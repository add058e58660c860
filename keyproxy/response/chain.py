"""The response chain: small links an upstream answer passes through on its way out.

Every piece of response-side work (header hygiene, body scrubbing, the cache tee,
fields filtering, limit headers, CORS) is one link. The chain is built once per
configuration snapshot (a link's factory may decline a request, e.g. on a route
with `scrub_body: false`), so a snapshot with nothing to do has an empty chain
and the exchange pays one `if` for it. A link sees the head before it
leaves and every body chunk in order; links that need the whole body first set
`head.hold`, and the exchange then buffers and sends head + body together with a
computed Content-Length — or the link's Deny instead, so no unfiltered byte ever
leaves.

Order (the exchange runs links front to back): header hygiene → body scrub →
cache tee → fields filter → limit headers → CORS. A cache hit enters the chain
after the cache tee via `Exchange.serve_stored(status, lines, body, start)`.

Rules for a link:
- a link that changes the body's length without `hold` sets `head.length = None`
  in `on_head` (the exchange then frames the body chunked for HTTP/1.1,
  close-delimited for 1.0);
- a link never raises for bad upstream data: it returns a Deny (with hold) or
  passes the bytes on, except `RefuseAnswer` from `on_body` when the first bytes of a
  body that streams show it must not leave at all;
- a stateless header-only link may return the same object for every response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from keyproxy.request import Deny, RequestContext

__all__ = ["Chain", "Link", "LinkFactory", "RefuseAnswer", "ResponseHead"]


@dataclass(slots=True)
class ResponseHead:
    """The upstream's answer head as links see and edit it.

    Framing headers are excluded: Content-Length, Transfer-Encoding, Connection and
    the hop-by-hop headers are keyproxy's own and written by the exchange, so no
    link can frame the body wrongly.
    """

    status: int
    #: Header lines b"Name: value\\r\\n", in order, as they will be sent.
    lines: list[bytes]
    #: Body length the upstream declared; None: unknown (chunked or close-delimited).
    length: int | None
    #: The request method (HEAD: no body follows).
    method: str
    #: A link needs the whole body before the head may leave (it may change the
    #: length or refuse the body): the exchange then buffers the links' output and
    #: sends head + body at the end with a computed Content-Length.
    hold: bool = False

    def _index(self, name: bytes) -> int:
        """Position of the first line named `name` (case-insensitive), or -1.

        Lines are `Name: value` as keyproxy writes them (the parser refuses space
        before the colon), so comparing the lower-cased prefix is exact; this runs
        for every answer a body link sees (`Content-Encoding`, `Content-Type`)."""
        prefix = name.lower() + b":"
        size = len(prefix)
        for i, line in enumerate(self.lines):
            if line[:size].lower() == prefix:
                return i
        return -1

    def get(self, name: bytes) -> bytes | None:
        """First value of header `name` (case-insensitive), without surrounding space."""
        i = self._index(name)
        if i < 0:
            return None
        line = self.lines[i]
        return line[line.find(b":") + 1 :].strip()

    def remove(self, name: bytes) -> None:
        """Drop every line named `name`: a repeated header must not survive by its twin."""
        prefix = name.lower() + b":"
        size = len(prefix)
        self.lines[:] = [line for line in self.lines if line[:size].lower() != prefix]

    def set(self, name: bytes, value: bytes) -> None:
        """Replace header `name` in place (first occurrence, twins dropped) or append it."""
        line = name + b": " + value + b"\r\n"
        i = self._index(name)
        if i < 0:
            self.lines.append(line)
            return
        self.remove(name)
        self.lines.insert(i, line)


class RefuseAnswer(Exception):
    """Raised by `on_body` when the body must not leave and the head was not held: what
    the first bytes show (a UTF-16 body) cannot be known when the head passes, and holding
    every head until its body starts would stall streams that start late. The exchange
    answers `deny` when the head is still only queued (nearly always: the head and the
    first bytes come in one read), else cuts the connection so no body byte leaves."""

    def __init__(self, deny: Deny) -> None:
        super().__init__(deny.code)
        self.deny = deny


class Link(Protocol):
    """One response's pass through one link. Called in chain order."""

    def on_head(self, head: ResponseHead) -> Deny | None:
        """May edit `head`; a Deny replaces the whole response (nothing has left yet)."""
        ...

    def on_body(self, chunk: bytes) -> bytes:
        """Bytes to pass to the next link (b"" while buffering); may raise `RefuseAnswer`."""
        ...

    def on_end(self) -> bytes | Deny:
        """The rest of the body.

        A Deny only when `head.hold` was set (nothing has left yet): the exchange then
        answers that error (e.g. 502 FILTER_FAILED) and no unfiltered byte leaves.
        """
        ...


class LinkFactory(Protocol):
    """Makes the link for one request; None when there is nothing to do for it."""

    def __call__(self, ctx: RequestContext) -> Link | None: ...


#: Built once per config snapshot per route; () costs one `if` per request.
Chain = tuple[LinkFactory, ...]
