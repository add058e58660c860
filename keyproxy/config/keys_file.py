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

Most lines never become nodes: `_Direct` builds the key from the JSON values,
reading each distinct shared value once and checking what is new on every line
(id, hash, ACL names, referers) by the readers' own rules; a line it does not
accept is read from nodes as above, so every message stays the reader's. The
YAML file's own `keys:` list takes the same shortcut for keys of plain values
(`read_yaml_keys`). In a 100,000-key file (bench/decision.py) the load is then
mostly orjson, the id/hash checks, the referer patterns and building the keys.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any, cast

import orjson
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from keyproxy.config.keys_section import HASH_PATTERN, KEY_ID_PATTERN, OPTION_FIELDS, KeyReader
from keyproxy.config.model import Key, KeyType
from keyproxy.config.yaml_reader import NULLS, UNTAGGED

if TYPE_CHECKING:
    from yaml.error import Mark

_EXAMPLE = '{"id": "web", "hash": "sha256:...", "type": "read", "acls": ["get"]}'
#: A closing quote, blanks, then a colon: a field name written `"a" : 1`.
_SPACED_NAME = re.compile(rb'"[ \t\r]+:')
_QUOTED = '"'
#: Fields whose value is different for every key: not worth remembering.
_UNIQUE = frozenset({"id", "hash", "description"})


def _plain_text(node: Node) -> str | None:
    """The text of a scalar that means just what it says (untagged, no `${`, not a null)."""
    if type(node) is not ScalarNode or node.tag is not UNTAGGED:
        return None
    text: str = node.value
    if "$" in text or (not node.style and text in NULLS):
        return None
    return text


def _plain_values(node: Node) -> dict[str, Any] | None:
    """A YAML key as the JSON object a keys file would hold for it, when every field is
    a plain text or a list of them; else None (merges, tags, nulls, `${VAR}`, a field
    twice, a mapping inside): the reader reads such a key from its nodes.

    Where the readers care, they read a scalar the same whether it was quoted or
    not; a text as a JSON string, the shortcut remembers it apart from JSON's
    numbers and booleans, and reads it, the first time, as a quoted scalar.
    """
    if type(node) is not MappingNode or node.tag is not UNTAGGED:
        return None
    value: dict[str, Any] = {}
    for key, item in node.value:
        name = _plain_text(key)
        if name is None or name == "<<":
            return None
        if type(item) is SequenceNode:
            if item.tag is not UNTAGGED:
                return None
            texts = [_plain_text(entry) for entry in item.value]
            if None in texts:
                return None
            value[name] = texts
        else:
            text = _plain_text(item)
            if text is None:
                return None
            value[name] = text
    return value if len(value) == len(node.value) else None


def read_yaml_keys(reader: KeyReader, node: Node) -> None:
    """The YAML file's `keys:` list: keys of plain values by the shortcut the keys file
    takes (see `_Direct`), every other key, and every refused one, by the node reader."""
    direct = _Direct(reader, _Nodes(_Mark("")))
    for item in reader.r.sequence(node, "keys") or []:
        value = _plain_values(item)
        if value is None or not direct.read(value, item.start_mark.line + 1, item):
            reader.read_one(item, item)


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


_STR = frozenset({str})
_ABSENT = object()
#: `Key` built from a list of its fields in order, as its own constructor does with keywords.
_FIELD_AT = {name: at for at, name in enumerate(Key._fields)}
_BLANK_KEY = [Key._field_defaults.get(name) for name in Key._fields]
_LINE_AT, _FILE_AT, _EXPIRES_AT = _FIELD_AT["line"], _FIELD_AT["file"], _FIELD_AT["expires_at"]
_REFERERS_AT = _FIELD_AT["referers"]
assert Key._fields[:4] == ("id", "digest", "type", "acls")
_EXPIRY = ("expires", "ttl", "created")
# What `_Direct.read` does with a field other than the optional ones it remembers by value.
_SKIP = object()  # id, hash, type: read before the fields are walked
_ACLS = object()  # read with the key's type, once every field is known
_TIME = object()  # the expiry group: read together
_DESCRIPTION = object()  # free text: only checked


