"""Route patterns and the compiled route table.

A pattern is `METHODS /path`: `GET /v1/data/{table}`, `GET|PUT /{index}/_settings`,
`GET /_stream/**`, `* /health`. Path segments are literals in canonical form
(see `keyproxy.policy.paths`), `{name}` (one non-empty segment, captured), `*` (one
non-empty segment) or `**` (all remaining segments, possibly none; last only).

The table answers "which route comes first in the file for this method and
these canonical segments". It also reads the path the way a lenient upstream
would (letter case folded, percent-escapes decoded, a trailing slash dropped):
if that reading reaches a different, earlier route, the request is ambiguous
and refused, because the upstream may serve what that earlier route guards
while keyproxy authorised the later one (`/v1/data/AUDIT_LOG` against
`GET /v1/data/audit_log` before `GET /v1/data/{table}`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from keyproxy.config.model import ROUTE_METHODS, Route
from keyproxy.policy.paths import MAX_SEGMENTS, MAX_TARGET_LENGTH, InvalidPath, canonicalize


@dataclass(frozen=True, slots=True)
class AmbiguousMatch:
    """The path matches `route` as written but `other` when read leniently.

    `message` is safe for a client's error body (it names no route); the two
    routes are there for `keyproxy explain` and logs.
    """

    message: str
    route: Route | None = None
    other: Route | None = None


_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_EXAMPLE = "e.g. 'GET /v1/data/{table}' or 'GET|PUT /{index}/_settings'"


def parse_pattern(text: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """`"GET|PUT /{index}/_settings"` -> (methods, segments); ValueError(message) if invalid.

    GET always brings HEAD along: a HEAD is a GET without the body, so it can
    reveal nothing a GET could not, and clients and monitors send it unasked.
    """
    if not isinstance(text, str):
        raise ValueError(f"a route pattern is a string, {_EXAMPLE}")
    parts = text.split()
    if len(parts) != 2:
        raise ValueError(f"a route pattern is 'METHODS /path', {_EXAMPLE}")
    method_text, path_text = parts
    return _parse_methods(method_text), _parse_path(path_text)


def _parse_methods(text: str) -> frozenset[str]:
    if text == "*":
        return frozenset(ROUTE_METHODS)
    methods: set[str] = set()
    for name in text.split("|"):
        if not name:
            raise ValueError(f"empty method in '{text}': separate methods with one '|'")
        if name == "*":
            raise ValueError("'*' (every method) must stand alone, not in a list")
        if name not in ROUTE_METHODS:
            if name.upper() in ROUTE_METHODS:
                raise ValueError(f"write methods in upper case: '{name.upper()}'")
            raise ValueError(
                f"unknown method '{name}'; use {', '.join(ROUTE_METHODS)} or '*' for all"
            )
        if name in methods:
            raise ValueError(f"method '{name}' is listed twice")
        methods.add(name)
    if "GET" in methods:
        methods.add("HEAD")
    return frozenset(methods)


def _parse_path(text: str) -> tuple[str, ...]:
    if not text.startswith("/"):
        raise ValueError(f"the path must start with '/', {_EXAMPLE}")
    if len(text) > MAX_TARGET_LENGTH:
        raise ValueError(f"the path is longer than {MAX_TARGET_LENGTH} characters")
    if "?" in text:
        raise ValueError("a pattern matches the path only: remove '?' and the query")
    if text == "/":
        return ()
    raw = text[1:].split("/")
    if len(raw) > MAX_SEGMENTS:
        raise ValueError(f"the path has more than {MAX_SEGMENTS} segments")
    names: set[str] = set()
    last = len(raw) - 1
    for i, segment in enumerate(raw):
        if segment == "**":
            if i != last:
                raise ValueError("'**' must be the last segment")
        elif segment == "*":
            pass
        elif segment.startswith("{") and segment.endswith("}"):
            m = _PARAM.fullmatch(segment)
            if m is None:
                raise ValueError(
                    f"'{segment}': a parameter is a name of letters, digits and '_', e.g. {{table}}"
                )
            if m.group(1) in names:
                raise ValueError(f"parameter '{segment}' appears twice")
            names.add(m.group(1))
        elif "{" in segment or "}" in segment:
            raise ValueError(
                f"'{segment}': text and a parameter in one segment is not supported;"
                " a parameter must be a whole segment, like /{table}"
            )
        elif "*" in segment:
            raise ValueError(
                f"'{segment}': '*' inside a segment is not supported; use '*' alone for any"
                " one segment, or '**' as the last segment for the rest of the path"
            )
        elif not segment:
            if i != last:
                raise ValueError("the path contains an empty segment ('//')")
        else:
            _check_literal(segment)
    return tuple(raw)


def _check_literal(segment: str) -> None:
    """A literal must be spelled exactly as `canonicalize` spells requests, or it never matches."""
    target = canonicalize("/" + segment)
    if isinstance(target, InvalidPath):
        raise ValueError(f"'{segment}': {target.message}")
    if target.segments != (segment,):
        raise ValueError(
            f"'{segment}' is not in canonical form; write it as '{'/'.join(target.segments)}'"
        )


# --- the table ---------------------------------------------------------------------------

_NONE = 1 << 62  # "no route": larger than any route position


class _Wild:
    """A pattern token that is not literal text (a literal may fold to '*' or '{x}')."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_ONE = _Wild("one segment")  # `{name}` and `*`
