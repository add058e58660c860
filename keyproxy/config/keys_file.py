"""`keys_file:`, a registry of generated keys as JSON lines, read by the same key reader.

YAML suits the keys people write by hand; a registry a program generates can
hold 100,000 keys, and composing that much YAML takes seconds and several
hundred MB. A JSON-lines file holds one key per line, as a JSON object with
exactly the fields a YAML key has: orjson parses a line in about a microsecond,
and only one line's values exist at a time.

Each line is turned into the YAML nodes the key would have had (strings as
quoted scalars, numbers and `true`/`false` as plain ones), marked with the
file and line, and handed to `KeyReader.key`: one validator for both files,
with the same messages and hints, pointing at `keys.jsonl:LINE`.

JSON itself would let an object repeat a field and keep the last, silently
(`"revoked": true, ..., "revoked": false`); a repeated field is refused, as in
YAML. Values many keys share are given the same node (each node reports the
line being read, see `_Mark`), so a line costs few objects.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any, cast

import orjson
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from keyproxy.config.keys_section import OPTION_FIELDS, KeyReader
from keyproxy.config.model import Key, KeyType
from keyproxy.config.yaml_reader import UNTAGGED

if TYPE_CHECKING:
    from yaml.error import Mark

_EXAMPLE = '{"id": "web", "hash": "sha256:...", "type": "read", "acls": ["get"]}'
#: A closing quote, blanks, then a colon: a field name written `"a" : 1`.
_SPACED_NAME = re.compile(rb'"[ \t\r]+:')
_QUOTED = '"'
#: Fields whose value is different for every key: not worth remembering.
_UNIQUE = frozenset({"id", "hash", "description"})


class _Mark:
    """Where the key being read sits: one object per file, moved from line to line.

    The nodes of a line are read, and every issue about them recorded, before the
    next line is read, so all of them may share it; issues copy the line number.
    """

    __slots__ = ("file", "line")

    def __init__(self, file: str) -> None:
        self.file = file
        self.line = 0  # 0-based, as YAML's marks


class _Nodes:
    """JSON values -> the nodes YAML would have composed for them."""

    def __init__(self, mark: _Mark) -> None:
        # Nodes take a yaml `Mark`; the readers use only its `line` (and the file), which
        # this stand-in has: one object for a whole file instead of two per node.
        self.mark = cast("Mark", mark)
        self.scalars: dict[str, ScalarNode] = {}  # quoted strings, names included
        self.lists: dict[tuple[str, ...], SequenceNode] = {}
        self.fields = 0  # object fields converted (the duplicate check counts them)

    def quoted(self, text: str) -> ScalarNode:
        node = self.scalars.get(text)
        if node is None:
            mark = self.mark
            node = ScalarNode(UNTAGGED, text, mark, mark, _QUOTED)
            if len(self.scalars) < 100_000:
                self.scalars[text] = node
        return node

    def node(self, value: Any) -> Node:
        kind = type(value)
        if kind is str:
            return self.quoted(value)
        mark = self.mark
        if kind is list:
            if all(type(item) is str for item in value):
                texts = tuple(value)
                cached = self.lists.get(texts)
                if cached is None:
                    cached = SequenceNode(UNTAGGED, [self.quoted(t) for t in value], mark, mark)
                    if len(self.lists) < 100_000:
                        self.lists[texts] = cached
                return cached
            return SequenceNode(UNTAGGED, [self.node(item) for item in value], mark, mark)
        if kind is dict:
            self.fields += len(value)
            pairs = [
                (
                    self.quoted(name),
                    ScalarNode(UNTAGGED, item, mark, mark, _QUOTED)
                    if name in _UNIQUE and type(item) is str
                    else self.node(item),
                )
                for name, item in value.items()
            ]
            return MappingNode(UNTAGGED, pairs, mark, mark)
        if kind is bool:
            text = "true" if value else "false"
        elif value is None:
            text = "null"
        else:  # a number: its text, as YAML would hold it
            text = str(value)
        return ScalarNode(UNTAGGED, text, mark, mark)


#: Read for every key: never the same value twice (description: free text, only checked).
_PER_KEY = frozenset({"id", "hash", "type", "description"})
_EXPIRY = ("expires", "ttl", "created")
_STR = frozenset({str})
_ABSENT = object()
#: `Key` built from a list of its fields in order, as its own constructor does with keywords.
_FIELD_AT = {name: at for at, name in enumerate(Key._fields)}
_BLANK_KEY = [Key._field_defaults.get(name) for name in Key._fields]
_LINE_AT, _FILE_AT, _EXPIRES_AT = _FIELD_AT["line"], _FIELD_AT["file"], _FIELD_AT["expires_at"]
assert Key._fields[:4] == ("id", "digest", "type", "acls")


class _Direct:
    """Builds a key from its JSON values, without nodes, when its other values were read before.

    A registry's keys repeat a few values (a type, ACL lists, rates, dates): each
    distinct value is read once, by `KeyReader`'s own readers, from the node it
    would have had, and what they made of it is remembered under the value and
    its JSON type (`true` is not `1`). Only successes are remembered; a value
    that fails is handed back (`read` returns False) and its issues undone, so the
    whole key is read the usual way and reports exactly what it always did. The
    id, hash and description are checked for every key, by the same readers.
    """

    def __init__(self, reader: KeyReader, nodes: _Nodes) -> None:
        self.reader = reader
        self.nodes = nodes
        self.types: dict[str, KeyType] = {}
        # (name, JSON type, value) -> the `Key` fields it sets, by position; acls: by type too.
        self.values: dict[tuple[Any, ...], tuple[tuple[int, Any], ...]] = {}
        self.acls: dict[tuple[KeyType, Any], frozenset[str]] = {}
        self.expiries: dict[tuple[Any, ...], float | None] = {}

    def read(self, value: dict[str, Any], line: int) -> bool:
        """Read one key (appending it, or its id/hash issues); False: read it the usual way."""
        key_id = value.get("id")
        digest_text = value.get("hash")
        type_text = value.get("type")
        description = value.get("description", _ABSENT)
        if (
            type(key_id) is not str
            or type(digest_text) is not str
            or type(type_text) is not str
            or not (description is _ABSENT or type(description) is str)
        ):
            return False
        reader = self.reader
        index = len(reader.places)
        where = f"keys[{index}]"
        key_type = self.types.get(type_text)
        if key_type is None:
            key_type = self.miss(lambda node: reader.key_type(node, node, where), type_text)
            if key_type is None:
                return False
            self.types[type_text] = key_type
        settings: list[tuple[int, Any]] = []
        acls: Any = _ABSENT
        expiry: list[Any] | None = None
        values = self.values
        for name, item in value.items():
            if name in _PER_KEY:
                continue
            kind = type(item)
            if kind is list:
                texts = tuple(item)
                if not _STR.issuperset(map(type, texts)):
                    return False
                cache_key: tuple[Any, ...] = (name, kind, texts)
            elif kind is dict:
                return False
            else:
                cache_key = (name, kind, item)
            if name == "acls":
                # Read alone, each name is checked on its own: the order cannot matter.
                names = frozenset(texts) if kind is list else None
                acls = (kind, names if names and len(names) == len(texts) else cache_key[2])
                continue
            if name in _EXPIRY:
                if expiry is None:
                    expiry = [None, None, None]
                expiry[_EXPIRY.index(name)] = cache_key
                continue
            found = values.get(cache_key)
            if found is None:
                if name not in OPTION_FIELDS:
                    return False  # unknown, or `hashes`: the usual way says what to do
                found = self.miss(lambda node, n=name: self.option(n, node, where), item)
                if found is None:
                    return False
                values[cache_key] = found
            settings += found
        acl_key = (key_type, acls)
        key_acls = self.acls.get(acl_key)
        if key_acls is None:
            if acls is _ABSENT:  # the type's default ACLs
                key_acls = self.miss(lambda node: reader.acls(None, node, key_type, where), "")
            else:
                key_acls = self.miss(
                    lambda node: reader.acls(node, node, key_type, where), value["acls"]
                )
            if key_acls is None:
                return False
            self.acls[acl_key] = key_acls
        if expiry is not None:
            expiry_key = tuple(expiry)
            expires_at = self.expiries.get(expiry_key, _ABSENT)
            if expires_at is _ABSENT:
                before = len(reader.r.issues)
                nodes = {n: self.nodes.node(value[n]) for n in _EXPIRY if n in value}
                expires_at = reader.expiry(nodes, where)
                if len(reader.r.issues) != before:
                    del reader.r.issues[before:]
                    return False
                self.expiries[expiry_key] = expires_at
            settings.append((_EXPIRES_AT, expires_at))
        # Every shared value is valid: the key's own ones decide, as in `KeyReader.key`.
        reader.places.append(line)
        issues = reader.r.issues
        before = len(issues)
        mark = self.nodes.mark
        id_node = ScalarNode(UNTAGGED, key_id, mark, mark, _QUOTED)
        digest_node = ScalarNode(UNTAGGED, digest_text, mark, mark, _QUOTED)
        checked_id = reader.key_id(id_node, id_node, where, index)
        digest = reader.digest(digest_node, digest_node, where, index)
        if description is not _ABSENT:
            reader.option(
                "description", ScalarNode(UNTAGGED, description, mark, mark, _QUOTED), where, {}
            )
        if len(issues) != before or checked_id is None or digest is None:
            return True
        row = _BLANK_KEY.copy()
        row[0], row[1], row[2], row[3] = checked_id, digest, key_type, key_acls
        row[_LINE_AT] = line
        row[_FILE_AT] = reader.file
        for at, setting in settings:
            row[at] = setting
        reader.keys.append(tuple.__new__(Key, row))
        return True

    def option(self, name: str, node: Node, where: str) -> tuple[tuple[int, Any], ...] | None:
        options: dict[str, Any] = {}
        self.reader.option(name, node, where, options)
        return tuple((_FIELD_AT[field], value) for field, value in options.items())

    def miss(self, read: Any, item: Any) -> Any:
        """`read` the node of a value not seen before; None if it was refused (issues undone)."""
        issues = self.reader.r.issues
        before = len(issues)
        result = read(self.nodes.node(item))
        if len(issues) != before:
            del issues[before:]
            return None
        return result


def _repeated_field(line: bytes) -> str | None:
    """The name of a field an object of this line repeats, if any (the slow, exact way)."""
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in items]
        if not found and len(set(names)) != len(names):
            found.append(next(n for n in names if names.count(n) > 1))
        return dict(items)

    json.loads(line, object_pairs_hook=pairs)
    return found[0] if found else None


def _may_repeat(line: bytes, fields: int) -> bool:
    """False when no object of the line can repeat a field, known without a second parse.

    Without a backslash every `"` delimits a string, so each field name written
    as `"name":` adds one `":` and a repeated name adds one more than the parsed
    objects hold (a string value starting with `:` adds one too: then the exact
    check runs). Names written with blanks before the colon are counted by the
    exact check only.
    """
    if b"\\" in line or line.count(b'":') != fields:
        return True
    # Without a blank after a quote the pattern cannot match: spare most lines the search.
    blank_after_quote = b'" ' in line or b'"\t' in line or b'"\r' in line
    return blank_after_quote and _SPACED_NAME.search(line) is not None


def read_keys_file(reader: KeyReader, node: Node, config_dir: str) -> str | None:
    """Read every key of the file `node` names; its absolute path, or None if unreadable."""
    r = reader.r
    name = r.text(node, "keys_file")
    if name is None:
        return None
    path = os.path.abspath(os.path.join(config_dir, name))
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        r.issue(
            node,
            "keys_file",
            f"cannot read {path}: {error.strerror or error}",
            "give the path of a JSON-lines file of keys, relative to this file "
            "(one JSON object per line, like " + _EXAMPLE + ")",
        )
        return None
    mark = _Mark(path)
    nodes = _Nodes(mark)
    direct = _Direct(reader, nodes)
    reader.begin_file(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        mark.line = number
        where = f"keys[{len(reader.places)}]"
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            r.issue_at(
                number + 1,
                where,
                f"invalid JSON at column {error.colno}: {error.msg}",
                "each line holds one whole JSON object, like " + _EXAMPLE,
                file=path,
            )
            reader.places.append(number + 1)
            continue
        if type(value) is not dict:
            r.issue_at(
                number + 1,
                where,
                "expected one JSON object on this line",
                "write each key as one object, like " + _EXAMPLE,
                file=path,
            )
            reader.places.append(number + 1)
            continue
        if not _may_repeat(line, len(value)) and direct.read(value, number + 1):
            continue
        nodes.fields = 0
        key_node = nodes.node(value)
        if _may_repeat(line, nodes.fields) and (repeated := _repeated_field(line)) is not None:
            r.issue_at(
                number + 1,
                f"{where}.{repeated}",
                f"{repeated!r} appears twice in this object",
                "remove one of them: JSON readers silently keep only the last",
                file=path,
            )
            reader.places.append(number + 1)
            continue
        reader.read_one(key_node, number + 1)
    reader.end_file()
    return path
