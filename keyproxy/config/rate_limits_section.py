"""The `rate_limits` section: where the limiters keep their counters."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from yaml.nodes import Node

from keyproxy.config.model import RateLimitSettings
from keyproxy.config.yaml_reader import Reader

_RATE_LIMIT_FIELDS = frozenset(
    {"store", "on_store_error", "timeout", "max_buckets", "ipv4_prefix", "ipv6_prefix"}
)
_REDIS_DB = re.compile(r"/?|/[0-9]{1,5}")


def _store(r: Reader, node: Node, where: str) -> str | None:
    value = r.text(node, where)
    if value is None or value == "memory":
        return value
    hint = "write memory, or redis://host:6379/0 (rediss:// for TLS)"
    if not value.startswith(("redis://", "rediss://")):
        r.issue(node, where, "expected memory or a redis:// or rediss:// URL", hint)
        return None
    try:
        parts = urlsplit(value)
        _ = parts.port
    except ValueError:
        parts = None
    if (
        parts is None
        or not parts.hostname
        or _REDIS_DB.fullmatch(parts.path) is None
        or parts.fragment
    ):
        r.issue(
            node,
            where,
            "the redis URL needs a host, an optional port and an optional /db number",
            hint,
        )
        return None
    return value


def read_rate_limits(r: Reader, node: Node | None) -> RateLimitSettings | None:
    if node is None:
        return RateLimitSettings()
    fields = r.fields(node, "rate_limits", _RATE_LIMIT_FIELDS)
    if fields is None:
        return None
    before = len(r.issues)
    values: dict[str, object] = {}
    if "store" in fields:
        values["store"] = _store(r, fields["store"], "rate_limits.store")
    if "on_store_error" in fields:
        values["on_store_error"] = r.choice(
            fields["on_store_error"], "rate_limits.on_store_error", ("deny", "allow")
        )
    if "timeout" in fields:
        values["timeout"] = r.duration(fields["timeout"], "rate_limits.timeout", maximum=5.0)
    if "max_buckets" in fields:
        values["max_buckets"] = r.integer(
            fields["max_buckets"], "rate_limits.max_buckets", 1000, 100_000_000
        )
    # Shorter than /16 (IPv4) or /32 (IPv6) would put whole providers in one bucket.
    if "ipv4_prefix" in fields:
        values["ipv4_prefix"] = r.integer(fields["ipv4_prefix"], "rate_limits.ipv4_prefix", 16, 32)
    if "ipv6_prefix" in fields:
        values["ipv6_prefix"] = r.integer(fields["ipv6_prefix"], "rate_limits.ipv6_prefix", 32, 128)
    if len(r.issues) != before:
        return None
    return RateLimitSettings(**values)  # type: ignore[arg-type]  # the reader built each value with the type of its field
