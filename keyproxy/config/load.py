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
"""

from __future__ import annotations

import difflib
import gc
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from keyproxy import allowlists, routes
from keyproxy.config.model import (
    CREDENTIAL_SOURCES,
    OPS,
    Access,
    Config,
    HostPort,
    Key,
    KeyType,
    Rate,
    RateLimitSettings,
    Route,
    ServerSettings,
    Upstream,
)
from keyproxy.config.units import UnitError, parse_duration, parse_rate, parse_size

__all__ = ["ConfigError", "ConfigIssue", "load_config", "parse_config"]

T = TypeVar("T")


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in the file: where it is, what is wrong, and how to fix it."""

    line: int | None
    where: str  # the field's path, like "keys[2].acls"
    message: str
    hint: str | None = None

    def format(self, source: str) -> str:
        location = source if self.line is None else f"{source}:{self.line}"
        text = (
            f"{location}: {self.where}: {self.message}"
            if self.where
            else f"{location}: {self.message}"
        )
        return f"{text} (hint: {self.hint})" if self.hint else text


class ConfigError(Exception):
    """The file was refused; `issues` lists every problem found, in file order."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        super().__init__(source, issues)
        self.source = source
        self.issues = issues

    def __str__(self) -> str:
        return "\n".join(issue.format(self.source) for issue in self.issues)


# --------------------------------------------------------------------------- YAML

_UNTAGGED = "?"  # what our resolver assigns to every node without an explicit tag
_NO_OP_TAGS = frozenset({"tag:yaml.org,2002:str", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"})
_NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_YAML11_BOOLS = frozenset(
    {"yes", "no", "on", "off", "y", "n", "True", "False", "TRUE", "FALSE", "Yes", "No", "On", "Off"}
)


def _untyped(base: type) -> type:
    """A loader that composes nodes without guessing implicit types.

    Each field interprets its own text, so YAML 1.1's guesses are never needed;
    skipping them also nearly halves the time to compose a file of 100k keys.
    """

    def resolve(self: object, kind: type, value: object, implicit: object) -> str:
        return _UNTAGGED

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


_Loader = _untyped(getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _compose(text: str) -> Node | None:
    return yaml.compose(text, Loader=_Loader)


def _yaml_issue(error: yaml.YAMLError, text: str) -> ConfigIssue:
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, error.position) + 1
        return ConfigIssue(
            line,
            "",
            f"invalid YAML: {error.reason} (character {error.character!r})",
            "remove the control character",
        )
    if not isinstance(error, yaml.MarkedYAMLError):
        return ConfigIssue(None, "", f"invalid YAML: {error}")
    mark = error.problem_mark or error.context_mark
    problem = error.problem or "syntax error"
    message = f"invalid YAML: {problem}" + (f" ({error.context})" if error.context else "")
    if mark is None:
        return ConfigIssue(None, "", message)
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    hint = None
    if "\t" in line[: mark.column + 1]:
        hint = "indent with spaces, not tabs"
    elif re.search(r":\s+[\[{]", line) and "flow" in (error.context or ""):
        hint = 'a value starting with [ or { is a YAML list or mapping: quote text like "[::]:8080"'
    return ConfigIssue(mark.line + 1, "", message, hint)


def _line(node: Node | None) -> int | None:
    return None if node is None else node.start_mark.line + 1


def _kind(node: Node) -> str:
    if type(node) is MappingNode:
        return "a mapping"
    if type(node) is SequenceNode:
        return "a list"
    return "a single value"


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _did_you_mean(name: str, options: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def _show(node: ScalarNode) -> str:
    """The value as written in the file (never after ${VAR} substitution), for messages."""
    value = node.value
    return repr(value if len(value) <= 60 else value[:57] + "...")


# --------------------------------------------------------------------------- reader


def _clean_text(node: Node) -> str | None:
    """The scalar's text when it needs no checking at all, else None.

    The fast path for the common case: an untagged scalar without ${...}
    that is not a YAML null. Everything else goes through `_Reader.text`.
    """
    if type(node) is ScalarNode and node.tag is _UNTAGGED:
        value = node.value
        if "$" not in value and value not in _NULLS:
            return value
    return None


def _raw_texts(node: Node) -> tuple[str, ...] | None:
    """A list's scalars as written, as a cache key; None if it is not a list of scalars.

    A nested list or mapping makes the tuple unhashable, which rules it out
    without inspecting every item.
    """
    if type(node) is not SequenceNode:
        return None
    raw = tuple([item.value for item in node.value])
    try:
        hash(raw)
    except TypeError:
        return None
    return raw


_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")
_INT = re.compile(r"[0-9](?:_?[0-9])*")


class _Reader:
    """Typed access to nodes; every refusal becomes an issue and a `None` result.

    Callers compare `len(reader.issues)` before and after a group of fields to
    know whether everything they read was valid, so converters need no extra
    error channel.
    """

    __slots__ = ("env", "issues")

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.issues: list[ConfigIssue] = []

    def issue(self, node: Node | None, where: str, message: str, hint: str | None = None) -> None:
        self.issues.append(ConfigIssue(_line(node), where, message, hint))

    def issue_at(self, line: int | None, where: str, message: str, hint: str | None = None) -> None:
        self.issues.append(ConfigIssue(line, where, message, hint))

    # ---- mappings

    def fields(
        self,
        node: Node,
        where: str,
        known: frozenset[str],
        not_yet: frozenset[str] = frozenset(),
        merging: frozenset[int] = frozenset(),
    ) -> dict[str, Node] | None:
        """The mapping's fields by name; unknown, duplicate and unsupported ones are issues.

        `merging` holds the mappings whose `<<` merge is being expanded, so an
        anchor merged into itself is reported instead of recursing forever.
        """
        if type(node) is not MappingNode:
            if type(node) is ScalarNode and not node.style and node.value in _NULLS:
                self.issue(node, where, "is empty", "add its fields, or remove it")
            else:
                self.issue(node, where, f"expected a mapping of fields, found {_kind(node)}")
            return None
        pairs = node.value
        try:
            found = {key.value: value for key, value in pairs}
        except TypeError:  # a list or mapping as a field name: the careful loop reports it
            found = {}
        if len(found) == len(pairs) and found.keys() <= known:
            return found
        found = {}
        merges: list[Node] = []
        for key, value in node.value:
            name = key.value if type(key) is ScalarNode else None
            if name in known and name not in found:
                found[name] = value
            elif name == "<<" and not key.style and key.tag is _UNTAGGED:
                merges.append(value)
            else:
                self._odd_field(node, key, name, where, known, not_yet, found)
        if merges:
            self._merge(merges, where, known, not_yet, found, merging | {id(node)})
        return found

    def _odd_field(
        self,
        node: MappingNode,
        key: Node,
        name: str | None,
        where: str,
        known: frozenset[str],
        not_yet: frozenset[str],
        found: dict[str, Node],
    ) -> None:
        if name is None:
            self.issue(key, where, f"a field name must be a single word, found {_kind(key)}")
        elif name in found:
            first = next(k for k, _ in node.value if type(k) is ScalarNode and k.value == name)
            self.issue(
                key,
                _join(where, name),
                f"{name!r} appears twice in this mapping (first on line {_line(first)})",
                "remove one of them: YAML would silently keep only the last",
            )
        elif name in not_yet:
            self.issue(
                key,
                _join(where, name),
                f"{name!r} is not supported yet",
                "remove it: this version of keyproxy would not enforce it",
            )
        else:
            hint = _did_you_mean(name, known | not_yet) or "known fields: " + ", ".join(
                sorted(known)
            )
            self.issue(key, _join(where, name), f"unknown field {name!r}", hint)

    def _merge(
        self,
        sources: list[Node],
        where: str,
        known: frozenset[str],
        not_yet: frozenset[str],
        found: dict[str, Node],
        merging: frozenset[int],
    ) -> None:
        """YAML merge keys (`<<: *defaults`): explicit fields win, then earlier sources."""
        for source in sources:
            mappings = source.value if type(source) is SequenceNode else [source]
            for mapping in mappings:
                if type(mapping) is not MappingNode:
                    self.issue(mapping, where, "'<<' must name a mapping or a list of mappings")
                    continue
                if id(mapping) in merging:
                    self.issue(mapping, where, "'<<' merges a mapping into itself")
                    continue
                inner = self.fields(mapping, where, known, not_yet, merging)
                for name, value in (inner or {}).items():
                    found.setdefault(name, value)

    # ---- scalars

    def text(self, node: Node, where: str) -> str | None:
        """The scalar's text with ${VAR} substituted; None (and an issue) if absent or invalid."""
        if type(node) is not ScalarNode:
            self.issue(node, where, f"expected a single value, found {_kind(node)}")
            return None
        tag = node.tag
        value = node.value
        if tag is not _UNTAGGED and tag not in _NO_OP_TAGS:
            self.issue(
                node,
                where,
                f"explicit YAML tags such as {tag!r} are not supported",
                "remove the tag",
            )
            return None
        if not node.style and tag is _UNTAGGED and value in _NULLS:
            self.issue(node, where, "has no value", "write a value, or remove the field")
            return None
        if "$" in value:
            return self._expand(node, where)
        return value

    def _expand(self, node: ScalarNode, where: str) -> str | None:
        problems: list[tuple[str, str]] = []

        def substitute(match: re.Match[str]) -> str:
            text = match.group(0)
            if text == "$${":
                return "${"
            name = match.group(1)
            if name is None:
                problems.append(
                    (
                        "'${' must be followed by a variable name and '}'",
                        "write ${NAME} with letters, digits and _, or $${ for a literal ${",
                    )
                )
                return ""
            value = self.env.get(name)
            if value is None:
                problems.append(
                    (
                        f"environment variable {name} is not set",
                        f"set {name}, or write $${{ for a literal ${{",
                    )
                )
                return ""
            if value == "":
                problems.append(
                    (
                        f"environment variable {name} is empty",
                        "an empty value would become an empty secret; set the real value",
                    )
                )
            return value

        result = _VAR.sub(substitute, node.value)
        for message, hint in problems:
            self.issue(node, where, message, hint)
        return None if problems else result

    def string(
        self, node: Node, where: str, pattern: re.Pattern[str], what: str, hint: str
    ) -> str | None:
        value = self.text(node, where)
        if value is not None and pattern.fullmatch(value) is None:
            self.issue(node, where, f"{_show(node)} is not a valid {what}", hint)
            return None
        return value

    def boolean(self, node: Node, where: str) -> bool | None:
        value = self.text(node, where)
        if value == "true":
            return True
        if value == "false":
            return False
        if value is not None:
            note = (
                " (keyproxy reads only true and false as booleans)"
                if value in _YAML11_BOOLS
                else ""
            )
            self.issue(
                node,
                where,
                f"expected true or false, found {_show(node)}{note}",
                "write true or false",
            )
        return None

    def integer(self, node: Node, where: str, low: int, high: int | None = None) -> int | None:
        value = self.text(node, where)
        if value is None:
            return None
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        if _INT.fullmatch(value) is None:
            hint = "write digits only, like 1000" if value not in ("true", "false") else None
            self.issue(node, where, f"expected a whole number {bounds}, found {_show(node)}", hint)
            return None
        if len(value) > 1 and value[0] == "0":
            self.issue(
                node,
                where,
                f"{_show(node)} has a leading zero",
                "remove it: YAML 1.1 reads 010 as octal 8",
            )
            return None
        number = int(value)
        if number < low or (high is not None and number > high):
            self.issue(node, where, f"must be {bounds}, found {number}")
            return None
        return number

    def choice(self, node: Node, where: str, options: Iterable[str]) -> str | None:
        value = self.text(node, where)
        if value is None:
            return None
        options = tuple(options)
        if value not in options:
            self.issue(
                node,
                where,
                f"expected one of {', '.join(options)}, found {_show(node)}",
                _did_you_mean(value, options),
            )
            return None
        return value

    def unit(self, node: Node, where: str, parse: Callable[[str], T]) -> T | None:
        value = self.text(node, where)
        if value is None:
            return None
        try:
            return parse(value)
        except UnitError as error:
            self.issue(
                node,
                where,
                f"{_show(node)} is not a valid {error.kind}: {error.problem}",
                error.hint,
            )
            return None

    def duration(
        self, node: Node, where: str, *, allow_zero: bool = False, maximum: float | None = None
    ) -> float | None:
        seconds = self.unit(node, where, parse_duration)
        if seconds is None:
            return None
        if seconds == 0 and not allow_zero:
            self.issue(node, where, "must be longer than zero")
            return None
        if maximum is not None and seconds > maximum:
            self.issue(node, where, f"must be at most {maximum:g}s, found {seconds:g}s")
            return None
        return seconds

    def size(self, node: Node, where: str, low: int, high: int | None = None) -> int | None:
        size = self.unit(node, where, parse_size)
        if size is None:
            return None
        if size < low or (high is not None and size > high):
            bounds = f"at least {low} bytes" if high is None else f"between {low} and {high} bytes"
            self.issue(node, where, f"must be {bounds}, found {size}")
            return None
        return size

    def timestamp(self, node: Node, where: str) -> float | None:
        value = self.text(node, where)
        if value is None:
            return None
        seconds = _parse_timestamp(value)
        if seconds is None:
            self.issue(
                node,
                where,
                f"{_show(node)} is not a date or timestamp",
                "write it like 2027-01-01 or 2027-01-01T00:00:00Z (without a zone: UTC)",
            )
        return seconds

    # ---- lists

    def sequence(
        self, node: Node, where: str, *, non_empty: str | None = None, at_most: int | None = None
    ) -> list[Node] | None:
        if type(node) is not SequenceNode:
            if type(node) is ScalarNode and not node.style and node.value in _NULLS:
                self.issue(node, where, "has no value", "write a list, or remove the field")
            else:
                self.issue(
                    node,
                    where,
                    f"expected a list, found {_kind(node)}",
                    "write [a, b] or one '- item' per line",
                )
            return None
        items = node.value
        if non_empty is not None and not items:
            self.issue(node, where, "is an empty list", non_empty)
            return None
        if at_most is not None and len(items) > at_most:
            self.issue(node, where, f"has {len(items)} entries; at most {at_most} are allowed")
            return None
        return items

    def texts(
        self, node: Node, where: str, *, non_empty: str | None = None, at_most: int | None = None
    ) -> list[tuple[Node, str]] | None:
        """A list of distinct strings, each with its node for error lines."""
        items = self.sequence(node, where, non_empty=non_empty, at_most=at_most)
        if items is None:
            return None
        result: list[tuple[Node, str]] = []
        seen: set[str] = set()
        ok = True
        for index, item in enumerate(items):
            value = _clean_text(item)
            if value is None:
                value = self.text(item, f"{where}[{index}]")
            if value is None:
                ok = False
            elif value in seen:
                self.issue(item, f"{where}[{index}]", f"{_show(item)} is listed twice")
                ok = False
            else:
                seen.add(value)
                result.append((item, value))
        return result if ok else None


