"""The `roles`, `system_tables` and `self` sections: per-table permissions."""

from __future__ import annotations

import re

from yaml.nodes import MappingNode, Node, ScalarNode

from keyproxy.config.model import OPS
from keyproxy.config.server_section import QUERY_NAME
from keyproxy.config.yaml_reader import Reader, did_you_mean, kind_of
from keyproxy.policy.permissions import (
    ANY_TABLE,
    DEFAULT_ROLES,
    Permissions,
    SelfRecords,
    build_roles,
    table_name,
)

_ROLE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_TABLE = re.compile(r"[a-z0-9_-]{1,64}")
_SELF_FIELDS = frozenset({"owner_field", "list_filter"})
_LIST_FILTER_FIELDS = frozenset({"query"})
_ROLE_OPS = (*OPS, *(f"{op}:self" for op in OPS if op != "create"))


def _table(r: Reader, node: Node, where: str, text: str) -> str | None:
    if table_name(text) != text or _TABLE.fullmatch(text) is None:
        r.issue(
            node,
            where,
            f"{text!r} is not a table name keyproxy can compare",
            "use lower-case letters, digits, _ and - (or * for every table)",
        )
        return None
    return text


def _role(r: Reader, node: Node, where: str) -> dict[str, tuple[str, ...]] | None:
    if type(node) is not MappingNode:
        r.issue(
            node,
            where,
            f"expected a mapping of tables to operations, found {kind_of(node)}",
            'write {"*": [read, list], posts: [create, read]}',
        )
        return None
    before = len(r.issues)
    tables: dict[str, tuple[str, ...]] = {}
    for key, value in node.value:
        name = key.value if type(key) is ScalarNode else None
        if name is None:
            r.issue(
                key,
                where,
                "a table name must be a single word",
                'write a table name, "*" for every table or "!name" for a deny',
            )
            continue
        here = f"{where}.{name}"
        if name in tables:
            r.issue(
                key, here, f"{name!r} appears twice in this role", "merge its operations into one"
            )
            continue
        deny = name.startswith("!")
        if name != ANY_TABLE and _table(r, key, here, name[1:] if deny else name) is None:
            continue
        items = r.texts(value, here) if not (deny and value.value == []) else []
        if items is None:
            continue
        if deny and items:
            r.issue(
                value,
                here,
                "an explicit deny lists no operations",
                f'write "{name}": [] (it refuses every operation on {name[1:]})',
            )
            continue
        ops = []
        for position, (item, op) in enumerate(items):
            if op not in _ROLE_OPS:
                hint = (
                    "create:self is not supported: a new record has no owner yet; grant create"
                    if op == "create:self"
                    else did_you_mean(op, _ROLE_OPS) or "use " + ", ".join(_ROLE_OPS)
                )
                r.issue(item, f"{here}[{position}]", f"unknown operation {op!r}", hint)
            else:
                ops.append(op)
        tables[name] = tuple(ops)
    return tables if len(r.issues) == before else None


def _roles(r: Reader, node: Node) -> dict[str, dict[str, tuple[str, ...]]] | None:
    if type(node) is not MappingNode or not node.value:
        r.issue(
            node,
            "roles",
            "expected a mapping of role names to tables",
            'like roles: {guest: {"*": [read, list]}}',
        )
        return None
    roles: dict[str, dict[str, tuple[str, ...]]] = {}
    before = len(r.issues)
    for key, value in node.value:
        name = key.value if type(key) is ScalarNode else ""
        if _ROLE_NAME.fullmatch(name) is None:
            r.issue(key, "roles", f"{name!r} is not a valid role name", "letters, digits, _ . : -")
            continue
        if name in roles:
            r.issue(
                key,
                f"roles.{name}",
                f"role {name!r} is defined twice",
                "keep one definition and merge the other's tables into it",
            )
            continue
        role = _role(r, value, f"roles.{name}")
        if role is not None:
            roles[name] = role
    return roles if len(r.issues) == before else None