_REST = _Wild("the rest")  # `**`

_Token = str | _Wild


def _tokens(segments: Sequence[str]) -> tuple[_Token, ...]:
    return tuple(
        _REST if s == "**" else _ONE if s == "*" or s.startswith("{") else s for s in segments
    )


class _Node:
    """One trie node; `low` is the first route anywhere below, so searches can stop early."""

    __slots__ = ("end", "lit", "low", "one", "rest")

    def __init__(self) -> None:
        self.lit: dict[str, _Node] = {}  # literal segment -> child
        self.one: _Node | None = None  # `{name}` and `*`: any one non-empty segment
        self.end = _NONE  # first route whose pattern ends here
        self.rest = _NONE  # first route whose `**` starts here
        self.low = _NONE


def _insert(root: _Node, tokens: Sequence[_Token], position: int) -> None:
    node = root
    for token in tokens:
        node.low = min(node.low, position)
        if token is _REST:
            node.rest = min(node.rest, position)
            return
        if token is _ONE:
            if node.one is None:
                node.one = _Node()
            node = node.one
        else:
            assert isinstance(token, str)
            child = node.lit.get(token)
            if child is None:
                child = node.lit[token] = _Node()
            node = child
    node.low = min(node.low, position)
    node.end = min(node.end, position)


def _first(node: _Node, segments: Sequence[str | None], i: int, n: int, best: int) -> int:
    """The first route matching `segments[i:]` below `node`, if it comes before `best`.

    A None segment is one that no literal spells (see `RouteTable.resolve`).

    Every trie node sits at a fixed depth and is entered only with the
    segment of that depth, so one search enters each node at most once.
    """
    if node.rest < best:
        best = node.rest
    if i == n:
        return node.end if node.end < best else best
    segment = segments[i]
    lit = node.lit.get(segment)  # type: ignore[arg-type]  # a None segment finds nothing
    one = node.one if segment != "" else None
    if lit is not None and one is not None and one.low < lit.low:
        lit, one = one, lit
    if lit is not None and lit.low < best:
        best = _first(lit, segments, i + 1, n, best)
    if one is not None and one.low < best:
        best = _first(one, segments, i + 1, n, best)
    return best


def fold_segment(segment: str) -> str:
    """A canonical segment as a lenient upstream may compare it: decoded, NFKC, case-folded.

    Route params are canonical segments, spelled as the client chose
    (`AUDIT_LOG`, `audit%3Alog`); anything that compares a param with a name
    from the config (system tables, per-table roles) should compare the
    folded forms on both sides, or a spelling variant slips past the rule.
    """
    if "%" in segment:
        segment = unicodedata.normalize("NFKC", unquote(segment, errors="surrogateescape"))
    elif segment.isascii():
        return segment.lower()
    return segment.casefold()


def _fold_tokens(tokens: Sequence[_Token]) -> tuple[_Token, ...]:
    folded = tuple(fold_segment(t) if isinstance(t, str) else t for t in tokens)
    return folded[:-1] if folded and folded[-1] == "" else folded


def _fold_path(segments: Sequence[str]) -> tuple[str, ...]:
    folded = tuple(map(fold_segment, segments))
    return folded[:-1] if folded and folded[-1] == "" else folded


# Any character a lenient reading could change: upper case, escapes, anything non-canonical.
_NOT_PLAIN = re.compile(r"[^a-z0-9\-._~!$&'()*+,=:@/]")


#: Most remembered path shapes (see `RouteTable.resolve`); the cache is emptied when full.
#: Read at every miss, so 0 turns the cache off.
SHAPE_CACHE_SIZE = 10_000

