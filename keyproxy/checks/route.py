"""Step 3: which route, on the one canonical form of the path (SPEC §3.3)."""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

from keyproxy.paths import InvalidPath, canonicalize
from keyproxy.request import Deny, RequestContext
from keyproxy.routes import AmbiguousMatch

#: Headers and query parameters that ask the upstream to treat the request as
#: another method or URL than the one authorised here.
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-method-override", "x-http-method")
URL_OVERRIDE_HEADERS = ("x-original-url", "x-rewrite-url")
METHOD_OVERRIDE_PARAMS = frozenset({"_method"})
OVERRIDE_HEADERS = frozenset(METHOD_OVERRIDE_HEADERS + URL_OVERRIDE_HEADERS)

_PARAM_SEPARATORS = re.compile(r"[&;]")


def _param_name(raw: str) -> str:
    """A query parameter's name as the most lenient framework reads it.

    Form decoding (`+` is a space), then PHP's rules: leading spaces dropped, spaces
    and dots inside read as `_`, a `[...]` suffix making an array of the same name.
    """
    name = unquote_plus(raw).lstrip(" ").lower()
    return name.partition("[")[0].replace(" ", "_").replace(".", "_")


def _asks_for_override(ctx: RequestContext, query: str) -> str | None:
    for name, _ in ctx.headers:
        if name in OVERRIDE_HEADERS:
            return name
    # The common case has no spelling of it at all (an escaped letter needs a '%').
    if query and ("method" in query.lower() or "%" in query):
        for pair in _PARAM_SEPARATORS.split(query):
            if _param_name(pair.partition("=")[0]) in METHOD_OVERRIDE_PARAMS:
                return "_method"
    return None


def match_route(ctx: RequestContext) -> Deny | None:
    target = canonicalize(ctx.raw_target)
    if isinstance(target, InvalidPath):
        return Deny(400, "INVALID_PATH", target.message)
    ctx.target = target
    found = ctx.config.route_table.resolve(ctx.method, target.segments)
    if found is None:
        shown = target.path if len(target.path) <= 120 else target.path[:120] + "..."
        return Deny(403, "ROUTE_NOT_ALLOWED", f"no route allows {ctx.method} {shown}")
    if isinstance(found, AmbiguousMatch):
        return Deny(400, "AMBIGUOUS_PATH", found.message)
    ctx.route = found
    override = _asks_for_override(ctx, target.query)
    if override is not None and not (
        found.allow_method_override and override not in URL_OVERRIDE_HEADERS
    ):
        return Deny(
            400,
            "METHOD_OVERRIDE_NOT_ALLOWED",
            f"{override} is not allowed: send the real method and path",
        )
    return None
