"""The `routes` section: the route list, and which ACLs it defines for the keys."""

from __future__ import annotations

import re
from dataclasses import dataclass

from yaml.nodes import Node

from keyproxy.config.model import OPS, Access, KeyType, QueryRule, Route
from keyproxy.config.yaml_reader import Reader, line_of, show
from keyproxy.policy import routes
from keyproxy.policy.permissions import TABLE_PARAMS
from keyproxy.response.fields import DocumentPath

_ROUTE_FIELDS = frozenset(
    {
        "match",
        "acl",
        "op",
        "access",
        "allow_method_override",
        "query",
        "max_concurrency",
        "scrub_body",
        "fields_at",
    }
)
_QUERY_FIELDS = frozenset({"allow", "deny"})
#: A query parameter name as a list entry: printable ASCII without separators or brackets
#: (the check compares the base name every framework reads, `select[x]` being `select`).
_QUERY_NAME = re.compile(r"[A-Za-z0-9_\-.~!$'()*,:@]{1,128}")
_ACL_NAME = re.compile(r"[a-z0-9_-]{1,64}")
_CHANGING_OPS = frozenset({"create", "update", "delete"})


@dataclass(slots=True)
class AclIndex:
    """Which ACLs the routes define, and which kind of access each can grant.

    `complete` is False when some route could not be read: checks that need
    the full picture (does this ACL exist?) are then skipped rather than
    reported falsely; the route's own issue already refuses the file.
    """

    known: set[str]
    read: set[str]
    write: set[str]
    complete: bool

    def default_for(self, key_type: KeyType) -> frozenset[str]:
        if key_type is KeyType.READ:
            return frozenset(self.read)
        if key_type is KeyType.WRITE:
            return frozenset(self.write)
        return frozenset(self.known)


def _route(r: Reader, node: Node, index: int) -> tuple[Route | None, str | None]:
    """One route, or None; also returns its ACL name when readable (for key checks)."""
    where = f"routes[{index}]"
    fields = r.fields(node, where, _ROUTE_FIELDS)
    if fields is None:
        return None, None
    before = len(r.issues)
    for required, example in (("match", 'match: "GET /v1/data/{table}"'), ("acl", "acl: search")):
        if required not in fields:
            r.issue(node, where, f"{required!r} is required", f"like {example}")
    acl = None
    if "acl" in fields:
        acl = r.string(
            fields["acl"],
            f"{where}.acl",
            _ACL_NAME,
            "ACL name",
            "use lower-case letters, digits, _ and - (at most 64)",
        )
    pattern = None
    if "match" in fields:
        pattern = _route_pattern(r, fields["match"], f"{where}.match")
    op = r.choice(fields["op"], f"{where}.op", (*OPS, "none")) if "op" in fields else None
    no_table_op = op == "none"
    if no_table_op:
        op = None
    access = (
        r.choice(fields["access"], f"{where}.access", ("read", "write"))
        if "access" in fields
        else None
    )
    override = False
    if "allow_method_override" in fields:
        override = (
            r.boolean(fields["allow_method_override"], f"{where}.allow_method_override") is True
        )
    max_concurrency = None
    if "max_concurrency" in fields:
        max_concurrency = r.integer(fields["max_concurrency"], f"{where}.max_concurrency", 1)
    scrub_body = True
    if "scrub_body" in fields:
        scrub_body = r.boolean(fields["scrub_body"], f"{where}.scrub_body") is not False
    fields_at: tuple[DocumentPath, ...] | None = ()
    if "fields_at" in fields:
        from keyproxy.config.response_sections import read_fields_at

        fields_at = read_fields_at(r, fields["fields_at"], f"{where}.fields_at")
    if access == "read" and op in _CHANGING_OPS:
        r.issue(
            fields["access"],
            f"{where}.access",
            f"a route with op: {op} changes data and cannot be access: read",
            "remove access: read, or fix op",
        )
    if access == "read" and override:
        r.issue(
            fields["allow_method_override"],
            f"{where}.allow_method_override",
            "a route with access: read cannot allow method overrides: a read key could"
            " then send POST with X-HTTP-Method-Override: DELETE",
            "remove one of the two",
        )
    query = _query_rule(r, fields["query"], f"{where}.query") if "query" in fields else None
    if (
        override
        and access != "read"
        and pattern is not None
        and len(_written_methods(pattern[0])) < 2
    ):
        r.issue(
            fields["allow_method_override"],
            f"{where}.allow_method_override",
            "an override may only name another method of the same route, and this route"
            " has one method",
            'list every method the override may ask for, like match: "POST|PUT|DELETE /x/{id}"',
        )
    if pattern is not None and op is not None:
        _op_fits(r, fields["op"], where, op, access, pattern)
    if len(r.issues) != before or pattern is None or acl is None:
        return None, acl
    text, methods, segments = pattern
    return Route(
        index=index,
        match=text,
        methods=methods,
        segments=segments,
        acl=acl,
        op=op,
        no_table_op=no_table_op,
        access=Access(access) if access else None,
        allow_method_override=bool(override),
        line=line_of(node) or 0,
        query=query,
        max_concurrency=max_concurrency,
        scrub_body=scrub_body is not False,
        fields_at=fields_at or (),
    ), acl


