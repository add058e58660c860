"""Read the YAML configuration into a `Config`: strictly, and with every problem at once.

Why walk YAML nodes instead of using `safe_load`'s dicts: nodes carry line
numbers (a fix hint without a line is half a hint), duplicate keys stay visible
(`safe_load` silently keeps the last one, which can widen a key's access), and
scalars keep the text the user wrote, so `yes`, `010` or `1:30` are never
reinterpreted as a boolean, octal 8 or 90 behind their back. Each field decides
what its text means.

Nothing here stops at the first problem: every check records a `ConfigIssue`
and carries on, and the file is refused as a whole at the end, so one run of
`keyproxy check` shows everything that needs fixing.

The parts: `errors` (ConfigIssue, ConfigError), `yaml_reader` (the strict node
reader, ${VAR} and timestamps), `units` (sizes, durations, rates) and one module per
section of the file: `server_section`, `upstream_section`, `routes_section`,
`keys_section`, `rate_limits_section`, `users_section` (`users.jwt`),
`roles_section` (`roles`, `system_tables`, `self_records`), `observe_section`
(`log`, `metrics`) and `response_sections` (`cors`, `fields`, `cache`). This module
composes the YAML and assembles the `Config`; `reload` watches the file.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node

from keyproxy.config.errors import ConfigError, ConfigIssue
from keyproxy.config.keys_file import read_keys_file, read_yaml_keys
from keyproxy.config.keys_section import KeyReader
from keyproxy.config.model import Config, Route, Upstream
from keyproxy.config.observe_section import read_log, read_metrics
from keyproxy.config.rate_limits_section import read_rate_limits
from keyproxy.config.response_sections import read_cache, read_cors
from keyproxy.config.roles_section import check_key_roles, read_permissions
from keyproxy.config.routes_section import read_routes
from keyproxy.config.server_section import read_server
from keyproxy.config.upstream_section import read_upstream
from keyproxy.config.users_section import read_users
from keyproxy.config.yaml_reader import UNTAGGED, Reader, line_of, yaml_issue
from keyproxy.policy import routes

__all__ = ["ConfigError", "ConfigIssue", "load_config", "parse_config"]


# --------------------------------------------------------------------------- YAML


def _untyped(base: type) -> type:
    """A loader that composes nodes without guessing implicit types.

    Each field interprets its own text, so YAML 1.1's guesses are never needed;
    skipping them also nearly halves the time to compose a file of 100k keys.
    """

    def resolve(self: object, kind: type, value: object, implicit: object) -> str:
        return UNTAGGED

    def descend_resolver(self: object, current_node: object, current_index: object) -> None:
        return None

    def ascend_resolver(self: object) -> None:
        return None

    namespace = {
        "resolve": resolve,
        "descend_resolver": descend_resolver,
        "ascend_resolver": ascend_resolver,
    }
    return type(f"Untyped{base.__name__}", (base,), namespace)


# Looked up on every call, so tests can swap in the pure-Python loader here.
_Loader = _untyped(getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _compose(text: str) -> Node | None:
    return yaml.compose(text, Loader=_Loader)


# --------------------------------------------------------------------------- the file

_SECTIONS = frozenset(
    {
        "server",
        "upstream",
        "routes",
        "keys",
        "keys_file",
        "rate_limits",
        "users",
        "roles",
        "system_tables",
        "self",
        "cors",
        "log",
        "metrics",
        "cache",
    }
)
_SECTIONS_NOT_YET: frozenset[str] = frozenset()


def _route_table(r: Reader, table: list[Route], node: Node | None) -> routes.RouteTable | None:
    try:
        return routes.RouteTable(table)
    except ValueError as error:
        r.issue(node, "routes", str(error), "fix the route named in the message")
        return None


def _check_self_owner_header(r: Reader, node: Node, upstream: Upstream) -> None:
    """Self records need the backend to learn the owner from keyproxy: without the user
    identity header it could only take the owner from the client's own body or headers."""
    if not any(kind == "user" for kind, _ in upstream.identity_headers):
        r.issue(
            node,
            "self",
            "self records need upstream.identity_headers.user: the backend must take a "
            "record's owner from keyproxy, never from the client",
            "add upstream: {identity_headers: {user: X-Keyproxy-User}} and have the backend "
            "store that header's value as the owner",
        )


