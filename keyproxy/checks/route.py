"""Step 3: which route, on the one canonical form of the path (docs/decision.md)."""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

from keyproxy.config.model import READ_METHODS, ROUTE_METHODS, Access, Route
from keyproxy.policy.headers import METHOD_OVERRIDE_HEADERS, URL_OVERRIDE_HEADERS
from keyproxy.policy.paths import InvalidPath, canonicalize, decoded_name, param_readings
from keyproxy.policy.routes import AmbiguousMatch
from keyproxy.request import Deny, RequestContext

#: Headers and query parameters that ask the upstream to treat the request as
#: another method or URL than the one authorised here.
METHOD_OVERRIDE_PARAMS = frozenset({"_method"})
OVERRIDE_HEADERS = frozenset(METHOD_OVERRIDE_HEADERS + URL_OVERRIDE_HEADERS)

PARAM_SEPARATORS = re.compile(r"[&;]")


def _query_names(query: str) -> list[tuple[str, frozenset[str]]]:
    """(decoded name, its readings) for each parameter of the query."""
    out = []
    for pair in PARAM_SEPARATORS.split(query):
        raw = pair.partition("=")[0]
        if raw:
            out.append((decoded_name(raw), param_readings(raw)))
    return out


def _too_long(text: str) -> str:
    return text if len(text) <= 60 else text[:60] + "..."


class _Override:
    """What a request asks the upstream to do instead of its wire method."""

    __slots__ = ("methods", "refused")

    def __init__(self) -> None:
        self.methods: list[tuple[str, str]] = []  # (where it was asked, the value)
        self.refused: str | None = None  # a spelling no route may allow


def _override_asked(ctx: RequestContext, query: str) -> _Override | None:
    """Every method or URL override in the request; None when there is none (the usual case)."""
    found: _Override | None = None
    for name, value in ctx.headers:
        if name in OVERRIDE_HEADERS:
            if found is None:
                found = _Override()
            if name in URL_OVERRIDE_HEADERS:
                found.refused = found.refused or name
            else:
                found.methods.append((name, value))
    # The common case has no spelling of it at all (an escaped letter needs a '%').
    if query and ("method" in query.lower() or "%" in query):
        for pair in PARAM_SEPARATORS.split(query):
            raw, _, value = pair.partition("=")
            if not raw or not (param_readings(raw) & METHOD_OVERRIDE_PARAMS):
                continue
            if found is None:
                found = _Override()
            if unquote_plus(raw) == "_method":
                found.methods.append(("_method", unquote_plus(value)))
            else:
                # Frameworks disagree on bracketed, dotted or re-encoded spellings
                # (an array, a nested key, another name): only the plain one is decidable.
                found.refused = found.refused or "_method"
    return found


def _not_allowed(what: str) -> Deny:
    return Deny(
        400,
        "METHOD_OVERRIDE_NOT_ALLOWED",
        f"{what} is not allowed: send the real method and path",
    )


def effective_method(ctx: RequestContext, asked: _Override) -> str | Deny:
    """The one method the upstream will act on, on a route that allows overrides."""
    if asked.refused is not None:
        if asked.refused == "_method":
            return _not_allowed("a bracketed, dotted or encoded _method parameter")
        return _not_allowed(asked.refused)
    values = {value.strip().upper() for _, value in asked.methods}
    if len(values) != 1:
        return _not_allowed("more than one method override (they differ)")
    (method,) = values
    if method not in ROUTE_METHODS:
        return _not_allowed(f"the override method {_too_long(method)!r}")
    return method


def check_query(ctx: RequestContext, route: Route, query: str) -> Deny | None:
    """The route's `query: {allow|deny}` list, on every reading of every name."""
    rule = route.query
    assert rule is not None
    server = ctx.config.server
    key_param = server.query_param if "query" in server.credential_sources else None
    for name, readings in _query_names(query):
        if name == key_param or (route.allow_method_override and name == "_method"):
            continue  # the key is stripped before forwarding; the override was decided on
        # Allowed: every reading is listed. Denied: any reading is.
        if (not readings <= rule.allow) if rule.allow is not None else readings & rule.deny:
            return Deny(
                403,
                "QUERY_NOT_ALLOWED",
                f"query parameter {_too_long(name)!r} is not allowed on {route.match}",
            )
    return None


#: Body types whose fields Rack::MethodOverride, Laravel/Symfony and Spring's
#: HiddenHttpMethodFilter read `_method` from (Rack parses every multipart type).
FORM_MEDIA_TYPES = ("application/x-www-form-urlencoded", "multipart/")

FORM_ON_READ_ROUTE = Deny(
    400,
    "METHOD_OVERRIDE_NOT_ALLOWED",
    "form bodies are not accepted on this read-only route: the upstream could read a"
    " _method field in them as another method; send JSON",
)


def _form_body(ctx: RequestContext) -> bool:
    """Whether the request declares a form body (any copy of Content-Type counts)."""
    for name, value in ctx.headers:
        if name == "content-type":
            media = value.partition(";")[0].strip(" \t").lower()
            if media.startswith(FORM_MEDIA_TYPES):
                return True
    return False


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
    ctx.effective_method = ctx.method
    asked = _override_asked(ctx, target.query)
    if asked is not None:
        if not found.allow_method_override:
            what = asked.refused or (asked.methods[0][0] if asked.methods else "_method")
            return _not_allowed(what)
        method = effective_method(ctx, asked)
        if method.__class__ is Deny:
            return method
        assert isinstance(method, str)
        if method != ctx.method:
            # The upstream acts on `method`: it must be this same route that allows it, so
            # the route, the key type and the ACL hold for the wire and the effective method.
            other = ctx.config.route_table.resolve(method, target.segments)
            if other is None:
                shown = target.path if len(target.path) <= 120 else target.path[:120] + "..."
                return Deny(
                    403,
                    "ROUTE_NOT_ALLOWED",
                    f"no route allows {method} {shown} (asked for by a method override)",
                )
            if other is not found:
                return Deny(
                    400,
                    "METHOD_OVERRIDE_NOT_ALLOWED",
                    f"the override to {method} is not allowed by {found.match}:"
                    f" send {method} itself",
                )
            ctx.effective_method = method
    elif found.access is Access.READ and ctx.method not in READ_METHODS and _form_body(ctx):
        # A `POST` that only reads, carrying a form: a body `_method=DELETE` would make
        # it a write the read key was never allowed. The body itself is streamed, never
        # read here; its declared type is enough to refuse.
        return FORM_ON_READ_ROUTE
    if found.query is not None and target.query:
        return check_query(ctx, found, target.query)
    return None
