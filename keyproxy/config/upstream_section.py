"""The `upstream` section: the backend's URL, timeouts and the credentials injected."""

from __future__ import annotations

import os
import re
import ssl
from urllib.parse import urlsplit

from yaml.nodes import MappingNode, Node, ScalarNode

from keyproxy.config.model import Upstream
from keyproxy.config.server_section import QUERY_NAME, normalize_host
from keyproxy.config.yaml_reader import Reader, kind_of, line_of
from keyproxy.policy.headers import INJECT_REFUSED, INJECT_REFUSED_PREFIXES

_UPSTREAM_FIELDS = frozenset(
    {
        "url",
        "timeout",
        "connect_timeout",
        "max_connections",
        "ca_file",
        "inject",
        "identity_headers",
    }
)
_IDENTITY_FIELDS = frozenset({"key_id", "user", "roles"})
_INJECT_FIELDS = frozenset({"headers", "basic", "query"})
_BASIC_FIELDS = frozenset({"username", "password"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PATH_SEGMENT = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,=:@]|%[0-9A-Fa-f]{2})+")
_FORBIDDEN_PATH_ESCAPES = re.compile(r"%(?:2[Ff]|2[Ee]|5[Cc]|00)")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_REFUSED_HEADERS = INJECT_REFUSED
_REFUSED_HEADER_PREFIXES = INJECT_REFUSED_PREFIXES


def _upstream_url(r: Reader, node: Node, where: str) -> dict[str, object] | None:
    text = r.text(node, where)
    if text is None:
        return None
    problem, hint, parts = _check_url(text)
    if problem:
        r.issue(node, where, problem, hint)
        return None
    return parts


def _check_url(text: str) -> tuple[str, str | None, dict[str, object]]:
    """Validate the upstream URL; (problem, hint, {}) or ("", None, parts)."""
    if any(c <= " " or c == "\x7f" for c in text):
        return "the URL contains spaces or control characters", None, {}
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as error:
        return f"not a valid URL ({error})", "write it like http://127.0.0.1:3000", {}
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        return "the URL must start with http:// or https://", "like http://127.0.0.1:3000", {}
    if "@" in parts.netloc:
        return "the URL must not carry credentials", "use upstream.inject.basic instead", {}
    if parts.query or "?" in text:
        return "the URL must not have a query", "use upstream.inject.query instead", {}
    if parts.fragment or "#" in text:
        return "the URL must not have a fragment (#...)", None, {}
    raw_host = parts.hostname or ""
    host = normalize_host(raw_host) if raw_host else None
    if host is None:
        return (
            "the URL needs a valid host",
            "like http://127.0.0.1:3000 or https://api.internal",
            {},
        )
    if port == 0:
        return "port 0 is not a valid upstream port", None, {}
    port = port or _DEFAULT_PORTS[scheme]
    base_path, problem = _base_path(parts.path)
    if problem:
        return problem, "write a plain path like /api/v1", {}
    shown_host = f"[{host}]" if ":" in host else host
    host_header = shown_host if port == _DEFAULT_PORTS[scheme] else f"{shown_host}:{port}"
    return (
        "",
        None,
        {
            "url": f"{scheme}://{host_header}{base_path}",
            "scheme": scheme,
            "host": host,
            "port": port,
            "base_path": base_path,
            "host_header": host_header,
        },
    )


def _base_path(path: str) -> tuple[str, str]:
    """The path prefix for every forwarded request, refused if it could be read two ways."""
    path = path.rstrip("/")
    if not path:
        return "", ""
    for segment in path.split("/")[1:]:
        if segment in ("", ".", ".."):
            return "", "the URL path must not contain empty, '.' or '..' segments"
        if _PATH_SEGMENT.fullmatch(segment) is None or _FORBIDDEN_PATH_ESCAPES.search(segment):
            return "", "the URL path contains characters or escapes that upstreams read differently"
    return path, ""


def _ca_file(r: Reader, node: Node, where: str, base_dir: str) -> str | None:
    """The CA bundle's absolute path, loaded once here to prove it is usable.

    A missing or broken bundle found only at the first request would turn every
    request into a 502; found here, it is a refused file with its line. A relative
    path is read from the configuration file's directory, so the file means the
    same whatever directory keyproxy was started from.
    """
    text = r.text(node, where)
    if text is None:
        return None
    hint = (
        "give a PEM file (-----BEGIN CERTIFICATE-----) holding the CA certificates "
        "that signed the upstream's certificate"
    )
    if not text:
        r.issue(node, where, "is empty", hint)
        return None
    path = os.path.abspath(os.path.join(base_dir, text))
    if not os.path.isfile(path):
        problem = f"{path} is not a file" if os.path.exists(path) else f"no such file: {path}"
        r.issue(node, where, problem, hint)
        return None
    try:
        # With cafile given, the system store is not loaded: only the bundle is trusted.
        context = ssl.create_default_context(cafile=path)
    except ssl.SSLError as error:  # before OSError, of which it is a subclass
        detail = (error.reason or "malformed PEM").lower().replace("_", " ")
        r.issue(node, where, f"{path} does not load as PEM certificates ({detail})", hint)
        return None
    except OSError as error:
        r.issue(
            node,
            where,
            f"cannot read {path}: {error.strerror or error}",
            "give the path of a readable PEM file (relative paths start at the config file)",
        )
        return None
    if context.cert_store_stats()["x509_ca"] == 0:
        r.issue(
            node,
            where,
            f"{path} holds no CA certificate",
            "a server's own certificate is not a CA: give the CA that signed it",
        )
        return None
    return path