_AMBIGUOUS = (
    "path is ambiguous: read with different letter case, decoded escapes or without the"
    " trailing slash it matches another route; use the exact spelling"
)


class RouteTable:
    """Routes compiled into one segment trie per method, one exact and one lenient.

    Route order is the order of `routes`, which the loader keeps as in the file.
    """

    __slots__ = ("_exact", "_literals", "_loose", "_loose_literals", "_plain", "_routes", "_shapes")

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(routes)
        self._exact: dict[str, _Node] = {}
        self._loose: dict[str, _Node] = {}
        # Each literal some route spells, mapped to itself; "" (a trailing slash) too,
        # since `{name}` must never match it.
        self._literals: dict[str, str] = {"": ""}
        self._loose_literals: dict[str, str] = {"": ""}
        # While every literal reads the same leniently, only a path that does not can be
        # ambiguous; one upper-case literal (`/Admin`) makes a plain `/admin` ambiguous too.
        self._plain = True
        for position, route in enumerate(self._routes):
            segments = route.segments
            if "**" in segments[:-1]:
                raise ValueError(f"route '{route.match}': '**' must be the last segment")
            if len(segments) > MAX_SEGMENTS:
                raise ValueError(f"route '{route.match}': more than {MAX_SEGMENTS} segments")
            tokens = _tokens(segments)
            folded = _fold_tokens(tokens)
            if folded != tokens:
                self._plain = False
            self._literals.update((t, t) for t in tokens if isinstance(t, str))
            self._loose_literals.update((t, t) for t in folded if isinstance(t, str))
            methods = set(route.methods)
            if "GET" in methods:
                methods.add("HEAD")
            for method in methods.intersection(ROUTE_METHODS):
                _insert(self._exact.setdefault(method, _Node()), tokens, position)
                _insert(self._loose.setdefault(method, _Node()), folded, position)
        # Answers by path shape: (method, exact shape, lenient shape or None) -> the
        # route, None or an AmbiguousMatch. Unlike a cache of whole paths (Kong's router
        # keeps an LRU of those) it serves `/posts/43` after `/posts/42` too: ids never
        # reach the key. Bounded; emptied when full.
        self._shapes: dict[
            tuple[str, tuple[str | None, ...], tuple[str | None, ...] | None, bool],
            Route | AmbiguousMatch | None,
        ] = {}

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    def resolve(self, method: str, segments: tuple[str, ...]) -> Route | AmbiguousMatch | None:
        """The first route for `method` and the canonical `segments`; None if none matches.

        Which route matches depends only on the path's shape: each segment either
        is a literal that some route spells, or it is not and can then only meet
        `{name}`, `*` or `**`. Such segments become None, and the trie is searched
        once per shape.
        """
        shape = tuple(map(self._literals.get, segments))
        loose = None
        variant = False  # the lenient reading differs in more than a trailing slash
        if not self._plain or (
            segments and (segments[-1] == "" or _NOT_PLAIN.search("/".join(segments)))
        ):
            folded = _fold_path(segments)
            loose = tuple(map(self._loose_literals.get, folded))
            variant = folded != (segments[:-1] if segments and segments[-1] == "" else segments)
        slot = (method, shape, loose, variant)
        shapes = self._shapes
        try:
            return shapes[slot]
        except KeyError:
            pass
        found = self._search(method, shape, loose, variant)
        if len(shapes) >= SHAPE_CACHE_SIZE:
            shapes.clear()
        if SHAPE_CACHE_SIZE:  # 0 turns the cache off (bench/decision.py's worst case)
            shapes[slot] = found
        return found

    def _search(
        self,
        method: str,
        shape: tuple[str | None, ...],
        loose: tuple[str | None, ...] | None,
        variant: bool,
    ) -> Route | AmbiguousMatch | None:
        root = self._exact.get(method)
        if root is None:
            return None
        found = _first(root, shape, 0, len(shape), _NONE)
        if found == _NONE:
            if loose is None or not variant:
                return None
            # No route as written, but one in another letter case or spelling: the upstream
            # may well serve that route's resource here.
            other = _first(self._loose[method], loose, 0, len(loose), _NONE)
            return None if other == _NONE else AmbiguousMatch(_AMBIGUOUS, None, self._routes[other])
        if loose is not None:
            other = _first(self._loose[method], loose, 0, len(loose), _NONE)
            if other != found:
                return AmbiguousMatch(
                    _AMBIGUOUS, self._routes[found], self._routes[other] if other != _NONE else None
                )
        return self._routes[found]
