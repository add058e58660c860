"""The sections about what goes back to the client: `cors`, a key's `fields`, `cache`.

Each is compiled at load into what the response chain applies (`keyproxy.response`).
A cache backend the data path cannot use (`sqlite:`) is refused as "not supported yet",
never accepted and ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from yaml.nodes import Node

from keyproxy.config.model import MiB, Route
from keyproxy.config.rate_limits_section import _store
from keyproxy.config.yaml_reader import Reader
from keyproxy.policy.routes import parse_pattern
from keyproxy.response.cors import MAX_ORIGINS, CorsPolicy, CorsSettings, parse_origin_pattern
from keyproxy.response.fields import (
    DocumentPath,
    FieldFilter,
    FilterLimits,
    compile_fields,
    parse_document_path,
)

_CORS_FIELDS = frozenset({"allow_origins", "max_age", "allow_headers", "expose_headers"})
_HEADER_NAME = re.compile(r"[!#$%&'*+.^`|~0-9A-Za-z-]{1,64}")
_HEADER_HINT = "a header name: letters, digits and - (no _ , which keyproxy never forwards)"
MAX_AGE_LIMIT = 86400  # browsers cap it lower anyway (Chromium: 2 hours)


def _header_names(r: Reader, node: Node, where: str) -> tuple[str, ...] | None:
    items = r.texts(node, where, at_most=50)
    if items is None:
        return None
    before = len(r.issues)
    for index, (item, name) in enumerate(items):
        if _HEADER_NAME.fullmatch(name) is None:
            r.issue(item, f"{where}[{index}]", f"{name!r} is not a valid header name", _HEADER_HINT)
    return None if len(r.issues) != before else tuple(name for _, name in items)


def read_cors(r: Reader, node: Node | None, routes: Sequence[Route]) -> CorsPolicy | None:
    """`cors:` compiled into a policy; None when absent (or invalid, with issues recorded)."""
    if node is None:
        return None
    before = len(r.issues)
    fields = r.fields(node, "cors", _CORS_FIELDS)
    if fields is None:
        return None
    if "allow_origins" not in fields:
        r.issue(
            node, "cors", "allow_origins is required", 'allow_origins: ["https://app.example.com"]'
        )
        return None
    origins = []
    items = r.texts(
        fields["allow_origins"],
        "cors.allow_origins",
        non_empty="list the origins of your web apps, or remove the cors section",
        at_most=MAX_ORIGINS,
    )
    for index, (item, text) in enumerate(items or ()):
        try:
            origins.append(parse_origin_pattern(text))
        except ValueError as error:
            r.issue(
                item,
                f"cors.allow_origins[{index}]",
                str(error),
                "write an origin like https://app.example.com or https://*.example.com:8443",
            )
    max_age = 600
    if "max_age" in fields:
        max_age = r.integer(fields["max_age"], "cors.max_age", 0, MAX_AGE_LIMIT) or 0
    allow_headers: tuple[str, ...] = ()
    if "allow_headers" in fields:
        allow_headers = _header_names(r, fields["allow_headers"], "cors.allow_headers") or ()
    expose: tuple[str, ...] = ()
    if "expose_headers" in fields:
        expose = _header_names(r, fields["expose_headers"], "cors.expose_headers") or ()
    if len(r.issues) != before or items is None:
        return None
    settings = CorsSettings(tuple(origins), max_age, allow_headers, expose)
    return CorsPolicy.build(settings, {m for route in routes for m in route.methods})


# --------------------------------------------------------------------------- fields

_FIELDS_FIELDS = frozenset({"include", "exclude"})
MAX_FIELD_PATHS = 200


def read_fields(r: Reader, node: Node, where: str) -> FieldFilter | None:
    """A key's `fields: {include: [...]}` or `{exclude: [...]}`, compiled into a filter."""
    before = len(r.issues)
    fields = r.fields(node, where, _FIELDS_FIELDS)
    if fields is None or len(r.issues) != before:
        return None
    if len(fields) != 1:
        r.issue(
            node,
            where,
            "needs exactly one of include or exclude",
            "include: [id, title] keeps only those; exclude: [email] hides those",
        )
        return None
    ((mode, list_node),) = fields.items()
    items = r.texts(
        list_node,
        f"{where}.{mode}",
        non_empty="list at least one dotted path, or remove fields",
        at_most=MAX_FIELD_PATHS,
    )
    if items is None:
        return None
    try:
        return compile_fields(mode, [text for _, text in items])
    except ValueError as error:
        r.issue(
            list_node,
            f"{where}.{mode}",
            str(error),
            'dotted names, * for any key or array item: "author.phone", "items.*.price"',
        )
        return None


MAX_DOCUMENT_PATHS = 8


def read_fields_at(r: Reader, node: Node, where: str) -> tuple[DocumentPath, ...] | None:
    """A route's `fields_at: ["data[*]"]`: where that endpoint's documents sit in its bodies.

    On the route, not the key: the shape of a body is the endpoint's, which
    fields a caller may see is the key's.
    """
    items = r.texts(
        node,
        where,
        non_empty="name at least one document path, or remove fields_at",
        at_most=MAX_DOCUMENT_PATHS,
    )
    if items is None:
        return None
    paths = []
    before = len(r.issues)
    for index, (item, text) in enumerate(items):
        try:
            paths.append(parse_document_path(text))
        except ValueError as error:
            r.issue(
                item,
                f"{where}[{index}]",
                str(error),
                "write where the records sit, like data[*] or hits.hits[*]._source",
            )
    return None if len(r.issues) != before else tuple(paths)