def _written_methods(text: str) -> set[str]:
    """The methods a pattern names itself (GET's implicit HEAD not counted)."""
    methods = text.split()[0]
    return set(routes.parse_pattern(text)[0]) if methods == "*" else set(methods.split("|"))


def _query_rule(r: Reader, node: Node, where: str) -> QueryRule | None:
    fields = r.fields(node, where, _QUERY_FIELDS)
    if fields is None:
        return None
    if len(fields) != 1:
        r.issue(
            node,
            where,
            "write exactly one of allow or deny" if fields else "is empty",
            "query: {allow: [page, limit]} lets only those through;"
            " query: {deny: [_embed, select]} refuses those",
        )
        return None
    ((kind, items),) = fields.items()
    names = r.texts(items, f"{where}.{kind}", non_empty="list at least one parameter name")
    if names is None:
        return None
    ok = True
    for item, name in names:
        if _QUERY_NAME.fullmatch(name) is None:
            r.issue(
                item,
                f"{where}.{kind}",
                f"{show(item)} is not a query parameter name",
                "write the name alone, decoded and without brackets: select, not select[]",
            )
            ok = False
    if not ok:
        return None
    lowered = frozenset(name.lower() for _, name in names)
    return QueryRule(allow=lowered) if kind == "allow" else QueryRule(deny=lowered)


#: The methods each `op:` may be sent with: a route decided as a read must not delete.
_OP_METHODS = {
    "read": frozenset({"GET", "HEAD"}),
    "list": frozenset({"GET", "HEAD"}),
    "create": frozenset({"POST", "PUT"}),
    "update": frozenset({"PUT", "PATCH", "POST"}),
    "delete": frozenset({"DELETE"}),
}


def _op_fits(
    r: Reader,
    node: Node,
    where: str,
    op: str,
    access: str | None,
    pattern: tuple[str, frozenset[str], tuple[str, ...]],
) -> None:
    """The route's methods must all be ones its `op` describes, and it names one table."""
    text, _, segments = pattern
    allowed = _OP_METHODS[op]
    if op in ("read", "list") and access == "read":
        allowed = allowed | {"POST"}  # a POST that only reads, like _search
    wrong = sorted(set(_written_methods(text)) - allowed)
    if wrong:
        r.issue(
            node,
            f"{where}.op",
            f"op: {op} does not fit method {', '.join(wrong)}: the request would be decided"
            f" as a {op}",
            f"split the route: op: {op} takes {'|'.join(sorted(allowed))}"
            + ("; a read-only POST needs access: read" if op in ("read", "list") else ""),
        )
    table_at = next((i for i, s in enumerate(segments) if s in TABLE_PARAMS), None)
    if (
        op == "create"
        and "PUT" in _written_methods(text)
        and table_at is not None
        and any(s.startswith(("{", "*")) for s in segments[table_at + 1 :])
    ):
        r.issue(
            node,
            f"{where}.op",
            "op: create with PUT on a record's path: a PUT there replaces the record if it"
            " exists, which a create grant must not allow",
            "use op: update for PUT on a record, op: create for POST to the table",
        )
    if sum(1 for s in segments if s in TABLE_PARAMS) > 1:
        r.issue(
            node,
            f"{where}.op",
            "the route names more than one table parameter; keyproxy would decide on one only",
            "keep one of {table}, {index}, {collection}",
        )