class _Direct:
    """Builds a key from its JSON values, without nodes, when its other values were read before.

    A registry's keys repeat a few values (a type, ACL lists, rates, dates): each
    distinct value is read once, by `KeyReader`'s own readers, from the node it
    would have had, and what they made of it is remembered under the value and
    its JSON type (`true` is not `1`). Only successes are remembered; a value
    that fails is handed back (`read` returns False) and its issues undone, so the
    whole key is read the usual way and reports exactly what it always did.

    What differs for every key is checked here without nodes, by the readers' own
    rules: an id or hash of the readers' exact pattern, not used before, is all
    they would accept (such text holds no `$`, and a JSON string is never a null);
    a new ACL list is checked against the names the routes allow the key's type;
    a new referer list is parsed by `RefererPattern.parse`. Anything these
    shortcuts do not accept, a duplicate included, is left to the usual way,
    which says why.
    """

    def __init__(self, reader: KeyReader, nodes: _Nodes) -> None:
        self.reader = reader
        self.nodes = nodes
        self.types: dict[str, KeyType] = {}
        # Field name -> what to do with it: for an optional field, the values read so far
        # (a text, a tuple of texts, or (JSON type, value)) -> the `Key` fields it sets,
        # by position; else one of the markers above. A name not here: the usual way.
        self.fields: dict[str, Any] = {name: {} for name in OPTION_FIELDS - {"description"}}
        self.fields.update(id=_SKIP, hash=_SKIP, type=_SKIP, acls=_ACLS, description=_DESCRIPTION)
        self.fields.update(dict.fromkeys(_EXPIRY, _TIME))
        # ACLs by (type as written, *names as listed); the type alone: its default ACLs.
        # Keyed by the type's text: a `KeyType` is hashed by a Python-level method.
        self.acl_lists: dict[Any, frozenset[str]] = {}
        self.acl_sets: dict[frozenset[str], frozenset[str]] = {}  # one object per set
        self.expiries: dict[tuple[Any, ...], float | None] = {}
        index = reader.acl_index
        # The ACL names a key of each type may list, when the routes were all read
        # (else each new list is read by the reader, which then checks nothing).
        self.allowed: dict[KeyType, frozenset[str]] = (
            {
                KeyType.READ: frozenset(index.known & index.read),
                KeyType.WRITE: frozenset(index.known & index.write),
                KeyType.ADMIN: frozenset(index.known),
            }
            if index.complete
            else {}
        )

    def read(self, value: dict[str, Any], line: int, place: Node | int | None = None) -> bool:
        """Read one key and append it; False: nothing was recorded, read it the usual way.

        `place` is what messages about a later key point back at: the key's node in
        the YAML file; by default its `line` (of the keys file).
        """
        reader = self.reader
        key_id = value.get("id")
        digest_text = value.get("hash")
        if (
            type(key_id) is not str
            or KEY_ID_PATTERN.fullmatch(key_id) is None
            or key_id in reader.ids
            or type(digest_text) is not str
            or (match := HASH_PATTERN.fullmatch(digest_text)) is None
        ):
            return False
        digest = bytes.fromhex(match.group(1))
        if digest in reader.digests:
            return False
        type_text = value.get("type")
        if type(type_text) is not str:
            return False
        key_type = self.types.get(type_text)
        if key_type is None:
            key_type = self.miss(type_text, lambda node, where: reader.key_type(node, node, where))
            if key_type is None:
                return False
            self.types[type_text] = key_type
        row = _BLANK_KEY.copy()
        acls: Any = _ABSENT
        expiry: list[Any] | None = None
        fields = self.fields
        for name, item in value.items():
            cache = fields.get(name)
            if cache is _SKIP:
                continue
            if cache is _ACLS:
                acls = item
                continue
            if cache is None:
                return False  # unknown, or `hashes`: the usual way says what to do
            kind = type(item)
            if kind is dict:
                return False
            if kind is str:
                cache_key: Any = item
            elif kind is list:
                if not _STR.issuperset(map(type, item)):
                    return False
                cache_key = tuple(item)
            else:
                cache_key = (kind, item)
            if cache is _TIME:
                if expiry is None:
                    expiry = [None, None, None]
                expiry[_EXPIRY.index(name)] = cache_key
                continue
            if cache is _DESCRIPTION:
                if kind is not str or "$" in item:
                    return False  # the usual way says what is wrong with it
                continue
            found = cache.get(cache_key)
            if found is None:
                found = self.option(name, item, cache_key)
                if found is None:
                    return False
                cache[cache_key] = found
            for at, setting in found:
                row[at] = setting
        if acls is _ABSENT:
            key_acls = self.acl_lists.get(type_text)
        elif type(acls) is list:
            try:
                key_acls = self.acl_lists.get((type_text, *acls))
            except TypeError:  # a list or object in the list: the usual way refuses it
                return False
        else:
            return False  # not a list: the usual way says so
        if key_acls is None:
            key_acls = self.new_acls(type_text, key_type, acls)
            if key_acls is None:
                return False
        if expiry is not None:
            expiry_key = tuple(expiry)
            expires_at = self.expiries.get(expiry_key, _ABSENT)
            if expires_at is _ABSENT:
                expires_at = self.read_expiry(value)
                if expires_at is _ABSENT:
                    return False
                self.expiries[expiry_key] = expires_at
            row[_EXPIRES_AT] = expires_at
        # Every value is valid: record the key as `KeyReader.key` would.
        index = len(reader.places)
        reader.places.append(line if place is None else place)
        reader.ids[key_id] = index
        reader.digests[digest] = index
        row[0], row[1], row[2], row[3] = key_id, digest, key_type, key_acls
        row[_LINE_AT] = line
        row[_FILE_AT] = reader.file
        reader.keys.append(tuple.__new__(Key, row))
        return True

    def new_acls(self, type_text: str, key_type: KeyType, acls: Any) -> frozenset[str] | None:
        """The ACLs of a list (or, `_ABSENT`, of a type) not seen before; None if refused."""
        reader = self.reader
        if acls is _ABSENT:  # the type's default ACLs
            found = self.miss("", lambda node, where: reader.acls(None, node, key_type, where))
            if found is not None:
                self.acl_lists[type_text] = found
            return found
        if not _STR.issuperset(map(type, acls)):
            return None
        allowed = self.allowed.get(key_type)
        if allowed is not None:
            # Names the routes allow this type, each listed once: all the reader checks
            # in a list of JSON strings (an ACL name holds no `$`, so none is expanded).
            names = frozenset(acls)
            if not (names and len(names) == len(acls) and names <= allowed):
                return None
            found = self.acl_sets.setdefault(names, names)
        else:
            found = self.miss(acls, lambda node, where: reader.acls(node, node, key_type, where))
            if found is None:
                return None
        self.acl_lists[(type_text, *acls)] = found
        return found

    def option(self, name: str, item: Any, cache_key: Any) -> tuple[tuple[int, Any], ...] | None:
        """The `Key` fields a value not seen before sets, or None if it is refused."""
        reader = self.reader
        if name == "referers" and type(cache_key) is tuple:
            # Usually different for every key: parsed without nodes. The usual way
            # reads a list this refuses again, from nodes, to say what is wrong.
            patterns = reader.referers_of_texts(cache_key)
            return None if patterns is None else ((_REFERERS_AT, patterns),)

        def read(node: Node, where: str) -> tuple[tuple[int, Any], ...]:
            options: dict[str, Any] = {}
            reader.option(name, node, where, options)
            return tuple((_FIELD_AT[field], value) for field, value in options.items())

        return self.miss(item, read)

    def read_expiry(self, value: dict[str, Any]) -> Any:
        """The expiry group's time, by the reader; `_ABSENT` if refused (issues undone)."""
        reader = self.reader
        issues = reader.r.issues
        before = len(issues)
        nodes = {n: self.nodes.node(value[n]) for n in _EXPIRY if n in value}
        expires_at = reader.expiry(nodes, f"keys[{len(reader.places)}]")
        if len(issues) != before:
            del issues[before:]
            return _ABSENT
        return expires_at

    def miss(self, item: Any, read: Any) -> Any:
        """`read` the node of a value not seen before; None if it was refused (issues undone)."""
        reader = self.reader
        issues = reader.r.issues
        before = len(issues)
        result = read(self.nodes.node(item), f"keys[{len(reader.places)}]")
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
    # Without a backslash or a blank after a quote anywhere, `_may_repeat` is the count.
    plain = not (b"\\" in data or b'" ' in data or b'"\t' in data or b'"\r' in data)
    for number, line in enumerate(data.split(b"\n")):
        mark.line = number
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            if not line.strip():
                continue
            r.issue_at(
                number + 1,
                f"keys[{len(reader.places)}]",
                f"invalid JSON at column {error.colno}: {error.msg}",
                "each line holds one whole JSON object, like " + _EXAMPLE,
                file=path,
            )
            reader.places.append(number + 1)
            continue
        if type(value) is not dict:
            r.issue_at(
                number + 1,
                f"keys[{len(reader.places)}]",
                "expected one JSON object on this line",
                "write each key as one object, like " + _EXAMPLE,
                file=path,
            )
            reader.places.append(number + 1)
            continue
        if (
            line.count(b'":') == len(value) if plain else not _may_repeat(line, len(value))
        ) and direct.read(value, number + 1):
            continue
        nodes.fields = 0
        key_node = nodes.node(value)
        if _may_repeat(line, nodes.fields) and (repeated := _repeated_field(line)) is not None:
            r.issue_at(
                number + 1,
                f"keys[{len(reader.places)}].{repeated}",
                f"{repeated!r} appears twice in this object",
                "remove one of them: JSON readers silently keep only the last",
                file=path,
            )
            reader.places.append(number + 1)
            continue
        reader.read_one(key_node, number + 1)
    reader.end_file()
    return path