# --------------------------------------------------------------------------- timestamps

_TIMESTAMP_CONSTRUCTOR = SafeConstructor()


def _parse_timestamp(text: str) -> float | None:
    """YAML's timestamp forms -> epoch seconds; a value without a zone is UTC."""
    if SafeConstructor.timestamp_regexp.fullmatch(text) is None:
        return None
    node = ScalarNode("tag:yaml.org,2002:timestamp", text)
    try:
        value = _TIMESTAMP_CONSTRUCTOR.construct_yaml_timestamp(node)
    except ValueError:  # e.g. 2027-02-30
        return None
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day) if isinstance(value, date) else value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


# --------------------------------------------------------------------------- server

_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
_PORT = re.compile(r"[0-9]{1,5}")
_LISTEN_HINT = "write host:port, like 0.0.0.0:8080, 127.0.0.1:9901 or [::]:8080"
_WILDCARDS = frozenset({"0.0.0.0", "::"})


def _normalize_host(host: str) -> str | None:
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
        if not sep or not host:
            return None, "expected host:port"
        if ":" in host:
            return None, "IPv6 addresses must be written in brackets, like [::1]:8080"
        normalized = _normalize_host(host)
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
    }
)
_QUERY_NAME = re.compile(r"[A-Za-z0-9._~\[\]-]{1,64}")


