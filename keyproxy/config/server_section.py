"""The `server` section: listen addresses, credential sources and HTTP limits."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from yaml.nodes import Node, ScalarNode, SequenceNode

from keyproxy.config.model import CREDENTIAL_SOURCES, HostPort, ServerSettings
from keyproxy.config.yaml_reader import Reader, did_you_mean, show
from keyproxy.policy.allowlists import IpAllowlist

_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
_PORT = re.compile(r"[0-9]{1,5}")
_LISTEN_HINT = "write host:port, like 0.0.0.0:8080, 127.0.0.1:9901 or [::]:8080"
_WILDCARDS = frozenset({"0.0.0.0", "::"})


def normalize_host(host: str) -> str | None:
    """An IP address in canonical form, or a lower-cased DNS name; None if neither."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _HOSTNAME.fullmatch(host) is None or host.rstrip(".").rsplit(".", 1)[-1].isdigit():
        return None
    return host.lower()


def _parse_host_port(text: str) -> tuple[HostPort | None, str]:
    """`host:port` or `[v6]:port`; (None, problem) when invalid."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            return None, "expected [address]:port"
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            return None, f"{host!r} is not an IPv6 address"
    else:
        host, sep, port = text.rpartition(":")
        if sep and not host:
            host = "0.0.0.0"  # `:8080`, as Go and Caddy write it: every IPv4 interface
        if not sep:
            return None, "expected host:port"
        if ":" in host:
            return None, "IPv6 addresses must be written in brackets, like [::1]:8080"
        normalized = normalize_host(host)
        if normalized is None:
            return None, f"{host!r} is not an IP address or host name"
        host = normalized
    if _PORT.fullmatch(port) is None or int(port) > 65535:
        return None, f"{port!r} is not a port number (0 to 65535)"
    return HostPort(host, int(port)), ""


def _shares_port(a: HostPort, b: HostPort) -> bool:
    """Whether two listeners would accept on the same socket address (port 0 never does)."""
    if a.port != b.port or a.port == 0:
        return False
    return (
        a.host == b.host
        or a.host in _WILDCARDS
        or b.host in _WILDCARDS
        or not (_is_ip(a.host) and _is_ip(b.host))
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_SERVER_FIELDS = frozenset(
    {
        "listen",
        "admin_listen",
        "trusted_proxies",
        "max_body",
        "credential_sources",
        "query_param",
        "max_header_size",
        "header_timeout",
        "keepalive_timeout",
        "drain_timeout",
        "body_timeout",
        "max_connections",
        "max_connections_per_ip",
        "filter_max_body",
        "filter_max_depth",
    }
)
QUERY_NAME = re.compile(r"[A-Za-z0-9._~\[\]-]{1,64}")


def _listen(r: Reader, node: Node, where: str) -> HostPort | None:
    if type(node) is SequenceNode:  # `[::]:8080` unquoted starts a YAML list
        hint = f'{_LISTEN_HINT}; quote forms that start with "["'
        r.issue(node, where, "expected host:port, found a list", hint)
        return None
    text = r.text(node, where)
    if text is None:
        return None
    value, problem = _parse_host_port(text)
    if value is None:
        r.issue(node, where, f"{show(node)} is not a listen address: {problem}", _LISTEN_HINT)
    return value


_TRUSTED_HINT = (
    "list the addresses or CIDRs of your own proxies, like [10.0.0.0/8, 192.0.2.10] "
    "(nginx's set_real_ip_from); a hop count would let a client that connects directly "
    "write its own X-Forwarded-For; 0 or no field: the socket peer is the client"
)
#: More proxy networks than any deployment lists; bounds the per-request walk.
MAX_TRUSTED_PROXIES = 64


def _trusted_proxies(r: Reader, node: Node, where: str) -> IpAllowlist | bool | None:
    """The proxies whose forwarding headers are believed: None for none, False on error."""
    if type(node) is ScalarNode and not node.style and node.value == "0":
        return None
    if type(node) is not SequenceNode:
        if type(node) is not ScalarNode:
            message = "expected 0 or a list of proxy addresses, found a mapping"
        elif node.value.isdigit():
            message = f"a hop count ({node.value}) is not accepted"
        else:
            message = f"expected 0 or a list of proxy addresses, found {show(node)}"
        r.issue(node, where, message, _TRUSTED_HINT)
        return False
    items = r.texts(
        node, where, non_empty="list at least one proxy, or write 0", at_most=MAX_TRUSTED_PROXIES
    )
    if items is None:
        return False
    ok = True
    for index, (item, value) in enumerate(items):
        try:
            IpAllowlist.parse([value])
        except ValueError as exc:
            message = str(exc).replace("ips entry ", "", 1)
            r.issue(
                item,
                f"{where}[{index}]",
                message,
                "write a proxy's address or CIDR block, like 10.0.0.0/8 or 192.0.2.10",
            )
            ok = False
    return IpAllowlist.parse([value for _, value in items]) if ok else False


def _credential_sources(r: Reader, node: Node, where: str) -> frozenset[str] | None:
    items = r.texts(node, where, non_empty="list at least one of: header, basic, query")
    if items is None:
        return None
    before = len(r.issues)
    for index, (item, value) in enumerate(items):
        if value not in CREDENTIAL_SOURCES:
            r.issue(
                item,
                f"{where}[{index}]",
                f"unknown credential source {show(item)}",
                did_you_mean(value, CREDENTIAL_SOURCES) or "use header, basic or query",
            )
    return frozenset(value for _, value in items) if len(r.issues) == before else None


def read_server(r: Reader, node: Node | None) -> ServerSettings | None:
    if node is None:
        return ServerSettings()
    fields = r.fields(node, "server", _SERVER_FIELDS)
    if fields is None:
        return None
    before = len(r.issues)
    values: dict[str, object] = {}
    readers: dict[str, Callable[[Node, str], object]] = {
        "listen": lambda n, w: _listen(r, n, w),
        "admin_listen": lambda n, w: _listen(r, n, w),
        "trusted_proxies": lambda n, w: _trusted_proxies(r, n, w),
        "max_body": lambda n, w: r.size(n, w, 1),
        "credential_sources": lambda n, w: _credential_sources(r, n, w),
        "query_param": lambda n, w: r.string(
            n,
            w,
            QUERY_NAME,
            "query parameter name",
            "use letters, digits and . _ ~ - (at most 64)",
        ),
        "max_header_size": lambda n, w: r.size(n, w, 1024, 1024 * 1024),
        "header_timeout": lambda n, w: r.duration(n, w),
        "keepalive_timeout": lambda n, w: r.duration(n, w, allow_zero=True),
        "drain_timeout": lambda n, w: r.duration(n, w, allow_zero=True),
        "body_timeout": lambda n, w: r.duration(n, w),
        "max_connections": lambda n, w: r.integer(n, w, 1, 10_000_000),
        "max_connections_per_ip": lambda n, w: r.integer(n, w, 1, 10_000_000),
        "filter_max_body": lambda n, w: r.size(n, w, 1024, 512 * 1024 * 1024),
        "filter_max_depth": lambda n, w: r.integer(n, w, 2, 254),
    }
    for name, value_node in fields.items():
        values[name] = readers[name](value_node, f"server.{name}")
    if len(r.issues) != before or values.get("trusted_proxies") is False:
        return None
    settings = ServerSettings(**values)  # type: ignore[arg-type]  # the reader built each value with the type of its field
    if _shares_port(settings.listen, settings.admin_listen):
        culprit = fields.get("admin_listen") or fields.get("listen")
        r.issue(
            culprit,
            "server.admin_listen" if "admin_listen" in fields else "server.listen",
            f"the admin listener ({settings.admin_listen}) shares port {settings.listen.port} "
            f"with the public listener ({settings.listen})",
            "give admin_listen its own port: /metrics must never be on the public port",
        )
        return None
    return settings