def _system_tables(r: Reader, node: Node) -> frozenset[str] | None:
    items = r.texts(node, "system_tables", non_empty="omit system_tables if there are none")
    if items is None:
        return None
    found = [_table(r, item, f"system_tables[{i}]", text) for i, (item, text) in enumerate(items)]
    tables = [table for table in found if table is not None]
    return None if len(tables) != len(found) else frozenset(tables)


def _self(r: Reader, node: Node) -> SelfRecords | None:
    fields = r.fields(node, "self", _SELF_FIELDS)
    if fields is None:
        return None
    if "owner_field" not in fields:
        r.issue(node, "self", "'owner_field' is required", "like owner_field: createdBy")
        return None
    owner = r.text(fields["owner_field"], "self.owner_field")
    if owner is not None and not owner:
        r.issue(
            fields["owner_field"],
            "self.owner_field",
            "is empty",
            "name the record field that holds its owner, like createdBy",
        )
        owner = None
    filters: list[tuple[str, str]] = []
    if "list_filter" in fields:
        lf = r.fields(fields["list_filter"], "self.list_filter", _LIST_FILTER_FIELDS)
        query = (lf or {}).get("query")
        if lf is not None and query is None:
            r.issue(
                fields["list_filter"],
                "self.list_filter",
                "'query' is required",
                'write list_filter: {query: {createdBy: "{user}"}}',
            )
        elif query is not None:
            if type(query) is not MappingNode or not query.value:
                r.issue(
                    query,
                    "self.list_filter.query",
                    "expected a mapping of parameters",
                    'write query: {createdBy: "{user}"}',
                )
                return None
            for key, value in query.value:
                name = key.value if type(key) is ScalarNode else ""
                here = f"self.list_filter.query.{name}"
                if QUERY_NAME.fullmatch(name) is None:
                    r.issue(
                        key,
                        here,
                        f"{name!r} is not a valid query parameter name",
                        "use letters, digits and . _ ~ - [ ]",
                    )
                    continue
                template = r.text(value, here)
                if template is not None and "{user}" not in template:
                    r.issue(
                        value,
                        here,
                        "the filter must contain {user}",
                        'like createdBy: "{user}": it is what limits the list to the caller',
                    )
                elif template is not None:
                    filters.append((name, template))
    if owner is None:
        return None
    return SelfRecords(owner, tuple(filters))


def read_permissions(
    r: Reader,
    sections: dict[str, Node],
    users_configured: bool,
    keys_name_roles: bool,
) -> Permissions | None:
    """Step 7's rules, or None when the file uses none of them."""
    if not (
        users_configured
        or keys_name_roles
        or any(s in sections for s in ("roles", "system_tables", "self"))
    ):
        return None
    before = len(r.issues)
    spec: dict[str, dict[str, tuple[str, ...]]] | None = dict(DEFAULT_ROLES)
    if "roles" in sections:
        spec = _roles(r, sections["roles"])
    system = _system_tables(r, sections["system_tables"]) if "system_tables" in sections else None
    self_records = _self(r, sections["self"]) if "self" in sections else None
    if spec is not None and self_records is None and "self" not in sections:
        for role, tables in spec.items():
            if any(op.endswith(":self") for ops in tables.values() for op in ops):
                r.issue(
                    sections.get("roles"),
                    f"roles.{role}",
                    "':self' operations need the self section to find a record's owner",
                    "add self: {owner_field: createdBy, list_filter: {query: {createdBy: "
                    '"{user}"}}}',
                )
                break
    if len(r.issues) != before or spec is None:
        return None
    return Permissions(
        roles=build_roles(spec),
        roles_enabled=users_configured or keys_name_roles or "roles" in sections,
        system_tables=system or frozenset(),
        self_records=self_records,
    )


def check_key_roles(r: Reader, keys: list, permissions: Permissions | None) -> None:
    """Every role a key names must exist: a typo would silently grant nothing, or less."""
    if permissions is None:
        return
    known = permissions.roles
    for index, key in enumerate(keys):
        for role in key.roles or ():
            if role not in known:
                r.issue_at(
                    key.line,
                    f"keys[{index}].roles",
                    f"no role named {role!r}",
                    did_you_mean(role, known) or "defined roles: " + ", ".join(sorted(known)),
                    file=key.file,
                )