def _header_value(r: Reader, node: Node, where: str) -> str | None:
    """A value for an injected header; the value itself is never echoed (it is a secret)."""
    value = r.text(node, where)
    if value is None:
        return None
    if not value:
        r.issue(node, where, "is empty", "an injected credential must have a value")
    elif _CONTROL.search(value):
        r.issue(
            node,
            where,
            "contains a line break, NUL or another control character",
            "check the environment variable or value for a trailing newline",
        )
    elif not value.isascii():
        r.issue(node, where, "contains non-ASCII characters", "header values must be ASCII")
    elif value != value.strip(" \t"):
        r.issue(
            node,
            where,
            "starts or ends with whitespace, which HTTP would drop",
            "remove the spaces around the value",
        )
    else:
        return value
    return None


def _inject_headers(r: Reader, node: Node, where: str) -> tuple[tuple[str, str], ...] | None:
    if type(node) is not MappingNode:
        r.issue(
            node,
            where,
            f"expected a mapping of header names to values, found {kind_of(node)}",
            "write one 'Header-Name: value' per line below it",
        )
        return None
    before = len(r.issues)
    result: list[tuple[str, str]] = []
    seen: dict[str, Node] = {}
    for key, value_node in node.value:
        name = key.value if type(key) is ScalarNode else ""
        here = f"{where}.{name}"
        lowered = name.lower()
        if _TOKEN.fullmatch(name) is None:
            r.issue(
                key,
                where,
                f"{name!r} is not a valid header name",
                "use letters, digits and - (an HTTP token)",
            )
        elif lowered in seen:
            r.issue(
                key,
                here,
                f"header {name!r} is set twice (first on line {line_of(seen[lowered])})",
                "header names are case-insensitive; keep one",
            )
        elif lowered in _REFUSED_HEADERS or lowered.startswith(_REFUSED_HEADER_PREFIXES):
            r.issue(
                key,
                here,
                f"keyproxy cannot inject {name!r}: it controls framing, routing "
                "or forwarding information that keyproxy sets itself",
                "inject the credential under the header name the upstream reads it from",
            )
        else:
            seen[lowered] = key
            value = _header_value(r, value_node, here)
            if value is not None:
                result.append((name, value))
    return tuple(result) if len(r.issues) == before else None


def _inject_query(r: Reader, node: Node, where: str) -> tuple[tuple[str, str], ...] | None:
    if type(node) is not MappingNode:
        r.issue(
            node,
            where,
            f"expected a mapping of parameter names to values, found {kind_of(node)}",
            "write one 'name: value' per line below it",
        )
        return None
    before = len(r.issues)
    result: list[tuple[str, str]] = []
    seen: dict[str, Node] = {}
    for key, value_node in node.value:
        name = key.value if type(key) is ScalarNode else ""
        here = f"{where}.{name}"
        if QUERY_NAME.fullmatch(name) is None:
            r.issue(
                key,
                where,
                f"{name!r} is not a valid query parameter name",
                "use letters, digits and . _ ~ -",
            )
        elif name in seen:
            r.issue(
                key,
                here,
                f"{name!r} appears twice (first on line {line_of(seen[name])})",
                "keep one",
            )
        else:
            seen[name] = key
            value = r.text(value_node, here)
            if value is not None and not value.strip():
                r.issue(value_node, here, "is empty", "an injected credential must have a value")
            elif value is not None and _CONTROL.search(value):
                r.issue(
                    value_node,
                    here,
                    "contains a line break, NUL or another control character",
                    "write the value on one line, without control characters",
                )
            elif value is not None:
                result.append((name, value))
    return tuple(result) if len(r.issues) == before else None


def _inject_basic(r: Reader, node: Node, where: str) -> tuple[str, str] | None:
    fields = r.fields(node, where, _BASIC_FIELDS)
    if fields is None:
        return None
    before = len(r.issues)
    for name in ("username", "password"):
        if name not in fields:
            r.issue(
                node, where, f"{name!r} is required", "write basic: {username: ..., password: ...}"
            )
    username = r.text(fields["username"], f"{where}.username") if "username" in fields else None
    password = r.text(fields["password"], f"{where}.password") if "password" in fields else None
    if username is not None and (not username or ":" in username or _CONTROL.search(username)):
        r.issue(
            fields["username"],
            f"{where}.username",
            "must be non-empty, without ':' or control characters",
            "write the user name the upstream expects",
        )
    # An empty password is allowed: APIs such as Stripe's take the secret as the
    # username (`sk_live_...:`), and the username is checked non-empty above.
    if password is not None and _CONTROL.search(password):
        r.issue(
            fields["password"],
            f"{where}.password",
            "contains a control character",
            "write the password on one line, without control characters",
        )
    if len(r.issues) != before or username is None or password is None:
        return None
    return username, password