def _listen(r: _Reader, node: Node, where: str) -> HostPort | None:
    if type(node) is SequenceNode:  # `[::]:8080` unquoted starts a YAML list
        hint = f'{_LISTEN_HINT}; quote forms that start with "["'
        r.issue(node, where, "expected host:port, found a list", hint)
        return None
    text = r.text(node, where)
    if text is None:
        return None
    value, problem = _parse_host_port(text)
    if value is None:
        r.issue(node, where, f"{_show(node)} is not a listen address: {problem}", _LISTEN_HINT)
    return value


def _credential_sources(r: _Reader, node: Node, where: str) -> frozenset[str] | None:
    items = r.texts(node, where, non_empty="list at least one of: header, basic, query")
    if items is None:
        return None
    before = len(r.issues)
    for index, (item, value) in enumerate(items):
        if value not in CREDENTIAL_SOURCES:
            r.issue(
                item,
                f"{where}[{index}]",
                f"unknown credential source {_show(item)}",
                _did_you_mean(value, CREDENTIAL_SOURCES) or "use header, basic or query",
            )
    return frozenset(value for _, value in items) if len(r.issues) == before else None


def _server(r: _Reader, node: Node | None) -> ServerSettings | None:
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
        "trusted_proxies": lambda n, w: r.integer(n, w, 0, 16),
        "max_body": lambda n, w: r.size(n, w, 1),
        "credential_sources": lambda n, w: _credential_sources(r, n, w),
        "query_param": lambda n, w: r.string(
            n,
            w,
            _QUERY_NAME,
            "query parameter name",
            "use letters, digits and . _ ~ - (at most 64)",
        ),
        "max_header_size": lambda n, w: r.size(n, w, 1024, 1024 * 1024),
        "header_timeout": lambda n, w: r.duration(n, w),
        "keepalive_timeout": lambda n, w: r.duration(n, w, allow_zero=True),
        "drain_timeout": lambda n, w: r.duration(n, w, allow_zero=True),
    }
    for name, value_node in fields.items():
        values[name] = readers[name](value_node, f"server.{name}")
    if len(r.issues) != before:
        return None
    settings = ServerSettings(**values)  # type: ignore[arg-type]
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