def _route_pattern(
    r: Reader, node: Node, where: str
) -> tuple[str, frozenset[str], tuple[str, ...]] | None:
    text = r.text(node, where)
    if text is None:
        return None
    try:
        methods, segments = routes.parse_pattern(text)
    except ValueError as error:
        r.issue(
            node, where, str(error), 'write METHOD[|METHOD...] /path, like "GET|HEAD /v1/{table}"'
        )
        return None
    return text, methods, segments


def _shape(segments: tuple[str, ...]) -> tuple[str, ...]:
    """Segments with parameters erased: /{a}, /{b} and /* match exactly the same paths."""
    return tuple("*" if s.startswith("{") and s.endswith("}") else s for s in segments)


def covers(earlier: tuple[str, ...], later: tuple[str, ...]) -> bool:
    """Whether every path `later` matches is matched by `earlier` (both as `_shape`s).

    `**` matches any rest, even none; `*` any one non-empty segment; a literal itself.
    """
    for i, token in enumerate(earlier):
        if token == "**":
            return True
        if i >= len(later):
            return False
        other = later[i]
        if other == "**":
            return False  # `later` also matches shorter and longer paths
        if token == "*":
            if other == "":
                return False  # a trailing slash: `*` never matches an empty segment
        elif token != other:
            return False
    return len(later) == len(earlier)


def _unreachable_routes(r: Reader, table: list[Route]) -> None:
    """A route whose every method an earlier route matches on all its paths can never match.

    Checked per method, so `GET /v1/data/{table}` shadows a later `GET /v1/data/admin`,
    `* /**` shadows everything after it, and `GET /x` plus `PUT /x/*` shadow `GET|PUT /x/{id}`.
    """
    shapes = [_shape(route.segments) for route in table]
    for position, route in enumerate(table):
        shadowing: list[Route] = []
        for method in sorted(route.methods):
            first = next(
                (
                    e
                    for e, shape in zip(table[:position], shapes, strict=False)
                    if method in e.methods and covers(shape, shapes[position])
                ),
                None,
            )
            if first is None:
                break
            if first not in shadowing:
                shadowing.append(first)
        else:
            _report_shadowed(r, route, shadowing)


def _report_shadowed(r: Reader, route: Route, shadowing: list[Route]) -> None:
    same = next((e for e in shadowing if e.methods == route.methods), None)
    if same is not None and _shape(same.segments) == _shape(route.segments):
        message = (
            f"route {route.index} duplicates route {same.index} "
            f"(line {same.line}) and can never match"
        )
    else:
        shadowing.sort(key=lambda e: e.index)
        names = ", ".join(str(e.index) for e in shadowing)
        lines = ", ".join(f"{e.index} '{e.match}' on line {e.line}" for e in shadowing)
        message = (
            f"route {route.index} can never match: earlier routes ({names}) match every"
            f" request it would (first match wins): {lines}"
        )
    first_line = min(e.line for e in shadowing)
    r.issue_at(
        route.line,
        f"routes[{route.index}].match",
        message,
        f"move it above line {first_line} if it should win, or remove it",
    )


def read_routes(r: Reader, node: Node | None, root: Node) -> tuple[list[Route], AclIndex]:
    """The routes in file order and the ACL index; `index.complete` means all were valid."""
    index = AclIndex(set(), set(), set(), complete=False)
    if node is None:
        r.issue(
            root,
            "routes",
            "the routes section is required",
            'a request no route matches is refused; add - {match: "GET /v1/{table}", acl: read}',
        )
        return [], index
    items = r.sequence(
        node, "routes", non_empty="add at least one route: without routes nothing passes"
    )
    if items is None:
        return [], index
    before = len(r.issues)
    table: list[Route] = []
    for position, item in enumerate(items):
        route, acl = _route(r, item, position)
        if acl is not None:
            index.known.add(acl)
        if route is not None:
            assert acl is not None  # a route is built only when its acl is valid
            table.append(route)
            for method in route.methods:
                (index.read if route.access_for(method) is Access.READ else index.write).add(acl)
    _unreachable_routes(r, table)
    index.complete = len(r.issues) == before
    return table, index
