"""Who may do what to which table: key scopes, roles, system tables (pure rules).

A request's table is the route's `{table}` parameter and its operation the
route's `op:`. Everything here is plain data built once per configuration
snapshot; the per-request work is a dict probe on a memo of verdicts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import quote, unquote

from keyproxy.config.model import OPS, KeyType
from keyproxy.policy.paths import name_path

if TYPE_CHECKING:
    from keyproxy.request import RequestContext

#: The table every role falls back to when it does not name the request's table.
ANY_TABLE = "*"

#: Roles when the file has no `roles` section (the common admin / user / guest split).
DEFAULT_ROLES: dict[str, dict[str, tuple[str, ...]]] = {
    "admin": {ANY_TABLE: OPS},
    "user": {ANY_TABLE: ("create", "read", "list")},
    "guest": {ANY_TABLE: ("read", "list")},
}

#: Verdicts of `Permissions.allows`.
FULL = "full"
SELF = "self"  # only records the caller owns
DENIED = "denied"

_NAME_END = re.compile(r"[^a-z0-9_-]")
_EXACT_NAME = re.compile(r"[a-z0-9_-]+")
#: Route parameters that name the request's table.
TABLE_PARAMS = frozenset({"{table}", "{index}", "{collection}"})
#: `request_name` of a segment that is neither one exact table name nor a multi-target one.
NOT_A_TABLE = ""
#: Verdicts remembered per snapshot; table names come from client paths, so it is bounded.
_MEMO_LIMIT = 4096


def table_name(segment: str) -> str:
    """The name a path segment gives a table, as the most lenient backend reads it.

    Letter case, percent-escapes and anything from the first character that is not a
    letter, digit, `_` or `-` (a `.json` format suffix, `;` parameters, `:` actions)
    are dropped, so every spelling an upstream might map to `users` compares as `users`.
    """
    name = unquote(segment).lower() if "%" in segment else segment.lower()
    cut = _NAME_END.search(name)
    return name if cut is None else name[: cut.start()]


def request_name(segment: str) -> str:
    """The table a path segment names when it is used to GRANT access.

    Only an exact lower-case `[a-z0-9_-]+` name is one table. A spelling a backend
    reads as several tables (`posts,users`, `use*`, `_all`) is ANY_TABLE, so only a
    grant on every table covers it; any other spelling (`POSTS`, `posts.json`,
    escapes) is NOT_A_TABLE and refused, since keyproxy cannot know which table the
    upstream will read. The lenient `table_name` stays for deny checks only.
    """
    if "," in segment or "*" in segment or segment.startswith("_"):
        return ANY_TABLE
    return segment if _EXACT_NAME.fullmatch(segment) else NOT_A_TABLE


def table_position(segments: tuple[str, ...]) -> int | None:
    """Where a route pattern names its table (`{table}`, `{index}`, `{collection}`)."""
    for position, segment in enumerate(segments):
        if segment in TABLE_PARAMS:
            return position
    return None


class Grant(NamedTuple):
    full: frozenset[str]  # operations allowed on any record
    own: frozenset[str]  # operations allowed only on the caller's records (`op:self`)


@dataclass(frozen=True, slots=True)
class Role:
    """One role: a grant per table, `*` for the rest, and the tables it explicitly denies."""

    tables: Mapping[str, Grant]
    denied: frozenset[str] = frozenset()

    def grant(self, table: str | None) -> Grant | None:
        if table is not None:
            found = self.tables.get(table)
            if found is not None:
                return found
        return self.tables.get(ANY_TABLE)


#: What `upstream_user_id` leaves as is in a user id: printable ASCII except `%`.
_USER_ID_SAFE = " !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"


def upstream_user_id(user: str) -> str:
    """The user id as the upstream sees it (identity header, list filter, stored owner).

    A non-ASCII id is percent-encoded (UTF-8) so a header never carries bytes a backend
    could misread. Token user ids containing `%` are refused, so this encoded form
    never equals another user's raw id; every owner comparison uses this one form.
    """
    if user.isascii() and "%" not in user:
        return user
    return quote(user, safe=_USER_ID_SAFE)


@dataclass(frozen=True, slots=True)
class SelfRecords:
    """How `op:self` permissions find a record's owner."""

    owner_field: str
    #: Query parameters added to a self-only caller's list requests: (name, template),
    #: the template's `{user}` replaced by the caller's user id.
    list_filter: tuple[tuple[str, str], ...] = ()
    #: Each filter name as a nesting parser reads it (`name_path`): a client name on the
    #: same path, or a prefix of it or an extension of it, would replace or widen it.
    filter_paths: tuple[tuple[str, ...], ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        paths = tuple(name_path(name) for name, _ in self.list_filter)
        object.__setattr__(self, "filter_paths", paths)

    def widened_by(self, raw_name: str) -> bool:
        """Whether a client's query name reaches a filter's key path: `filter`,
        `filter.createdBy` or `filter[createdBy][$ne]` against `filter[createdBy]`."""
        sent = name_path(raw_name)
        if not sent:
            return False
        for path in self.filter_paths:
            shorter = min(len(path), len(sent))
            if path[:shorter] == sent[:shorter]:
                return True
        return False

    def filter_query(self, user: str) -> str:
        return "&".join(
            f"{quote(name, safe='')}="
            f"{quote(template.replace('{user}', upstream_user_id(user)), safe='')}"
            for name, template in self.list_filter
        )


@dataclass(frozen=True, slots=True)
class Permissions:
    """Step 7's rules for one snapshot.

    `roles_enabled` is False for a file that has neither `users`, `roles` nor any key
    with `roles:`: then keys alone decide, as before roles existed, and step 7 costs
    one attribute test.
    """

    roles: Mapping[str, Role]
    roles_enabled: bool = False
    system_tables: frozenset[str] = frozenset()
    self_records: SelfRecords | None = None
    _memo: dict[tuple[tuple[str, ...], str | None, str], str] = field(
        default_factory=dict, repr=False, compare=False
    )

    def allows(self, roles: tuple[str, ...], table: str | None, op: str) -> str:
        """FULL, SELF or DENIED for `op` on `table` with this set of roles.

        An explicit deny (`"!table": []`) in any role wins over every grant in every
        role; otherwise the widest grant of any role counts.
        """
        memo_key = (roles, table, op)
        verdict = self._memo.get(memo_key)
        if verdict is not None:
            return verdict
        verdict = self._decide(roles, table, op)
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[memo_key] = verdict
        return verdict

    def _decide(self, roles: tuple[str, ...], table: str | None, op: str) -> str:
        known = [self.roles[name] for name in roles if name in self.roles]
        if table == ANY_TABLE or table is None:
            # every table is touched: any table a role denies denies the request, and
            # the request gets the narrowest verdict of any table: a table entry that
            # grants less than `*` (`secrets: []`) holds for `_all` and `a,secrets` too
            if any(role.denied for role in known):
                return DENIED
            verdict = self._grant_verdict(known, ANY_TABLE, op)
            for name in {t for role in known for t in role.tables if t != ANY_TABLE}:
                if verdict is DENIED:
                    break
                narrower = self._grant_verdict(known, name, op)
                if narrower is DENIED or narrower is SELF:
                    verdict = narrower
            return verdict
        if any(table in role.denied for role in known):
            return DENIED
        return self._grant_verdict(known, table, op)

    @staticmethod
    def _grant_verdict(known: list[Role], table: str, op: str) -> str:
        """The widest grant of `op` on `table` among `known` roles (denies aside)."""
        verdict = DENIED
        for role in known:
            grant = role.grant(table)
            if grant is None:
                continue
            if op in grant.full:
                return FULL
            if op in grant.own:
                verdict = SELF
        return verdict


def build_roles(spec: Mapping[str, Mapping[str, Iterable[str]]]) -> dict[str, Role]:
    """Roles from `{role: {table or "!table" or "*": [op, "op:self", ...]}}` (already validated)."""
    roles: dict[str, Role] = {}
    for name, tables in spec.items():
        grants: dict[str, Grant] = {}
        denied: set[str] = set()
        for table, ops in tables.items():
            if table.startswith("!"):
                denied.add(table[1:])
                continue
            ops = tuple(ops)
            full = frozenset(op for op in ops if ":" not in op)
            own = frozenset(op.partition(":")[0] for op in ops if op.endswith(":self"))
            grants[table] = Grant(full, own - full)
        roles[name] = Role(grants, frozenset(denied))
    return roles


def scope_allows(scopes: frozenset[str], table: str | None, op: str) -> bool:
    """Whether a key's scopes (`table:op`, `*:op`, `table:*`, `*:*`) cover `op` on `table`."""
    if f"*:{op}" in scopes or "*:*" in scopes:
        return True
    return table is not None and (f"{table}:{op}" in scopes or f"{table}:*" in scopes)


def key_roles(key_roles: tuple[str, ...] | None, is_admin: bool) -> tuple[str, ...]:
    if key_roles is not None:
        return key_roles
    return ("admin",) if is_admin else ("guest",)


def identity_pairs(
    ctx: RequestContext, names: tuple[tuple[str, str], ...]
) -> list[tuple[str, str]]:
    """`upstream.identity_headers`: who calls, as keyproxy established it, for the
    request and for the owner check's read alike.

    A user id is sent in its upstream form (`upstream_user_id`), the one the owner
    check and the list filter compare with.
    """
    pairs = []
    for kind, name in names:
        if kind == "key_id":
            value = ctx.key.id if ctx.key is not None else ""
        elif kind == "user":
            value = upstream_user_id(ctx.user) if ctx.user else ""
        else:
            roles = ctx.roles
            if not roles and ctx.key is not None:  # step 7 is off: the same rule, here
                roles = key_roles(ctx.key.roles, ctx.key.type is KeyType.ADMIN)
                roles = tuple(dict.fromkeys(roles + ctx.token_roles))
            value = ",".join(roles)
        if value:
            pairs.append((name, value))
    return pairs