# --------------------------------------------------------------------------- upstream

_UPSTREAM_FIELDS = frozenset({"url", "timeout", "connect_timeout", "max_connections", "inject"})
_INJECT_FIELDS = frozenset({"headers", "basic", "query"})
_BASIC_FIELDS = frozenset({"username", "password"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PATH_SEGMENT = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,=:@]|%[0-9A-Fa-f]{2})+")
_FORBIDDEN_PATH_ESCAPES = re.compile(r"%(?:2[Ff]|2[Ee]|5[Cc]|00)")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_REFUSED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "forwarded",
        "x-request-id",
        "expect",
        # Override headers: an injected one would turn every request into another method or URL.
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
    }
)
_REFUSED_HEADER_PREFIXES = ("proxy-", "x-forwarded-")


def _upstream_url(r: _Reader, node: Node, where: str) -> dict[str, object] | None:
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
    host = _normalize_host(raw_host) if raw_host else None
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


def _header_value(r: _Reader, node: Node, where: str) -> str | None:
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
        r.issue(node, where, "starts or ends with whitespace, which HTTP would drop")
    else:
        return value
    return None


def _inject_headers(r: _Reader, node: Node, where: str) -> tuple[tuple[str, str], ...] | None:
    if type(node) is not MappingNode:
        r.issue(node, where, f"expected a mapping of header names to values, found {_kind(node)}")
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
                f"header {name!r} is set twice (first on line {_line(seen[lowered])})",
                "header names are case-insensitive; keep one",
            )
        elif lowered in _REFUSED_HEADERS or lowered.startswith(_REFUSED_HEADER_PREFIXES):
            r.issue(
                key,
                here,
                f"keyproxy cannot inject {name!r}: it controls framing, routing "
                "or forwarding information that keyproxy sets itself",
            )
        else:
            seen[lowered] = key
            value = _header_value(r, value_node, here)
            if value is not None:
                result.append((name, value))
    return tuple(result) if len(r.issues) == before else None


