"""Reading YAML nodes strictly: typed scalars, fields, lists, ${VAR} and timestamps.

`load.py` composes the file into nodes without YAML's implicit typing (every
untagged node is tagged `UNTAGGED`); the `Reader` here decides what each
scalar's text means, and turns every refusal into a `ConfigIssue` with the
node's line. The section modules build on it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime
from typing import TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from keyproxy.config.errors import ConfigIssue
from keyproxy.config.units import UnitError, parse_duration, parse_size

T = TypeVar("T")

# --------------------------------------------------------------------------- YAML

UNTAGGED = "?"
#: Most mappings merged with `<<` in one file (see `Reader._merge`).
MAX_MERGES = 100_000  # what our resolver assigns to every node without an explicit tag
_NO_OP_TAGS = frozenset({"tag:yaml.org,2002:str", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"})
NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_YAML11_BOOLS = frozenset(
    {"yes", "no", "on", "off", "y", "n", "True", "False", "TRUE", "FALSE", "Yes", "No", "On", "Off"}
)


_YAML_HINT = (
    "check this line and the one above it: spaces for indentation, 'name: value' fields,"
    " quotes around text holding ': ', ' #', [ or {"
)


def yaml_issue(error: yaml.YAMLError, text: str) -> ConfigIssue:
    if isinstance(error, yaml.reader.ReaderError):
        return ConfigIssue(
            text.count("\n", 0, error.position) + 1,
            "",
            f"invalid YAML: {error.reason} (character {error.character!r})",
            "remove the control character",
        )
    if not isinstance(error, yaml.MarkedYAMLError):
        return ConfigIssue(None, "", f"invalid YAML: {error}", _YAML_HINT)
    mark = error.problem_mark or error.context_mark
    problem = error.problem or "syntax error"
    message = f"invalid YAML: {problem}" + (f" ({error.context})" if error.context else "")
    if mark is None:
        return ConfigIssue(None, "", message, _YAML_HINT)
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    hint = None
    if "\t" in line[: mark.column + 1]:
        hint = "indent with spaces, not tabs"
    elif re.search(r":\s+[\[{]", line) and "flow" in (error.context or ""):
        hint = 'a value starting with [ or { is a YAML list or mapping: quote text like "[::]:8080"'
    elif problem.startswith(_INDENTATION_PROBLEMS) and _misindented(lines, mark.line):
        message = f"this line's indentation does not fit the lines above it (YAML: {problem})"
        column = _indent(line)
        hint = (
            f"it starts in column {column + 1}: fields of one mapping start in the same "
            "column, a nested field further right than its parent (spaces only)"
        )
    elif problem.startswith("mapping values are not allowed"):
        hint = 'quote a value that holds ": ", like "a: b"'
    return ConfigIssue(mark.line + 1, "", message, hint or _YAML_HINT)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _misindented(lines: list[str], index: int) -> bool:
    """The line starts in another column than the line above, which opened no nested block."""
    if index >= len(lines):
        return False
    above = next(
        (
            text
            for text in reversed(lines[:index])
            if text.strip() and not text.lstrip().startswith("#")
        ),
        None,
    )
    if above is None:
        return False
    opens_block = above.rstrip().endswith((":", "-"))
    return _indent(lines[index]) != _indent(above) and not opens_block


#: What PyYAML says when a line is indented more or less than its neighbours allow.
_INDENTATION_PROBLEMS = (
    "did not find expected key",
    "mapping values are not allowed",
    "expected <block end>",
    "did not find expected '-' indicator",
)


def line_of(node: Node | None) -> int | None:
    return None if node is None else node.start_mark.line + 1


def kind_of(node: Node) -> str:
    if type(node) is MappingNode:
        return "a mapping"
    if type(node) is SequenceNode:
        return "a list"
    return "a single value"


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def did_you_mean(name: str, options: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def _tag_refusal(tag: str) -> tuple[str, str]:
    """Message and hint for a tagged value. A tag is only named when it is a YAML one:
    an unquoted value starting with '!' (a secret, often) reads as a tag, and must not
    be printed into logs and /readyz."""
    if tag.startswith(("tag:yaml.org,2002:", "!!")):
        return f"explicit YAML tags such as {tag!r} are not supported", "remove the tag"
    return (
        "a value starting with '!' is read by YAML as a tag",
        'quote the value, like "!...", or remove the tag',
    )


def show(node: Node) -> str:
    """The value as written in the file (never after ${VAR} substitution), for messages."""
    value = node.value
    return repr(value if len(value) <= 60 else value[:57] + "...")


# --------------------------------------------------------------------------- reader


def clean_text(node: Node) -> str | None:
    """The scalar's text when it needs no checking at all, else None.

    The fast path for the common case: an untagged scalar without ${...}
    that is not a YAML null. Everything else goes through `Reader.text`.
    """
    if type(node) is ScalarNode and node.tag is UNTAGGED:
        value = node.value
        if "$" not in value and value not in NULLS:
            return value
    return None


_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")

#: The fields where `${VAR}` reads the environment: secrets and addresses, which differ
#: per deployment. Anywhere else a value from the environment could end up where
#: clients see it (an ACL name is quoted in 403 bodies) or change a rule unseen.
ENV_FIELDS = frozenset(
    {
        "upstream.url",
        "upstream.ca_file",
        "rate_limits.store",
        "server.listen",
        "server.admin_listen",
        "users.jwt.secret",
        "users.jwt.jwks_url",
        "cache.store",
    }
)
ENV_FIELD_PREFIXES = ("upstream.inject.",)


def env_allowed(where: str) -> bool:
    return where in ENV_FIELDS or where.startswith(ENV_FIELD_PREFIXES)


_INT = re.compile(r"[0-9](?:_?[0-9])*")


class Reader:
    """Typed access to nodes; every refusal becomes an issue and a `None` result.

    Callers compare `len(reader.issues)` before and after a group of fields to
    know whether everything they read was valid, so converters need no extra
    error channel.
    """

    __slots__ = ("_expanded", "env", "issues", "merges_left")

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.issues: list[ConfigIssue] = []
        # Merging a shared anchor twice at every level doubles the work per level:
        # bounded, a hostile or careless file is refused instead of taking hours.
        self.merges_left = MAX_MERGES
        # id(node) -> the (name, value) pairs substituted into it: an issue about that
        # node shows `${NAME}` wherever its message would quote the value.
        self._expanded: dict[int, list[tuple[str, str]]] = {}

    def issue(self, node: Node | None, where: str, message: str, hint: str | None = None) -> None:
        if self._expanded:
            if node is not None and id(node) in self._expanded:
                message, hint = self._scrub(self._expanded[id(node)], message, hint)
            message, hint = self._scrub_elsewhere(message, hint)
        # A `keys_file` key's nodes carry their file in their mark (see `keys_file`).
        file = None if node is None else getattr(node.start_mark, "file", None)
        self.issues.append(ConfigIssue(line_of(node), where, message, hint, file))

    def _scrub_elsewhere(self, message: str, hint: str | None) -> tuple[str, str | None]:
        """An issue about one field may quote another (two listeners on one port)."""
        for values in self._expanded.values():
            for name, value in values:
                if len(value) >= 4:
                    message = message.replace(value, f"${{{name}}}")
                    hint = hint.replace(value, f"${{{name}}}") if hint else hint
        return message, hint

    @staticmethod
    def _scrub(
        values: list[tuple[str, str]], message: str, hint: str | None
    ) -> tuple[str, str | None]:
        for name, value in sorted(values, key=lambda nv: -len(nv[1])):
            if value:
                message = message.replace(value, f"${{{name}}}")
                hint = hint.replace(value, f"${{{name}}}") if hint else hint
        # A message may quote part of the value (a parser's "invalid port 'xyz'"):
        # then it says only which variable holds a bad value.
        for _, value in values:
            pieces = {value[i : i + 4] for i in range(max(1, len(value) - 3))}
            if any(p in message for p in pieces if len(p) >= 4 or p == value):
                names = ", ".join(f"${{{n}}}" for n, _ in values)
                message = f"the value read from {names} is not valid here (not shown)"
            if hint and any(p in hint for p in pieces if len(p) >= 4 or p == value):
                hint = None
        return message, hint

    def issue_at(
        self,
        line: int | None,
        where: str,
        message: str,
        hint: str | None = None,
        file: str | None = None,
    ) -> None:
        if self._expanded:
            message, hint = self._scrub_elsewhere(message, hint)
        self.issues.append(ConfigIssue(line, where, message, hint, file))

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
            if type(node) is ScalarNode and not node.style and node.value in NULLS:
                self.issue(node, where, "is empty", "add its fields, or remove it")
            else:
                self.issue(
                    node,
                    where,
                    f"expected a mapping of fields, found {kind_of(node)}",
                    "write its fields indented below it, one 'name: value' per line",
                )
            return None
        if node.tag is not UNTAGGED and node.tag not in _NO_OP_TAGS:
            self.issue(node, where, *_tag_refusal(node.tag))
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
            elif name == "<<" and not key.style and key.tag is UNTAGGED:
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
            self.issue(
                key,
                where,
                f"a field name must be a single word, found {kind_of(key)}",
                "write a plain name before the ':'",
            )
        elif name in found:
            first = next(k for k, _ in node.value if type(k) is ScalarNode and k.value == name)
            self.issue(
                key,
                _join(where, name),
                f"{name!r} appears twice in this mapping (first on line {line_of(first)})",
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
            hint = did_you_mean(name, known | not_yet) or "known fields: " + ", ".join(
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
                self.merges_left -= 1
                if self.merges_left < 0:
                    if self.merges_left == -1:  # said once
                        self.issue(
                            mapping,
                            where,
                            f"more than {MAX_MERGES} '<<' merges in the file",
                            "merge each anchor once per mapping; avoid merges of merges",
                        )
                    return
                if type(mapping) is not MappingNode:
                    self.issue(
                        mapping,
                        where,
                        "'<<' must name a mapping or a list of mappings",
                        "write <<: *anchor, where &anchor marks a mapping",
                    )
                    continue
                if id(mapping) in merging:
                    self.issue(
                        mapping,
                        where,
                        "'<<' merges a mapping into itself",
                        "merge another mapping's anchor, or write the fields out",
                    )
                    continue
                inner = self.fields(mapping, where, known, not_yet, merging)
                for name, value in (inner or {}).items():
                    found.setdefault(name, value)

    # ---- scalars

    def text(self, node: Node, where: str) -> str | None:
        """The scalar's text with ${VAR} substituted; None (and an issue) if absent or invalid."""
        if type(node) is not ScalarNode:
            self.issue(
                node,
                where,
                f"expected a single value, found {kind_of(node)}",
                "write one value after the ':', quoted if it holds ':' or '#'",
            )
            return None
        tag = node.tag
        value = node.value
        if tag is not UNTAGGED and tag not in _NO_OP_TAGS:
            self.issue(node, where, *_tag_refusal(tag))
            return None
        if not node.style and tag is UNTAGGED and value in NULLS:
            self.issue(node, where, "has no value", "write a value, or remove the field")
            return None
        if "$" in value:
            return self._expand(node, where)
        return value

    def _expand(self, node: ScalarNode, where: str) -> str | None:
        problems: list[tuple[str, str]] = []
        allowed = env_allowed(where)
        refused: list[str] = []
        used: list[tuple[str, str]] = []

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
            if not allowed:
                refused.append(name)
                return ""
            value = self.env.get(name)
            if value is None:
                # Names only, never values: the environment holds other secrets too.
                close = difflib.get_close_matches(
                    name, [n for n in self.env if n.upper() == n], n=1, cutoff=0.8
                )
                problems.append(
                    (
                        f"environment variable {name} is not set",
                        f"did you mean ${{{close[0]}}}? ({close[0]} is set)"
                        if close
                        else f"set {name}, or write $${{ for a literal ${{",
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
            used.append((name, value))
            return value

        result = _VAR.sub(substitute, node.value)
        if refused and not problems:
            problems.append(
                (
                    f"${{{refused[0]}}}: environment variables are not read in this field",
                    "write the value itself (or $${ for a literal ${); ${VAR} is read only"
                    " in fields for secrets and addresses: upstream.url, upstream.inject.*,"
                    " upstream.ca_file, rate_limits.store, server.listen, server.admin_listen",
                )
            )
        for message, hint in problems:
            self.issue(node, where, message, hint)
        if used and not problems:
            self._expanded.setdefault(id(node), []).extend(used)
        return None if problems else result

    def string(
        self, node: Node, where: str, pattern: re.Pattern[str], what: str, hint: str
    ) -> str | None:
        value = self.text(node, where)
        if value is not None and pattern.fullmatch(value) is None:
            self.issue(node, where, f"{show(node)} is not a valid {what}", hint)
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
                f"expected true or false, found {show(node)}{note}",
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
            self.issue(node, where, f"expected a whole number {bounds}, found {show(node)}", hint)
            return None
        if len(value) > 1 and value[0] == "0":
            self.issue(
                node,
                where,
                f"{show(node)} has a leading zero",
                "remove it: YAML 1.1 reads 010 as octal 8",
            )
            return None
        number = int(value)
        if number < low or (high is not None and number > high):
            self.issue(node, where, f"must be {bounds}, found {number}", f"write a number {bounds}")
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
                f"expected one of {', '.join(options)}, found {show(node)}",
                did_you_mean(value, options),
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
                f"{show(node)} is not a valid {error.kind}: {error.problem}",
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
            self.issue(node, where, "must be longer than zero", "write a duration like 30s")
            return None
        if maximum is not None and seconds > maximum:
            self.issue(
                node,
                where,
                f"must be at most {maximum:g}s, found {seconds:g}s",
                f"write {maximum:g}s or less",
            )
            return None
        return seconds

    def size(self, node: Node, where: str, low: int, high: int | None = None) -> int | None:
        size = self.unit(node, where, parse_size)
        if size is None:
            return None
        if size < low or (high is not None and size > high):
            bounds = f"at least {low} bytes" if high is None else f"between {low} and {high} bytes"
            self.issue(node, where, f"must be {bounds}, found {size}", f"write a size {bounds}")
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
                f"{show(node)} is not a date or timestamp",
                "write it like 2027-01-01 or 2027-01-01T00:00:00Z (without a zone: UTC)",
            )
        return seconds

    # ---- lists

    def sequence(
        self, node: Node, where: str, *, non_empty: str | None = None, at_most: int | None = None
    ) -> list[Node] | None:
        if type(node) is not SequenceNode:
            if type(node) is ScalarNode and not node.style and node.value in NULLS:
                self.issue(node, where, "has no value", "write a list, or remove the field")
            else:
                self.issue(
                    node,
                    where,
                    f"expected a list, found {kind_of(node)}",
                    "write [a, b] or one '- item' per line",
                )
            return None
        if node.tag is not UNTAGGED and node.tag not in _NO_OP_TAGS:
            self.issue(node, where, *_tag_refusal(node.tag))
            return None
        items = node.value
        if non_empty is not None and not items:
            self.issue(node, where, "is an empty list", non_empty)
            return None
        if at_most is not None and len(items) > at_most:
            self.issue(
                node,
                where,
                f"has {len(items)} entries; at most {at_most} are allowed",
                f"keep at most {at_most}: a wider pattern or CIDR can cover several",
            )
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
            value = clean_text(item)
            if value is None:
                value = self.text(item, f"{where}[{index}]")
            if value is None:
                ok = False
            elif value in seen:
                self.issue(
                    item, f"{where}[{index}]", f"{show(item)} is listed twice", "remove one of them"
                )
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