def _inject(r: Reader, node: Node, where: str) -> dict[str, object] | None:
    fields = r.fields(node, where, _INJECT_FIELDS)
    if fields is None:
        return None
    before = len(r.issues)
    result: dict[str, object] = {}
    headers: tuple[tuple[str, str], ...] | None = None
    if "headers" in fields:
        headers = result["inject_headers"] = _inject_headers(
            r, fields["headers"], f"{where}.headers"
        )
    if "basic" in fields:
        result["inject_basic"] = _inject_basic(r, fields["basic"], f"{where}.basic")
    if "query" in fields:
        result["inject_query"] = _inject_query(r, fields["query"], f"{where}.query")
    if result.get("inject_basic") and any(n.lower() == "authorization" for n, _ in headers or ()):
        r.issue(
            fields["basic"],
            f"{where}.basic",
            "inject.basic and an injected Authorization header would both set Authorization",
            "keep one of them",
        )
    return result if len(r.issues) == before else None


def _identity_headers(
    r: Reader, node: Node, where: str, injected: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...] | None:
    """Headers naming the caller for the backend; never one keyproxy injects or controls."""
    fields = r.fields(node, where, _IDENTITY_FIELDS)
    if fields is None:
        return None
    before = len(r.issues)
    taken = {n.lower() for n, _ in injected} | {"x-api-key", "authorization", "cookie"}
    result: list[tuple[str, str]] = []
    for kind in ("key_id", "user", "roles"):
        if kind not in fields:
            continue
        here = f"{where}.{kind}"
        name = r.text(fields[kind], here)
        if name is None:
            continue
        lowered = name.lower()
        if _TOKEN.fullmatch(name) is None or "_" in name:
            r.issue(
                fields[kind], here, f"{name!r} is not a valid header name", "letters, digits, -"
            )
        elif lowered in _REFUSED_HEADERS or lowered.startswith(_REFUSED_HEADER_PREFIXES):
            r.issue(
                fields[kind],
                here,
                f"keyproxy cannot use {name!r}: it sets that header itself",
                "pick another name, like X-Keyproxy-User",
            )
        elif lowered in taken:
            r.issue(
                fields[kind],
                here,
                f"{name!r} is already used for credentials or another identity header",
                "give each identity header its own name",
            )
        else:
            taken.add(lowered)
            result.append((kind, name))
    return tuple(result) if len(r.issues) == before else None


def read_upstream(r: Reader, node: Node | None, root: Node, base_dir: str = "") -> Upstream | None:
    """The `upstream` section; `base_dir` anchors a relative `ca_file` (the file's directory)."""
    if node is None:
        r.issue(
            root,
            "upstream",
            "the upstream section is required",
            "add upstream: {url: http://127.0.0.1:3000}",
        )
        return None
    fields = r.fields(node, "upstream", _UPSTREAM_FIELDS)
    if fields is None:
        return None
    before = len(r.issues)
    values: dict[str, object] = {}
    if "url" not in fields:
        r.issue(
            node, "upstream.url", "the upstream url is required", "like url: http://127.0.0.1:3000"
        )
    else:
        values.update(_upstream_url(r, fields["url"], "upstream.url") or {})
    if "timeout" in fields:
        values["timeout"] = r.duration(fields["timeout"], "upstream.timeout")
    if "connect_timeout" in fields:
        values["connect_timeout"] = r.duration(
            fields["connect_timeout"], "upstream.connect_timeout"
        )
    if "max_connections" in fields:
        values["max_connections"] = r.integer(
            fields["max_connections"], "upstream.max_connections", 1, 100_000
        )
    if "ca_file" in fields:
        if values.get("scheme") == "http":
            r.issue(
                fields["ca_file"],
                "upstream.ca_file",
                "ca_file only applies to an https:// upstream",
                "use an https:// url, or remove ca_file",
            )
        else:
            values["ca_file"] = _ca_file(r, fields["ca_file"], "upstream.ca_file", base_dir)
    if "inject" in fields:
        values.update(_inject(r, fields["inject"], "upstream.inject") or {})
    if "identity_headers" in fields:
        values["identity_headers"] = _identity_headers(
            r,
            fields["identity_headers"],
            "upstream.identity_headers",
            values.get("inject_headers") or (),  # type: ignore[arg-type]  # built by _inject_headers
        )
    if len(r.issues) != before:
        return None
    return Upstream(**values)  # type: ignore[arg-type]  # the reader built each value with the type of its field