def _inject_query(r: _Reader, node: Node, where: str) -> tuple[tuple[str, str], ...] | None:
    if type(node) is not MappingNode:
        r.issue(
            node, where, f"expected a mapping of parameter names to values, found {_kind(node)}"
        )
        return None
    before = len(r.issues)
    result: list[tuple[str, str]] = []
    seen: dict[str, Node] = {}
    for key, value_node in node.value:
        name = key.value if type(key) is ScalarNode else ""
        here = f"{where}.{name}"
        if _QUERY_NAME.fullmatch(name) is None:
            r.issue(
                key,
                where,
                f"{name!r} is not a valid query parameter name",
                "use letters, digits and . _ ~ -",
            )
        elif name in seen:
            r.issue(key, here, f"{name!r} appears twice (first on line {_line(seen[name])})")
        else:
            seen[name] = key
            value = r.text(value_node, here)
            if value == "":
                r.issue(value_node, here, "is empty", "an injected credential must have a value")
            elif value is not None and _CONTROL.search(value):
                r.issue(value_node, here, "contains a line break, NUL or another control character")
            elif value is not None:
                result.append((name, value))
    return tuple(result) if len(r.issues) == before else None


def _inject_basic(r: _Reader, node: Node, where: str) -> tuple[str, str] | None:
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
        )
    if password is not None and _CONTROL.search(password):
        r.issue(fields["password"], f"{where}.password", "contains a control character")
    if len(r.issues) != before or username is None or password is None:
        return None
    return username, password


def _inject(r: _Reader, node: Node, where: str) -> dict[str, object] | None:
    fields = r.fields(node, where, _INJECT_FIELDS)
    if fields is None:
        return None
    before = len(r.issues)
    result: dict[str, object] = {}
    if "headers" in fields:
        result["inject_headers"] = _inject_headers(r, fields["headers"], f"{where}.headers")
    if "basic" in fields:
        result["inject_basic"] = _inject_basic(r, fields["basic"], f"{where}.basic")
    if "query" in fields:
        result["inject_query"] = _inject_query(r, fields["query"], f"{where}.query")
    headers = result.get("inject_headers") or ()
    if result.get("inject_basic") and any(n.lower() == "authorization" for n, _ in headers):
        r.issue(
            fields["basic"],
            f"{where}.basic",
            "inject.basic and an injected Authorization header would both set Authorization",
            "keep one of them",
        )
    return result if len(r.issues) == before else None


def _upstream(r: _Reader, node: Node | None, root: Node) -> Upstream | None:
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
    if "inject" in fields:
        values.update(_inject(r, fields["inject"], "upstream.inject") or {})
    if len(r.issues) != before:
        return None
    return Upstream(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- routes

_ROUTE_FIELDS = frozenset({"match", "acl", "op", "access", "allow_method_override"})
_ACL_NAME = re.compile(r"[a-z0-9_-]{1,64}")
_CHANGING_OPS = frozenset({"create", "update", "delete"})


@dataclass(slots=True)
class _AclIndex:
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


def _route(r: _Reader, node: Node, index: int) -> tuple[Route | None, str | None]:
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
    op = r.choice(fields["op"], f"{where}.op", OPS) if "op" in fields else None
    access = (
        r.choice(fields["access"], f"{where}.access", ("read", "write"))
        if "access" in fields
        else None
    )
    override = False
    if "allow_method_override" in fields:
        override = r.boolean(fields["allow_method_override"], f"{where}.allow_method_override")
    if access == "read" and op in _CHANGING_OPS:
        r.issue(
            fields["access"],
            f"{where}.access",
            f"a route with op: {op} changes data and cannot be access: read",
            "remove access: read, or fix op",
        )
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
        access=Access(access) if access else None,
        allow_method_override=bool(override),
        line=_line(node) or 0,
    ), acl


