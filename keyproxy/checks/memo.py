"""Steps 0–7 remembered for a request seen before, so a repeat pays only for step 8.

Clients repeat themselves: a browser app or an SDK sends the same method, path and
headers from the same address many times. For the same snapshot, the same inputs
give the same verdict, so the context steps 0–7 established (the key, the route,
the roles, ...) is kept and copied onto the next identical request; the rate limit
(step 8) always runs. Measured on the benchmark policy (`bench/datapath.py --full`):
the decision's cost drops from ~45 to ~8 µs per repeated request.

What makes a hit exact:
- the memo key is every input the checks read: method, request-target, socket peer
  and every header except `MEMO_IGNORED_HEADERS` (`keyproxy.policy.headers`), which no
  check reads (a test holds that);
- it belongs to one configuration snapshot: a reload starts an empty memo;
- facts that end with time (a key's expiry, an old hash's grace, an end-user
  token's `exp`) bound an entry's life, and a change of the JWKS keys voids every
  entry, as it voids the token cache;
- only verdicts reached synchronously and in full are kept: no refusal, no report-
  mode finding, no self-only verdict (its owner read runs every time, and it rests on
  whether the request has a body, which the key leaves out).

An entry also carries `notes`, a dict every repeat shares (`RequestContext.notes`):
what is derived from the verdict alone, such as its access-log fields
(`keyproxy.observe.Verdict`), is computed for the first request and reused.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

from keyproxy.policy.headers import MEMO_IGNORED_HEADERS

if TYPE_CHECKING:
    from keyproxy.config.model import Config
    from keyproxy.request import RequestContext

#: What steps 0–7 set on the context, which a hit copies back.
ESTABLISHED = (
    "effective_method",
    "key",
    "credential_source",
    "client_ip",
    "target",
    "route",
    "access",
    "user",
    "token_roles",
    "token_until",
    "table",
    "roles",
    "self_only",
    "owner_filter",
)
_established = operator.attrgetter(*ESTABLISHED)

#: Entries per snapshot; when full the memo starts over (a dict's clear is cheaper
#: per request than any LRU bookkeeping, and a flood of distinct requests only
#: costs them their own misses).
MAX_ENTRIES = 4096


def memo_key(
    method: str, target: str, peer_ip: str, headers: list[tuple[str, str]], varying: bool
) -> tuple[Any, ...]:
    """The decision's inputs as one hashable value; `varying`: some header is ignored."""
    if varying:
        return (method, target, peer_ip, *(h for h in headers if h[0] not in MEMO_IGNORED_HEADERS))
    return (method, target, peer_ip, *headers)


class DecisionMemo:
    __slots__ = ("config", "entries", "hits", "misses")

    def __init__(self) -> None:
        self.config: Config | None = None
        self.entries: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self.hits = 0
        self.misses = 0

    def recall(self, ctx: RequestContext, key: tuple[Any, ...]) -> bool:
        """Copy a remembered verdict's context onto `ctx`; False when there is none."""
        config = ctx.config
        if config is not self.config:
            self.config = config
            self.entries = {}
        entry = self.entries.get(key)
        if entry is None or entry[0] <= ctx.now or entry[1] != _jwks_generation(config):
            self.misses += 1
            return False
        self.hits += 1
        # In `ESTABLISHED` order (tests/test_decision_memo.py compares a hit with a fresh
        # decision field by field); unpacked by name, as this runs for every repeat.
        (
            _,
            _,
            ctx.effective_method,
            ctx.key,
            ctx.credential_source,
            ctx.client_ip,
            ctx.target,
            ctx.route,
            ctx.access,
            ctx.user,
            ctx.token_roles,
            ctx.token_until,
            ctx.table,
            ctx.roles,
            ctx.self_only,
            ctx.owner_filter,
            ctx.notes,
        ) = entry
        return True

    def remember(self, ctx: RequestContext, key: tuple[Any, ...]) -> None:
        """Keep what steps 0–7 established, if the verdict may be reused (see above)."""
        if ctx.would_deny is not None or ctx.self_only or ctx.vouched is not None:
            # A self-only verdict also rests on whether the request has a body, which the
            # memo key leaves out (Content-Length), and a self-only write reads the record.
            return
        if ctx.config is not self.config:
            return  # a reload landed mid-request: this verdict belongs to the old one
        entries = self.entries
        if len(entries) >= MAX_ENTRIES:
            entries.clear()
        ctx.notes = {}
        entries[key] = (
            _valid_until(ctx), _jwks_generation(ctx.config), *_established(ctx), ctx.notes
        )  # fmt: skip


def _valid_until(ctx: RequestContext) -> float:
    """When the facts the verdict rests on stop holding (wall-clock seconds)."""
    until = math.inf
    key = ctx.key
    if key is not None:
        if key.expires_at is not None:
            until = key.expires_at
        rotation = key.rotation
        if rotation is not None and rotation.until is not None:
            until = min(until, rotation.until)
    if ctx.user is not None:
        # A user without a token expiry came from elsewhere than a verified token: no reuse.
        until = min(until, ctx.token_until if ctx.token_until is not None else -math.inf)
    return until


def _jwks_generation(config: Config) -> int:
    users = config.users
    if users is None:
        return 0
    jwks = users.jwks
    return jwks.generation if jwks is not None else 0
