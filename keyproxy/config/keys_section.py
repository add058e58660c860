"""The `keys` section: every key's hash, type, ACLs and optional constraints."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from keyproxy.config.model import Key, KeyHash, KeyType, Rate
from keyproxy.config.response_sections import read_fields
from keyproxy.config.routes_section import AclIndex
from keyproxy.config.units import parse_rate
from keyproxy.config.yaml_reader import (
    NULLS,
    UNTAGGED,
    Reader,
    clean_text,
    did_you_mean,
    line_of,
    show,
)
from keyproxy.policy import allowlists

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
        "hashes",
        "mode",
        "scopes",
        "roles",
        "fields",
    }
)
_KEY_NOT_YET: frozenset[str] = frozenset()
_KEY_CORE = frozenset({"id", "hash", "type", "acls"})
_KEY_EXPIRY = frozenset({"expires", "ttl", "created"})
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
KEY_ID_RULE = "1 to 64 letters, digits, '.', '_' or '-'"
_HASH = re.compile(r"sha256:([0-9a-fA-F]{64})")
#: A key id and a `hash` as the readers accept them (the keys file checks its own with them).
KEY_ID_PATTERN, HASH_PATTERN = _KEY_ID, _HASH
_KEY_TYPES = {t.value: t for t in KeyType}
_QUOTA_PERIODS = ("day", "week", "month")
_QUOTA = re.compile(r"([0-9]+)/([A-Za-z]+)")
_MAX_HASHES = 10
_MAX_WINDOWS = 5
_MAX_ALLOWLIST = 100

T = TypeVar("T")


def valid_key_id(key_id: str) -> bool:
    """Whether `key_id` is an id the loader accepts (for `keygen --id`)."""
    return _KEY_ID.fullmatch(key_id) is not None


def _raw_texts(node: Node) -> tuple[str, ...] | None:
    """A list's texts as a cache key, when every item is a clean scalar; else None.

    Only clean items (untagged, not a null, no ${VAR}) mean exactly what they say,
    so only such lists may share a parsed result: `[null]` or a tagged item must be
    read, and refused, every time, whatever an earlier key wrote.
    """
    if type(node) is not SequenceNode or node.tag is not UNTAGGED:
        return None
    items = node.value
    raw = tuple(
        [
            item.value  # clean_text, inlined: this runs for every list of 100k keys
            for item in items
            if type(item) is ScalarNode
            and item.tag is UNTAGGED
            and "$" not in item.value
            and item.value not in NULLS
        ]
    )
    return raw if len(raw) == len(items) else None


class KeyReader:
    """Reads the key list; fast because 100k keys mostly repeat a few shapes.

    Values that many keys share (ACL lists, CIDR lists, referers, rates,
    timestamps) are parsed once and the parsed, immutable object is reused.
    Only successful results are cached: a bad value is re-read for every key
    that uses it, so each occurrence gets its own issue and line.
    """

    def __init__(self, reader: Reader, acls: AclIndex) -> None:
        self.r = reader
        self.acl_index = acls
        self.defaults = {t: acls.default_for(t) for t in KeyType}
        # Caches keyed by the text as written (see `_raw_texts`).
        self.acl_cache: dict[tuple[KeyType | None, tuple[str, ...] | None], frozenset[str]] = {}
        self.ip_cache: dict[tuple[str, ...], allowlists.IpAllowlist] = {}
        self.referer_cache: dict[tuple[str, ...], tuple[allowlists.RefererPattern, ...]] = {}
        self.rate_cache: dict[str, Rate] = {}
        self.time_cache: dict[str, float] = {}
        self.ids: dict[str, int] = {}  # key id -> index of the key that has it first
        self.digests: dict[bytes, int] = {}
        # Rotated keys: each key's (digest, KeyHash) pairs, newest first, for the loader's
        # index; and the digests of the key being read (a hash listed twice in one key).
        self.rotations: dict[bytes, list[tuple[bytes, KeyHash]]] = {}
        self.seen_in_key: set[bytes] = set()
        # Each key's line, by index (a YAML key's node, a `keys_file` key's line number),
        # for messages that point back at an earlier key; and the file they are in.
        self.places: list[Node | int] = []
        self.files: list[tuple[int, str]] = []  # (first index, path) of each keys file
        self.file: str | None = None  # the keys file being read; None: the YAML file
        self.keys: list[Key] = []

    def begin_file(self, path: str) -> None:
        """The keys read next come from the `keys_file` at `path`."""
        self.file = path
        self.files.append((len(self.places), path))

    def end_file(self) -> None:
        self.file = None

    def read_one(self, node: Node, line: Node | int) -> None:
        """One key, numbered after every key read before it; `line`: its line in a keys
        file, or its node in the YAML file (what messages about later keys point at)."""
        index = len(self.places)
        self.places.append(line)
        key = self.key(node, index)
        if key is not None:
            self.keys.append(key)

    def index(self, keys: tuple[Key, ...]) -> dict[bytes, Key]:
        """Digest -> key; a rotated key's older hashes map to copies that say which hash."""
        by_digest = {key.digest: key for key in keys}
        if self.rotations:
            for key in keys:
                if key.rotation is not None:
                    for digest, entry in self.rotations[key.digest][1:]:
                        by_digest[digest] = key._replace(rotation=entry)
        return by_digest

    def key(self, node: Node, index: int) -> Key | None:
        r = self.r
        where = f"keys[{index}]"
        fields = r.fields(node, where, _KEY_FIELDS, _KEY_NOT_YET)
        if fields is None:
            return None
        before = len(r.issues)
        key_id = self.key_id(fields.get("id"), node, where, index)
        rotation = None
        if "hashes" in fields:
            digest, rotation = self.hashes(fields, where, index)
        else:
            digest = self.digest(fields.get("hash"), node, where, index)
        key_type = self.key_type(fields.get("type"), node, where)
        acls = self.acls(fields.get("acls"), node, key_type, where)
        options = {} if fields.keys() <= _KEY_CORE else self.options(fields, where)
        if (
            len(r.issues) != before
            or key_id is None
            or digest is None
            or key_type is None
            or acls is None
        ):
            return None
        return Key(
            id=key_id,
            digest=digest,
            type=key_type,
            acls=acls,
            line=node.start_mark.line + 1,
            rotation=rotation,
            file=self.file,
            **options,
        )

    def options(self, fields: dict[str, Node], where: str) -> dict[str, Any]:
        """The optional constraints of one key, by `Key` field name (values of several
        types, which `Key` itself declares)."""
        options: dict[str, Any] = {}
        for name, node in fields.items():
            if name in _KEY_CORE or name in _KEY_EXPIRY or name == "hashes":
                continue
            self.option(name, node, where, options)
        if not fields.keys().isdisjoint(_KEY_EXPIRY):
            options["expires_at"] = self.expiry(fields, where)
        return options

    def option(self, name: str, node: Node, where: str, options: dict[str, Any]) -> None:
        """Read one optional field (not the expiry group) into `options`, by `Key` field name."""
        value = _KEY_OPTION_READERS[name](self, node, f"{where}.{name}")
        if name == "quota" and value is not None:
            options["quota"], options["quota_period"] = value  # type: ignore[misc]  # quota reads a pair
        elif name == "mode":
            options["report"] = value
        elif name != "description":
            options[name] = value

    def quota(self, node: Node, where: str) -> tuple[int, str | None] | None:
        """A lifetime total (`5000`) or a count that refills each UTC period (`100000/month`)."""
        text = clean_text(node)
        match = None if text is None else _QUOTA.fullmatch(text)
        if match is None:
            total = self.r.integer(node, where, 1)
            return None if total is None else (total, None)
        count, period = match.groups()
        if period not in _QUOTA_PERIODS:
            self.r.issue(
                node,
                where,
                f"a quota refills per day, week or month, not per {period!r}",
                "write a count like 100000/month, or a bare number for a lifetime total; "
                "for shorter periods use rate_limit",
            )
            return None
        counted = ScalarNode(UNTAGGED, count, node.start_mark, node.end_mark)
        total = self.r.integer(counted, where, 1)
        return None if total is None else (total, period)

    def mode(self, node: Node, where: str) -> bool:
        """`report` (True): refusals after the credential check are recorded, not enforced."""
        return self.r.choice(node, where, ("enforce", "report")) == "report"

    def hashes(
        self, fields: dict[str, Node], where: str, index: int
    ) -> tuple[bytes | None, KeyHash | None]:
        """A rotated key's hashes, newest first: (the newest digest, its `KeyHash`).

        The older ones are kept in `self.rotations` for the loader's digest index.
        """
        node = fields["hashes"]
        if "hash" in fields:
            self.r.issue(
                fields["hash"],
                where + ".hash",
                "set either hash or hashes, not both",
                "move this hash into the hashes list (newest first)",
            )
            return None, None
        items = self.r.sequence(
            node,
            where + ".hashes",
            non_empty="write the new hash first, then the old ones",
            at_most=_MAX_HASHES,
        )
        if items is None:
            return None, None
        before = len(self.r.issues)
        self.seen_in_key = set()
        found: list[tuple[bytes, KeyHash]] = []
        for position, item in enumerate(items):
            at = f"{where}.hashes[{position}]"
            until: float | None = None
            if type(item) is MappingNode:
                entry = self.r.fields(item, at, frozenset({"hash", "until"}))
                if entry is None:
                    continue
                if "hash" not in entry:
                    self.r.issue(
                        item, at, "'hash' is required", 'write {hash: "sha256:...", until: ...}'
                    )
                    continue
                if "until" in entry:
                    until = self.time(entry["until"], at + ".until")
                hash_node = entry["hash"]
            else:
                hash_node = item
            digest = self.digest(hash_node, item, at, index, field="")
            if digest is not None:
                found.append((digest, KeyHash(position, "sha256:" + digest.hex()[:8], until)))
        if len(self.r.issues) != before or not found:
            return None, None
        self.rotations[found[0][0]] = found
        return found[0][0], found[0][1]

    def revoked(self, node: Node, where: str) -> bool:
        return bool(self.r.boolean(node, where))

    def description(self, node: Node, where: str) -> None:
        self.r.text(node, where)  # free text: only its shape is checked

    def scalar(self, node: Node, where: str, name: str) -> str | None:
        """`Reader.text` for one field of a key, without building its path unless needed."""
        value = clean_text(node)
        return value if value is not None else self.r.text(node, f"{where}.{name}")

    def place(self, index: int) -> str:
        """Where key `index` is, for a message about another: `line 12` or `keys.jsonl:12`."""
        place = self.places[index]
        if type(place) is not int:
            return f"line {line_of(place)}"  # type: ignore[arg-type]  # a node
        path = next(path for first, path in reversed(self.files) if first <= index)
        return f"{path}:{place}"

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
                f"{show(node)} is not a valid key id",
                f"use {KEY_ID_RULE}",
            )
            return None
        first = self.ids.setdefault(key_id, index)
        if first != index:
            self.r.issue(
                node,
                where + ".id",
                f"key id {key_id!r} is already used by keys[{first}] ({self.place(first)})",
                "every key needs its own id",
            )
            return None
        return key_id

    def digest(
        self, node: Node | None, parent: Node, where: str, index: int, field: str = ".hash"
    ) -> bytes | None:
        if node is None:
            self.r.issue(
                parent,
                where,
                "'hash' is required",
                "run `keyproxy keygen`: it prints a key and the hash line to paste",
            )
            return None
        text = self.scalar(node, where, "hash") if field else self.r.text(node, where)
        if text is None:
            return None
        match = _HASH.fullmatch(text)
        if match is None:
            looks_like_key = text.startswith(("pk_", "sk_"))
            self.r.issue(
                node,
                where + field,
                "expected sha256: followed by 64 hexadecimal characters",
                "this looks like a key itself: never store keys here, only the hash that "
                "`keyproxy keygen` prints"
                if looks_like_key
                else "run `keyproxy keygen` to get one",
            )
            return None
        digest = bytes.fromhex(match.group(1))
        first = self.digests.setdefault(digest, index)
        twice = not field and digest in self.seen_in_key
        if not field:
            self.seen_in_key.add(digest)
        if first != index or twice:
            self.r.issue(
                node,
                where + field,
                f"the same hash is already used by keys[{first}] ({self.place(first)})"
                if first != index
                else "this hash appears twice in the key's hashes",
                "every key needs its own secret: generate a new one with `keyproxy keygen`",
            )
            return None
        return digest

    def key_type(self, node: Node | None, parent: Node, where: str) -> KeyType | None:
        if node is None:
            self.r.issue(parent, where, "'type' is required", "add type: read, write or admin")
            return None
        value = self.scalar(node, where, "type")
        key_type = _KEY_TYPES.get(value)  # type: ignore[arg-type]  # None (unreadable) finds nothing
        if key_type is None and value is not None:
            self.r.issue(
                node,
                where + ".type",
                f"expected read, write or admin, found {show(node)}",
                did_you_mean(value, _KEY_TYPES),
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
        result = frozenset([value for _, value in items])
        if raw is not None:
            self.acl_cache[(key_type, raw)] = result
        return result

    def check_acl(self, node: Node, where: str, name: str, key_type: KeyType | None) -> None:
        index = self.acl_index
        if not index.complete:
            return
        if name not in index.known:
            known = ", ".join(sorted(index.known))
            hint = did_you_mean(name, index.known)
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

    def allowlist(
        self,
        node: Node,
        where: str,
        cache: dict[tuple[str, ...], T],
        non_empty: str,
        build: Callable[[Node, str, list[tuple[Node, str]]], T | None],
    ) -> T | None:
        """A key's list of allowed values, parsed by `build`, once per distinct text.

        Only lists of clean scalars are remembered (see `_raw_texts`).
        """
        raw = _raw_texts(node)
        cached = cache.get(raw)  # type: ignore[arg-type]  # None (not cacheable) finds nothing
        if cached is not None:
            return cached
        items = self.r.texts(node, where, non_empty=non_empty, at_most=_MAX_ALLOWLIST)
        if items is None:
            return None
        result = build(node, where, items)
        if result is not None and raw is not None:
            cache[raw] = result
        return result

    def referers(self, node: Node, where: str) -> tuple[allowlists.RefererPattern, ...] | None:
        return self.allowlist(
            node, where, self.referer_cache, "omit referers to allow any referer", self._patterns
        )

    def referers_of_texts(
        self, texts: tuple[str, ...]
    ) -> tuple[allowlists.RefererPattern, ...] | None:
        """`referers` for a list of quoted texts, without nodes; None where the node
        reader has something to say (it is then asked, to say it).

        Such texts are each read as written unless they hold a `$`, so the rules
        left are `texts`' (1 to 100 entries, none twice) and each pattern's own.
        """
        cached = self.referer_cache.get(texts)
        if cached is not None:
            return cached
        if not 0 < len(texts) <= _MAX_ALLOWLIST or len(set(texts)) != len(texts):
            return None
        patterns = []
        for text in texts:
            if "$" in text:
                return None
            try:
                patterns.append(allowlists.RefererPattern.parse(text))
            except ValueError:
                return None
        return tuple(patterns)

    def ips(self, node: Node, where: str) -> allowlists.IpAllowlist | None:
        return self.allowlist(
            node, where, self.ip_cache, "omit ips to allow any address", self._cidrs
        )

    def _patterns(
        self, node: Node, where: str, items: list[tuple[Node, str]]
    ) -> tuple[allowlists.RefererPattern, ...] | None:
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
        return tuple(patterns) if len(patterns) == len(items) else None

    def _cidrs(
        self, node: Node, where: str, items: list[tuple[Node, str]]
    ) -> allowlists.IpAllowlist | None:
        try:
            return allowlists.IpAllowlist.parse([value for _, value in items])
        except ValueError as error:
            self.locate_bad_cidrs(node, where, items, error)
            return None

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
            self.r.issue(
                node, where, str(error), "list addresses or CIDR blocks, like [10.0.0.0/8, ::1]"
            )

    def rate(self, node: Node, where: str) -> Rate | tuple[Rate, ...] | None:
        if type(node) is SequenceNode:
            return self.windows(node, where)
        return self.one_rate(node, where)

    def windows(self, node: Node, where: str) -> Rate | tuple[Rate, ...] | None:
        """Several windows, `[10/second, 1000/hour]`: a request must fit every one."""
        items = self.r.sequence(
            node, where, non_empty="omit rate_limit for no limit", at_most=_MAX_WINDOWS
        )
        if items is None:
            return None
        found = [self.one_rate(item, f"{where}[{i}]") for i, item in enumerate(items)]
        rates = [rate for rate in found if rate is not None]
        if len(rates) != len(found):
            return None
        periods = [rate.period for rate in rates]
        if len(set(periods)) != len(periods):
            self.r.issue(
                node, where, "two windows have the same period", "keep the smaller count only"
            )
            return None
        return rates[0] if len(rates) == 1 else tuple(rates)

    def one_rate(self, node: Node, where: str) -> Rate | None:
        # Only an untagged scalar may be cached: a tagged one must go through the tag
        # check every time, and a list or mapping is refused by the reader.
        plain = type(node) is ScalarNode and node.tag is UNTAGGED
        if plain and (cached := self.rate_cache.get(node.value)) is not None:
            return cached
        rate = self.r.unit(node, where, parse_rate)
        if rate is not None and plain:
            self.rate_cache[node.value] = rate
        return rate

    def time(self, node: Node, where: str) -> float | None:
        plain = type(node) is ScalarNode and node.tag is UNTAGGED
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
                self.r.issue(
                    ttl,
                    where + ".ttl",
                    "set either expires or ttl, not both",
                    "keep expires (a time) or ttl with created, and remove the other",
                )
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
_KEY_OPTION_READERS: dict[str, Callable[[KeyReader, Node, str], object]] = {
    "referers": KeyReader.referers,
    "ips": KeyReader.ips,
    "rate_limit": KeyReader.rate,
    "quota": KeyReader.quota,
    "revoked": KeyReader.revoked,
    "description": KeyReader.description,
    "mode": KeyReader.mode,
    "scopes": lambda reader, node, where: _scopes(reader.r, node, where),
    "roles": lambda reader, node, where: _roles(reader.r, node, where),
    "fields": lambda reader, node, where: read_fields(reader.r, node, where),
}

#: The optional fields `KeyReader.option` reads.
OPTION_FIELDS = frozenset(_KEY_OPTION_READERS)

_SCOPE = re.compile(r"(\*|[a-z0-9_-]{1,64}):(\*|create|read|update|delete|list)")
_ROLE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _scopes(r: Reader, node: Node, where: str) -> frozenset[str] | None:
    """`table:op`, `*:op` or `table:*`: checked before roles, even for admin keys."""
    items = r.texts(node, where, non_empty="omit scopes to allow every table and operation")
    if items is None:
        return None
    ok = True
    for position, (item, text) in enumerate(items):
        if _SCOPE.fullmatch(text) is None:
            ok = False
            r.issue(
                item,
                f"{where}[{position}]",
                f"{show(item)} is not a scope",
                "write table:op, *:op or table:* (op: create, read, update, delete, list; "
                "table names in lower case)",
            )
    return frozenset(text for _, text in items) if ok else None


def _roles(r: Reader, node: Node, where: str) -> tuple[str, ...] | None:
    items = r.texts(node, where, non_empty="omit roles for the default (admin or guest)")
    if items is None:
        return None
    for position, (item, text) in enumerate(items):
        if _ROLE_NAME.fullmatch(text) is None:
            r.issue(
                item,
                f"{where}[{position}]",
                f"{show(item)} is not a role name",
                "a role name is up to 64 letters, digits, '_', '.', ':' or '-'",
            )
            return None
    return tuple(text for _, text in items)