def _route_pattern(
    r: _Reader, node: Node, where: str
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


def _unreachable_routes(r: _Reader, table: list[Route]) -> None:
    """A route whose path an earlier route has, with all its methods, can never match."""
    earlier: dict[tuple[str, ...], list[Route]] = {}
    for route in table:
        shape = _shape(route.segments)
        before = earlier.setdefault(shape, [])
        covered = set().union(*(e.methods for e in before)) if before else set()
        if before and route.methods <= covered:
            same = next((e for e in before if e.methods == route.methods), None)
            if same is not None:
                message = (
                    f"route {route.index} duplicates route {same.index} "
                    f"(line {same.line}) and can never match"
                )
            else:
                names = ", ".join(str(e.index) for e in before if e.methods & route.methods)
                message = (
                    f"route {route.index} can never match: earlier routes ({names}) "
                    "have the same path and all of its methods"
                )
            r.issue_at(
                route.line,
                f"routes[{route.index}].match",
                message,
                "remove it, or change its methods or path",
            )
        before.append(route)


def _routes(r: _Reader, node: Node | None, root: Node) -> tuple[list[Route], _AclIndex]:
    """The routes in file order and the ACL index; `index.complete` means all were valid."""
    index = _AclIndex(set(), set(), set(), complete=False)
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
            table.append(route)
            for method in route.methods:
                (index.read if route.access_for(method) is Access.READ else index.write).add(acl)
    _unreachable_routes(r, table)
    index.complete = len(r.issues) == before
    return table, index


# --------------------------------------------------------------------------- keys

_KEY_FIELDS = frozenset(
    {
        "id",
        "hash",
        "type",
        "acls",
        "referers",
        "ips",
        "expires",
        "ttl",
        "created",
        "rate_limit",
        "quota",
        "revoked",
        "description",
    }
)
_KEY_NOT_YET = frozenset({"scopes", "roles", "fields"})
_KEY_CORE = frozenset({"id", "hash", "type", "acls"})
_KEY_EXPIRY = frozenset({"expires", "ttl", "created"})
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HASH = re.compile(r"sha256:([0-9a-fA-F]{64})")
_KEY_TYPES = {t.value: t for t in KeyType}
_MAX_ALLOWLIST = 100


class _KeyReader:
    """Reads the key list; fast because 100k keys mostly repeat a few shapes.

    Values that many keys share (ACL lists, CIDR lists, referers, rates,
    timestamps) are parsed once and the parsed, immutable object is reused.
    Only successful results are cached: a bad value is re-read for every key
    that uses it, so each occurrence gets its own issue and line.
    """

    def __init__(self, reader: _Reader, acls: _AclIndex) -> None:
        self.r = reader
        self.acl_index = acls
        self.defaults = {t: acls.default_for(t) for t in KeyType}
        # Caches keyed by the text as written (see `_raw_texts`).
        self.acl_cache: dict[tuple[KeyType, tuple[str, ...] | None], frozenset[str]] = {}
        self.ip_cache: dict[tuple[str, ...], allowlists.IpAllowlist] = {}
        self.referer_cache: dict[tuple[str, ...], tuple[allowlists.RefererPattern, ...]] = {}
        self.rate_cache: dict[str, Rate] = {}
        self.time_cache: dict[str, float] = {}
        self.ids: dict[str, int] = {}  # key id -> index of the key that has it first
        self.digests: dict[bytes, int] = {}
        self.items: list[Node] = []
        self.keys: list[Key] = []

    def read_all(self, node: Node) -> None:
        self.items = self.r.sequence(node, "keys") or []
        for index, item in enumerate(self.items):
            key = self.key(item, index)
            if key is not None:
                self.keys.append(key)

    def key(self, node: Node, index: int) -> Key | None:
        r = self.r
        where = f"keys[{index}]"
        fields = r.fields(node, where, _KEY_FIELDS, _KEY_NOT_YET)
        if fields is None:
            return None
        before = len(r.issues)
        key_id = self.key_id(fields.get("id"), node, where, index)
        digest = self.digest(fields.get("hash"), node, where, index)
        key_type = self.key_type(fields.get("type"), node, where)
        acls = self.acls(fields.get("acls"), node, key_type, where)
        options = {} if fields.keys() <= _KEY_CORE else self.options(fields, where)
        if len(r.issues) != before:
            return None
        return Key(
            id=key_id,
            digest=digest,
            type=key_type,
            acls=acls,
            line=node.start_mark.line + 1,
            **options,
        )

    def options(self, fields: dict[str, Node], where: str) -> dict[str, object]:
        """The optional constraints of one key, by `Key` field name."""
        options: dict[str, object] = {}
        for name, node in fields.items():
            if name in _KEY_CORE or name in _KEY_EXPIRY:
                continue
            value = _KEY_OPTION_READERS[name](self, node, f"{where}.{name}")
            if name != "description":
                options[name] = value
        if not fields.keys().isdisjoint(_KEY_EXPIRY):
            options["expires_at"] = self.expiry(fields, where)
        return options

    def quota(self, node: Node, where: str) -> int | None:
        return self.r.integer(node, where, 1)

    def revoked(self, node: Node, where: str) -> bool:
        return bool(self.r.boolean(node, where))

    def description(self, node: Node, where: str) -> None:
        self.r.text(node, where)  # free text: only its shape is checked

    def scalar(self, node: Node, where: str, name: str) -> str | None:
        """`_Reader.text` for one field of a key, without building its path unless needed."""
        value = _clean_text(node)
        return value if value is not None else self.r.text(node, f"{where}.{name}")

    def first_line(self, index: int) -> int | None:
        return _line(self.items[index])

    def key_id(self, node: Node | None, parent: Node, where: str, index: int) -> str | None:
        if node is None:
            self.r.issue(
                parent, where, "'id' is required", "give every key an id, like id: website"
            )
            return None
        key_id = self.scalar(node, where, "id")
        if key_id is None:
            return None
        if _KEY_ID.fullmatch(key_id) is None:
            self.r.issue(
                node,
                where + ".id",
                f"{_show(node)} is not a valid key id",
                "use 1 to 64 letters, digits, '.', '_' or '-'",
            )
            return None
        first = self.ids.setdefault(key_id, index)
        if first != index:
            self.r.issue(
                node,
                where + ".id",
                f"key id {key_id!r} is already used by keys[{first}] "
                f"(line {self.first_line(first)})",
                "every key needs its own id",
            )
            return None
        return key_id

    def digest(self, node: Node | None, parent: Node, where: str, index: int) -> bytes | None:
        if node is None:
            self.r.issue(
                parent,
                where,
                "'hash' is required",
                "run `keyproxy keygen`: it prints a key and the hash line to paste",
            )
            return None
        text = self.scalar(node, where, "hash")
        if text is None:
            return None
        match = _HASH.fullmatch(text)
        if match is None:
            looks_like_key = text.startswith(("pk_", "sk_"))
            self.r.issue(
                node,
                where + ".hash",
                "expected sha256: followed by 64 hexadecimal characters",
                "this looks like a key itself: never store keys here, only the hash that "
                "`keyproxy keygen` prints"
                if looks_like_key
                else "run `keyproxy keygen` to get one",
            )
            return None
        digest = bytes.fromhex(match.group(1))
        first = self.digests.setdefault(digest, index)
        if first != index:
            self.r.issue(
                node,
                where + ".hash",
                f"the same hash is already used by keys[{first}] (line {self.first_line(first)})",
                "every key needs its own secret: generate a new one with `keyproxy keygen`",
            )
            return None
        return digest

    def key_type(self, node: Node | None, parent: Node, where: str) -> KeyType | None:
        if node is None:
            self.r.issue(parent, where, "'type' is required", "add type: read, write or admin")
            return None
        value = self.scalar(node, where, "type")
        key_type = _KEY_TYPES.get(value)  # type: ignore[arg-type]
        if key_type is None and value is not None:
            self.r.issue(
                node,
                where + ".type",
                f"expected read, write or admin, found {_show(node)}",
                _did_you_mean(value, _KEY_TYPES),
            )
        return key_type

    def acls(
        self, node: Node | None, parent: Node, key_type: KeyType | None, where: str
    ) -> frozenset[str] | None:
        """The key's ACLs; with an invalid type, listed names are still checked to exist."""
        if node is None:
            if key_type is None:
                return None
            default = self.defaults[key_type]
            if not default and self.acl_index.complete:
                self.r.issue(
                    parent,
                    where,
                    f"no route grants {key_type.value} access, so this key could never be used",
                    "add a route, or change the key's type",
                )
            return default
        raw = _raw_texts(node)
        cached = self.acl_cache.get((key_type, raw))
        if cached is not None:
            return cached
        where += ".acls"
        items = self.r.texts(
            node, where, non_empty="omit acls to allow every ACL the key type allows"
        )
        if items is None:
            return None
        before = len(self.r.issues)
        for position, (item, name) in enumerate(items):
            self.check_acl(item, f"{where}[{position}]", name, key_type)
        if len(self.r.issues) != before:
            return None
        names = tuple([value for _, value in items])
        result = frozenset(names)
        if names == raw:  # as written, without ${...}: safe to reuse for the same text
            self.acl_cache[(key_type, raw)] = result
        return result

    def check_acl(self, node: Node, where: str, name: str, key_type: KeyType | None) -> None:
        index = self.acl_index
        if not index.complete:
            return
        if name not in index.known:
            known = ", ".join(sorted(index.known))
            hint = _did_you_mean(name, index.known)
            hint = f"{hint} the routes use: {known}" if hint else f"the routes use: {known}"
            self.r.issue(node, where, f"no route uses the ACL {name!r}", hint)
        elif key_type is KeyType.READ and name not in index.read:
            self.r.issue(
                node,
                where,
                f"a read key can never use ACL {name!r}: every route with it writes",
                "remove it, or make this a write or admin key",
            )
        elif key_type is KeyType.WRITE and name not in index.write:
            self.r.issue(
                node,
                where,
                f"a write key can never use ACL {name!r}: every route with it only reads",
                "remove it, or make this a read or admin key",
            )

    def referers(self, node: Node, where: str) -> tuple[allowlists.RefererPattern, ...] | None:
        raw = _raw_texts(node)
        cached = self.referer_cache.get(raw)  # type: ignore[arg-type]
        if cached is not None:
            return cached
        items = self.r.texts(
            node, where, non_empty="omit referers to allow any referer", at_most=_MAX_ALLOWLIST
        )
        if items is None:
            return None
        patterns = []
        for position, (item, text) in enumerate(items):
            try:
                patterns.append(allowlists.RefererPattern.parse(text))
            except ValueError as error:
                self.r.issue(
                    item,
                    f"{where}[{position}]",
                    str(error),
                    'write a URL pattern like "https://*.example.com/*"',
                )
        if len(patterns) != len(items):
            return None
        result = tuple(patterns)
        if tuple([value for _, value in items]) == raw:
            self.referer_cache[raw] = result
        return result

    def ips(self, node: Node, where: str) -> allowlists.IpAllowlist | None:
        raw = _raw_texts(node)
        cached = self.ip_cache.get(raw)  # type: ignore[arg-type]
        if cached is not None:
            return cached
        items = self.r.texts(
            node, where, non_empty="omit ips to allow any address", at_most=_MAX_ALLOWLIST
        )
        if items is None:
            return None
        texts = [value for _, value in items]
        try:
            result = allowlists.IpAllowlist.parse(texts)
        except ValueError as error:
            self.locate_bad_cidrs(node, where, items, error)
            return None
        if tuple(texts) == raw:
            self.ip_cache[raw] = result
        return result

    def locate_bad_cidrs(
        self, node: Node, where: str, items: list[tuple[Node, str]], error: ValueError
    ) -> None:
        """Point at the entry that failed, not just at the list."""
        found = False
        for position, (item, text) in enumerate(items):
            try:
                allowlists.IpAllowlist.parse([text])
            except ValueError as item_error:
                found = True
                self.r.issue(
                    item,
                    f"{where}[{position}]",
                    str(item_error),
                    "write an address or a CIDR block, like 10.0.0.0/8 or ::1",
                )
        if not found:
            self.r.issue(node, where, str(error))

    def rate(self, node: Node, where: str) -> Rate | None:
        plain = node.tag is _UNTAGGED  # a tagged node must go through the tag check every time
        if plain and (cached := self.rate_cache.get(node.value)) is not None:
            return cached
        rate = self.r.unit(node, where, parse_rate)
        if rate is not None and plain:
            self.rate_cache[node.value] = rate
        return rate

    def time(self, node: Node, where: str) -> float | None:
        plain = node.tag is _UNTAGGED
        if plain and (cached := self.time_cache.get(node.value)) is not None:
            return cached
        seconds = self.r.timestamp(node, where)
        if seconds is not None and plain:
            self.time_cache[node.value] = seconds
        return seconds

    def expiry(self, fields: dict[str, Node], where: str) -> float | None:
        expires, ttl, created = fields.get("expires"), fields.get("ttl"), fields.get("created")
        created_at = None if created is None else self.time(created, where + ".created")
        if expires is not None:
            if ttl is not None:
                self.r.issue(ttl, where + ".ttl", "set either expires or ttl, not both")
            return self.time(expires, where + ".expires")
        if ttl is None:
            return None
        seconds = self.r.duration(ttl, where + ".ttl")
        if created is None:
            self.r.issue(
                ttl,
                where + ".ttl",
                "ttl counts from created, which is missing",
                "add created: 2026-01-01T00:00:00Z (when the key was issued), or use expires",
            )
            return None
        if seconds is None or created_at is None:
            return None
        return created_at + seconds


# Optional key fields (other than the expiry group) -> their reader. Kept out of the
# instance on purpose: a bound method stored on its own object is a reference cycle,
# and a cycle here would keep the whole YAML tree alive until the next full collection.
_KEY_OPTION_READERS: dict[str, Callable[[_KeyReader, Node, str], object]] = {
    "referers": _KeyReader.referers,
    "ips": _KeyReader.ips,
    "rate_limit": _KeyReader.rate,
    "quota": _KeyReader.quota,
    "revoked": _KeyReader.revoked,
    "description": _KeyReader.description,
}


# --------------------------------------------------------------------------- rate limits

_RATE_LIMIT_FIELDS = frozenset({"store", "on_store_error", "timeout", "max_buckets"})
_REDIS_DB = re.compile(r"/?|/[0-9]{1,5}")


def _store(r: _Reader, node: Node, where: str) -> str | None:
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


def _rate_limits(r: _Reader, node: Node | None) -> RateLimitSettings | None:
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
    if len(r.issues) != before:
        return None
    return RateLimitSettings(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the file

_SECTIONS = frozenset({"server", "upstream", "routes", "keys", "rate_limits"})
_SECTIONS_NOT_YET = frozenset({"users", "roles", "system_tables", "self", "cache", "cors"})


def _route_table(r: _Reader, table: list[Route], node: Node | None) -> routes.RouteTable | None:
    try:
        return routes.RouteTable(table)
    except ValueError as error:
        r.issue(node, "routes", str(error))
        return None


def _build(text: str, source: str, env: Mapping[str, str]) -> Config:
    try:
        root = _compose(text)
    except yaml.YAMLError as error:
        raise ConfigError(source, [_yaml_issue(error, text)]) from None
    except RecursionError:
        raise ConfigError(
            source, [ConfigIssue(None, "", "the YAML is nested too deeply")]
        ) from None
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
                    _line(root),
                    "",
                    "the top level must be a mapping "
                    "of sections (server, upstream, routes, keys, ...)",
                )
            ],
        )
    r = _Reader(env)
    sections = r.fields(root, "", _SECTIONS, _SECTIONS_NOT_YET) or {}
    server = _server(r, sections.get("server"))
    upstream = _upstream(r, sections.get("upstream"), root)
    table, acls = _routes(r, sections.get("routes"), root)
    key_reader = _KeyReader(r, acls)
    if "keys" in sections:
        key_reader.read_all(sections["keys"])
    rate_limits = _rate_limits(r, sections.get("rate_limits"))
    route_table = _route_table(r, table, sections.get("routes")) if acls.complete else None
    if r.issues:
        raise ConfigError(source, sorted(r.issues, key=lambda i: i.line or 0))
    # No issue means every part was built; the assert only narrows the types.
    assert server and upstream and rate_limits and route_table is not None
    keys = tuple(key_reader.keys)
    return Config(
        server=server,
        upstream=upstream,
        routes=tuple(table),
        keys=keys,
        rate_limits=rate_limits,
        source=source,
        route_table=route_table,
        keys_by_digest={key.digest: key for key in keys},
    )


def parse_config(text: str, source: str, env: Mapping[str, str]) -> Config:
    """Build a `Config` from YAML text, or raise `ConfigError` listing every problem.

    Pure: `env` is the only outside input, so tests and `keyproxy check` see
    exactly what `serve` would. The cyclic garbage collector is paused while
    parsing: a large key list allocates millions of short-lived, acyclic
    nodes, and repeated collections over them would cost more than the parse.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _build(text, source, env)
    finally:
        if collecting:
            gc.enable()


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and parse the file at `path`; `env` defaults to the process environment."""
    source = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(
            source, [ConfigIssue(None, "", f"cannot read the file: {error.strerror or error}")]
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(source, [ConfigIssue(line, "", "the file is not valid UTF-8")]) from None
    return parse_config(text, source, os.environ if env is None else env)