def read_filter_limits(
    r: Reader, max_body: Node | None, max_depth: Node | None
) -> FilterLimits | None:
    """The filter's caps: `filter_max_body` (decoded; default 8MiB) and `filter_max_depth`
    (default 254). Proposed as `server` fields; the caller passes their nodes."""
    values: dict[str, int | None] = {}
    before = len(r.issues)
    if max_body is not None:
        values["max_bytes"] = r.size(max_body, "server.filter_max_body", 1024, 512 * MiB)
    if max_depth is not None:
        values["max_depth"] = r.integer(max_depth, "server.filter_max_depth", 2, 254)
    return None if len(r.issues) != before else FilterLimits(**values)  # type: ignore[arg-type]  # the reader built each value with the type of its field


# --------------------------------------------------------------------------- cache

_CACHE_FIELDS = frozenset(
    {"backend", "ttl", "routes", "max_entries", "max_bytes", "max_entry_bytes"}
)


@dataclass(frozen=True, slots=True)
class CacheSettings:
    backend: str  # "memory", "sqlite:///path" or a redis:// URL
    ttl: float
    routes: tuple[Route, ...]  # the configured routes whose GET answers may be cached
    max_entries: int = 10_000
    max_bytes: int = 64 * MiB
    max_entry_bytes: int = 1 * MiB


def _backend(r: Reader, node: Node) -> str | None:
    value = r.text(node, "cache.backend")
    if value is None:
        return None
    if value == "memory":
        return value
    if value.startswith("sqlite:"):
        r.issue(
            node,
            "cache.backend",
            "the sqlite backend is not supported yet",
            "use memory (one process) or redis://host:6379/0 (shared by every worker)",
        )
        return None
    if value.startswith(("redis://", "rediss://")):
        return _store(r, node, "cache.backend")
    r.issue(node, "cache.backend", "expected memory or a redis:// URL", "write memory")
    return None


def _segment_covers(wanted: str, segment: str) -> bool:
    """Whether a cache pattern's segment stands for every path segment a route's does."""
    if wanted == "*" or (wanted.startswith("{") and wanted.endswith("}")):
        return segment != "**"
    return wanted == segment


def _covered_routes(text: str, routes: Sequence[Route]) -> list[Route]:
    """The GET routes whose every path `text` (a route pattern, `GET /v1/data/**`) matches.

    A pattern stands for the configured routes it covers, so a cache listing can name
    a whole subtree once; it never reaches a path no route matches, since only the
    routes themselves are cached. Not a pattern, or covering none: empty.
    """
    try:
        methods, wanted = parse_pattern(text)
    except ValueError:
        return []
    if "GET" not in methods:
        return []
    rest = len(wanted) - 1 if wanted and wanted[-1] == "**" else None
    covered = []
    for route in routes:
        if "GET" not in route.methods:
            continue
        segments = route.segments
        if rest is None:
            fits = len(segments) == len(wanted) and all(map(_segment_covers, wanted, segments))
        else:
            fits = len(segments) >= rest and all(
                map(_segment_covers, wanted[:rest], segments[:rest])
            )
        if fits:
            covered.append(route)
    return covered


def read_cache(r: Reader, node: Node | None, routes: Sequence[Route]) -> CacheSettings | None:
    """`cache:`; each of its `routes` is one of the configured routes, written exactly as
    under `routes`, or a pattern (`GET /v1/data/**`) standing for the GET routes it covers."""
    if node is None:
        return None
    before = len(r.issues)
    fields = r.fields(node, "cache", _CACHE_FIELDS)
    if fields is None:
        return None
    for required in ("backend", "ttl", "routes"):
        if required not in fields:
            r.issue(
                node, "cache", f"{required} is required", "backend: memory, ttl: 10s, routes: [...]"
            )
    if len(r.issues) != before:
        return None
    backend = _backend(r, fields["backend"])
    ttl = r.duration(fields["ttl"], "cache.ttl", maximum=86400.0)
    by_match = {route.match: route for route in routes}
    chosen: list[Route] = []
    items = r.texts(fields["routes"], "cache.routes", non_empty="list the routes to cache")
    for index, (item, text) in enumerate(items or ()):
        route = by_match.get(text)
        if route is None:
            covered = _covered_routes(text, routes)
            if not covered:
                r.issue(
                    item,
                    f"cache.routes[{index}]",
                    f"{text!r} is not one of the routes, nor a pattern covering a GET route",
                    "copy a route's match: exactly as written under routes, or write a"
                    " pattern such as 'GET /v1/data/**' that covers some of them",
                )
            chosen.extend(c for c in covered if c not in chosen)
        elif "GET" not in route.methods:
            r.issue(
                item,
                f"cache.routes[{index}]",
                f"{text!r} never answers a GET",
                "only GET answers are cached: list a route whose methods include GET",
            )
        elif route not in chosen:
            chosen.append(route)
    values: dict[str, object] = {}
    if "max_entries" in fields:
        values["max_entries"] = r.integer(fields["max_entries"], "cache.max_entries", 1, 10_000_000)
    if "max_bytes" in fields:
        values["max_bytes"] = r.size(fields["max_bytes"], "cache.max_bytes", 1024, 64 * 1024 * MiB)
    if "max_entry_bytes" in fields:
        values["max_entry_bytes"] = r.size(
            fields["max_entry_bytes"], "cache.max_entry_bytes", 1, 512 * MiB
        )
    if len(r.issues) != before:
        return None
    assert backend is not None and ttl is not None
    settings = CacheSettings(backend, ttl, tuple(chosen), **values)  # type: ignore[arg-type]  # the reader built each value with the type of its field
    if settings.max_entry_bytes > settings.max_bytes:
        r.issue(
            node,
            "cache.max_entry_bytes",
            "is larger than max_bytes",
            "lower max_entry_bytes, or raise max_bytes above it",
        )
        return None
    return settings