def _build(text: str, source: str, env: Mapping[str, str]) -> Config:
    try:
        root = _compose(text)
    except yaml.YAMLError as error:
        raise ConfigError(source, [yaml_issue(error, text)]) from None
    if root is None:
        raise ConfigError(
            source,
            [
                ConfigIssue(
                    None,
                    "",
                    "the file is empty",
                    "a configuration needs at least upstream and routes",
                )
            ],
        )
    if type(root) is not MappingNode:
        raise ConfigError(
            source,
            [
                ConfigIssue(
                    line_of(root),
                    "",
                    "the top level must be a mapping "
                    "of sections (server, upstream, routes, keys, ...)",
                    "start each section at column 1, like 'upstream:' and 'routes:'",
                )
            ],
        )
    r = Reader(env)
    sections = r.fields(root, "", _SECTIONS, _SECTIONS_NOT_YET) or {}
    server = read_server(r, sections.get("server"))
    upstream = read_upstream(r, sections.get("upstream"), root, os.path.dirname(source))
    table, acls = read_routes(r, sections.get("routes"), root)
    key_reader = KeyReader(r, acls)
    if "keys" in sections:
        read_yaml_keys(key_reader, sections["keys"])
    keys_file = None
    if "keys_file" in sections:
        keys_file = read_keys_file(key_reader, sections["keys_file"], os.path.dirname(source))
    rate_limits = read_rate_limits(r, sections.get("rate_limits"))
    cors = read_cors(r, sections.get("cors"), table)
    cache = read_cache(r, sections.get("cache"), table)
    users = read_users(r, sections.get("users"), os.path.dirname(source))
    permissions = read_permissions(
        r,
        sections,
        "users" in sections,
        any(key.roles is not None for key in key_reader.keys),
    )
    check_key_roles(r, key_reader.keys, permissions)
    if "self" in sections and upstream is not None:
        _check_self_owner_header(r, sections["self"], upstream)
    log_settings = read_log(r, sections.get("log"))
    metrics_settings = read_metrics(r, sections.get("metrics"))
    route_table = _route_table(r, table, sections.get("routes")) if acls.complete else None
    if r.issues:
        # The configuration's own issues first, then each keys file's, each in line order.
        raise ConfigError(source, sorted(r.issues, key=lambda i: (i.file or "", i.line or 0)))
    # No issue means every part was built; the assert only narrows the types.
    assert server and upstream and rate_limits and route_table is not None
    assert log_settings and metrics_settings
    keys = tuple(key_reader.keys)
    return Config(
        server=server,
        upstream=upstream,
        routes=tuple(table),
        keys=keys,
        rate_limits=rate_limits,
        source=source,
        log=log_settings,
        metrics=metrics_settings,
        route_table=route_table,
        keys_by_digest=key_reader.index(keys),
        any_key_fields=any(key.fields is not None for key in keys),
        cors=cors,
        users=users,
        permissions=permissions,
        cache=cache,
        keys_file=keys_file,
    )


def parse_config(text: str, source: str, env: Mapping[str, str]) -> Config:
    """Build a `Config` from YAML text, or raise `ConfigError` listing every problem.

    Pure apart from reading the files it names (the CA bundle `upstream.ca_file`,
    the JSON-lines `keys_file`, relative to `source`): `env` is the only other
    outside input, so tests and `keyproxy check` see exactly what `serve` would.
    The cyclic garbage collector is paused while parsing: a large key list
    allocates millions of short-lived, acyclic
    nodes, and repeated collections over them would cost more than the parse.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _build(text, source, env)
    except RecursionError:  # deep nesting, in the YAML itself or through '<<' merges
        raise ConfigError(
            source,
            [
                ConfigIssue(
                    None,
                    "",
                    "the YAML is nested too deeply",
                    "flatten the nesting; avoid '<<' merges of merges",
                )
            ],
        ) from None
    except ValueError as error:
        # A value no reader foresaw (e.g. an integer of thousands of digits, which
        # Python refuses to convert): still a refused file, never a crash or a
        # stopped reload. The message names the problem, not the value.
        raise ConfigError(
            source,
            [
                ConfigIssue(
                    None,
                    "",
                    f"a value cannot be read: {type(error).__name__}",
                    "write numbers of ordinary size and plain text",
                )
            ],
        ) from None
    finally:
        if collecting:
            gc.enable()


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and parse the file at `path`; `env` defaults to the process environment."""
    source = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        if isinstance(error, IsADirectoryError):
            hint = "-c/--config takes the file itself, e.g. -c /etc/keyproxy/config.yaml"
        elif isinstance(error, FileNotFoundError):
            hint = "check the path given with -c/--config"
        elif isinstance(error, PermissionError):
            hint = "let the user keyproxy runs as read it, or pass another file with -c/--config"
        else:
            hint = "pass a readable YAML file with -c/--config"
        message = f"cannot read the file: {error.strerror or error}"
        raise ConfigError(source, [ConfigIssue(None, "", message, hint)]) from None
    return config_from_bytes(data, source, env)


def config_from_bytes(data: bytes, source: str, env: Mapping[str, str] | None = None) -> Config:
    """Parse the file's bytes as read once (the reloader checks them before parsing)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(source, [ConfigIssue(line, "", "the file is not valid UTF-8")]) from None
    return parse_config(text, source, os.environ if env is None else env)
