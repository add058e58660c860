"""Field filtering of JSON response bodies: a key's `fields: {include|exclude: [...]}`.

Paths are dotted names; a `*` segment stands for any key of an object or any
item of an array, and arrays met on the way are walked through (the path
applies to each item), so `author.phone` hides the phone of one author or of a
list of authors alike. A key's paths are compiled once, at load, into a small
tree; applying it visits only the parts of a document the paths reach.

Where the documents sit in a body is a property of the endpoint, not of the
key: a route's `fields_at` names document paths such as `data[*]` or
`hits.hits[*]._source` (default: the body itself, or each item when the body
is an array). A body whose shape does not have a configured document path is
filtered as a whole instead: the filter never skips what it cannot find.

Fail closed: a body that is not JSON (by content type or parse), too large or
nested too deeply raises `FilterFailed`, which the server answers with 502
`FILTER_FAILED` before any byte of the body has left.

Duplicate keys: a JSON object may repeat a key. orjson, like the standard
library and browsers' `JSON.parse`, keeps the last one; the filter works on the
parsed object and the body is serialised again from it, so the answer holds
each key once and no hidden copy of an excluded field survives. Numbers are
written back as orjson reads them: integers beyond 64 bits become floats (ids
that large should travel as strings).
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from cachetools import LRUCache

from keyproxy.request import Deny
from keyproxy.response.codings import DecodeFailed, choose_encoding, decode, encode

MiB = 1024 * 1024
DEFAULT_MAX_BYTES = 8 * MiB
#: orjson writes at most this many nested levels and refuses deeper documents, so
#: this cap costs nothing; a lower one is checked by walking the parsed body.
SERIALISER_MAX_DEPTH = 254
DEFAULT_MAX_DEPTH = SERIALISER_MAX_DEPTH
MAX_PATH_SEGMENTS = 32
_SEGMENT = re.compile(r"[^.\[\]*\s]{1,128}|\*")
_JSON_TYPES = ("application/json", "text/json")
_NDJSON_TYPES = (
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/jsonlines",
)


#: The refusal when a body that must be filtered cannot be: no byte of it has left.
FILTER_FAILED = Deny(502, "FILTER_FAILED", "the response could not be filtered for this key")


class FilterFailed(Exception):
    """The body must be filtered and cannot be; `reason` says why (for logs, never the body)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class _Node:
    """One level of the compiled paths: named children, a `*` child, or the end of a path."""

    end: bool = False
    children: dict[str, _Node] = field(default_factory=dict)
    star: _Node | None = None
    #: children[k] merged with star, so a key matching both follows both paths at once.
    by_key: dict[str, _Node] = field(default_factory=dict)
    #: the node each array item is filtered with: star merged with the named children.
    item: _Node | None = None
    # The exclusion plan of a level without `*` (set by `_finish`), so the walk over a
    # list of records does per record only what the paths ask:
    #: keys removed here;
    drop: tuple[str, ...] = ()
    #: keys whose value loses only keys of its own: (key, those keys, the child node);
    drop_below: tuple[tuple[str, tuple[str, ...], _Node], ...] = ()
    #: keys to walk into further: (key, the child node).
    walk: tuple[tuple[str, _Node], ...] = ()
    #: The inclusion plan of such a level, in the order the paths name the keys:
    #: (key, None to keep its value whole, or the node to keep parts of it with).
    pick: tuple[tuple[str, _Node | None], ...] = ()


def _merge(a: _Node | None, b: _Node | None) -> _Node | None:
    if a is None:
        return b
    if b is None:
        return a
    node = _Node(end=a.end or b.end)
    for name in a.children.keys() | b.children.keys():
        merged = _merge(a.children.get(name), b.children.get(name))
        assert merged is not None
        node.children[name] = merged
    node.star = _merge(a.star, b.star)
    return node


def _finish(node: _Node, depth: int = 0) -> None:
    """Precompute the merged views the walk uses, so a request never merges."""
    if depth > MAX_PATH_SEGMENTS + 2:
        return
    for child in node.children.values():
        _finish(child, depth + 1)
    if node.star is not None:
        _finish(node.star, depth + 1)
        node.by_key = {k: _merge(c, node.star) for k, c in node.children.items()}  # type: ignore[misc]
        for merged in node.by_key.values():
            _finish(merged, depth + 1)
        plain = _Node(end=node.end, children=node.children)
        item = _merge(node.star, plain if node.children else None)
        assert item is not None
        if item is not node.star:
            _finish(item, depth + 1)
        node.item = item
    else:
        node.by_key = node.children
        node.item = node
    drop, drop_below, walk = [], [], []
    for key, sub in node.by_key.items():
        if sub.end:
            drop.append(key)
        elif sub.star is None and sub.children and all(c.end for c in sub.children.values()):
            drop_below.append((key, tuple(sub.children), sub))
        else:
            walk.append((key, sub))
    node.drop, node.drop_below, node.walk = tuple(drop), tuple(drop_below), tuple(walk)
    node.pick = tuple((key, None if sub.end else sub) for key, sub in node.by_key.items())


def parse_field_path(text: str) -> tuple[str, ...]:
    """`author.phone` -> ("author", "phone"); ValueError saying how to write it instead."""
    if not text or text != text.strip():
        raise ValueError(f"field path {text!r} is empty or has surrounding spaces")
    segments = tuple(text.split("."))
    if len(segments) > MAX_PATH_SEGMENTS:
        raise ValueError(f"field path {text!r} has more than {MAX_PATH_SEGMENTS} segments")
    for segment in segments:
        if _SEGMENT.fullmatch(segment) is None:
            raise ValueError(
                f"field path {text!r}: each segment is a name or *, separated by single dots"
            )
    return segments


@dataclass(frozen=True, slots=True)
class FieldFilter:
    """A key's compiled `fields`: `mode` is "include" or "exclude"."""

    mode: str
    paths: tuple[str, ...]
    root: _Node = field(repr=False, compare=False)

    def apply(self, value: Any) -> Any:
        """The document with the paths kept (include) or removed (exclude).

        Exclusion edits `value` in place (it is a body just parsed); pass a copy
        to keep the original.
        """
        if self.mode == "exclude":
            return _exclude(value, self.root)
        kept = _include(value, self.root)
        return kept if kept is not _DROP else {}


def compile_fields(mode: str, paths: Iterable[str]) -> FieldFilter:
    if mode not in ("include", "exclude"):
        raise ValueError(f"fields: expected include or exclude, found {mode!r}")
    root = _Node()
    texts = tuple(paths)
    if not texts:
        raise ValueError("fields: the list of paths is empty")
    for text in texts:
        node = root
        for segment in parse_field_path(text):
            if segment == "*":
                node.star = node.star or _Node()
                node = node.star
            else:
                node = node.children.setdefault(segment, _Node())
        node.end = True
    _finish(root)
    return FieldFilter(mode, texts, root)


_DROP = object()


def _exclude(value: Any, node: _Node) -> Any:
    """Remove the paths, in place: the value is a body just parsed, owned by the caller."""
    kind = type(value)
    if kind is dict:
        _exclude_in_object(value, node)
    elif kind is list:
        _exclude_in_items(value, node)
    return value


def _exclude_in_object(value: dict[str, Any], node: _Node) -> None:
    """Without a `*` at this level only the named keys are visited, so a large record
    costs as many steps as the filter has paths, not as it has keys."""
    if node.star is not None:
        by_key = node.by_key
        star = node.star
        for key in list(value):
            sub = by_key.get(key, star)
            if sub.end:
                del value[key]
            else:
                _exclude(value[key], sub)
        return
    for key in node.drop:
        value.pop(key, None)
    for key, below, sub in node.drop_below:
        child = value.get(key)
        if child.__class__ is dict:
            for name in below:
                child.pop(name, None)
        elif child.__class__ is list:
            _exclude_in_items(child, sub)
    for key, sub in node.walk:
        child = value.get(key)
        if child is not None:
            _exclude(child, sub)


def _exclude_in_items(value: list[Any], node: _Node) -> None:
    """Each item of an array filtered with `node.item`."""
    item = node.item
    assert item is not None
    if item.end:
        value.clear()
        return
    if item.star is not None:
        for child in value:
            _exclude(child, item)
        return
    for record in value:
        if record.__class__ is dict:
            _exclude_in_object(record, item)
        elif record.__class__ is list:
            _exclude_in_items(record, item)


def _include(value: Any, node: _Node) -> Any:
    """The parts of `value` on an included path (a new value); `_DROP` when none is.

    Without a `*` at this level the keys come out in the order the paths name them.
    """
    if node.end:
        return value
    kind = type(value)
    if kind is dict:
        if node.star is None:
            return _pick(value, node.pick)
        by_key = node.by_key
        star = node.star
        out = {}
        for key, child_value in value.items():
            kept = _include(child_value, by_key.get(key, star))
            if kept is not _DROP:
                out[key] = kept
        return out
    if kind is list:
        return _include_items(value, node)
    return _DROP  # a scalar below the end of every path: not included


def _pick(value: dict[str, Any], pick: tuple[tuple[str, _Node | None], ...]) -> dict[str, Any]:
    out = {}
    for key, sub in pick:
        if key in value:
            if sub is None:
                out[key] = value[key]
            else:
                kept = _include(value[key], sub)
                if kept is not _DROP:
                    out[key] = kept
    return out


def _include_items(value: list[Any], node: _Node) -> list[Any]:
    """Each item of an array kept as far as `node.item` says; scalars off every path go."""
    item = node.item
    assert item is not None
    if item.end:
        return value
    if item.star is not None:
        return [kept for v in value if (kept := _include(v, item)) is not _DROP]
    pick = item.pick
    out: list[Any] = []
    for record in value:
        if record.__class__ is dict:
            out.append(_pick(record, pick))
        elif record.__class__ is list:
            out.append(_include_items(record, item))
    return out


# --------------------------------------------------------------------------- documents


@dataclass(frozen=True, slots=True)
class DocumentPath:
    """Where documents sit in a body: `hits.hits[*]._source` -> steps (hits, hits, [*], _source)."""

    text: str
    steps: tuple[str | None, ...]  # a name, or None for "each item of an array"


_DOC_STEP = re.compile(r"([^.\[\]*\s]{1,128})((?:\[\*\])*)")


def parse_document_path(text: str) -> DocumentPath:
    """`data[*]`, `hits.hits[*]._source`, `results`; ValueError with how to write it."""
    if not text:
        raise ValueError("a document path is empty")
    steps: list[str | None] = []
    for part in text.split("."):
        match = _DOC_STEP.fullmatch(part)
        if match is None:
            raise ValueError(
                f"document path {text!r}: names separated by dots, [*] after a name for "
                "each item of an array, like data[*] or hits.hits[*]._source"
            )
        steps.append(match.group(1))
        steps += [None] * (len(match.group(2)) // 3)
    if len(steps) > MAX_PATH_SEGMENTS:
        raise ValueError(f"document path {text!r} is too long")
    return DocumentPath(text, tuple(steps))


class _Missing(Exception):
    pass


def _apply_at(value: Any, steps: tuple[str | None, ...], flt: FieldFilter) -> Any:
    """`value` with the documents at `steps` filtered; `_Missing` when a named step is not
    there. Each item of an array is on its own: an item the rest of the path misses is
    filtered as a whole (one hit without `_source` must not leave the next hit's
    `_source` unfiltered), and one object where an array was expected is one document
    (`data` as JSON:API writes a single resource)."""
    if not steps:
        return flt.apply(value)
    step, rest = steps[0], steps[1:]
    if step is None:
        kind = type(value)
        if kind is dict:
            return _apply_at(value, rest, flt)
        if kind is not list:
            raise _Missing
        return [_apply_to_item(v, rest, flt) for v in value]
    if type(value) is not dict or step not in value:
        raise _Missing
    out = dict(value)
    out[step] = _apply_at(value[step], rest, flt)
    return out


def _apply_to_item(item: Any, steps: tuple[str | None, ...], flt: FieldFilter) -> Any:
    try:
        return _apply_at(item, steps, flt)
    except _Missing:
        return flt.apply(item)


def filter_document(value: Any, flt: FieldFilter, at: tuple[DocumentPath, ...] = ()) -> Any:
    """Filter one parsed body: at each document path, or the whole of it.

    When none of the document paths is found (an error body, another shape),
    the whole value is filtered: nothing escapes because it sat elsewhere.
    """
    if not at:
        return flt.apply(value)
    found = False
    for path in at:
        try:
            value = _apply_at(value, path.steps, flt)
            found = True
        except _Missing:
            continue
    return value if found else flt.apply(value)


def _too_deep(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than `limit`, level by level (no recursion)."""
    level = [value]
    depth = 1
    while level:
        if depth > limit:
            return True
        below = []
        for container in level:
            for child in container.values() if type(container) is dict else container:
                kind = type(child)
                if kind is dict or kind is list:
                    below.append(child)
        level = below
        depth += 1
    return False


def media_type(content_type: str | None) -> str:
    return (content_type or "").partition(";")[0].strip().lower()


def body_kind(content_type: str | None) -> str | None:
    """ "json", "ndjson", or None for a body that is not JSON by its content type."""
    kind = media_type(content_type)
    if kind in _JSON_TYPES or (kind.startswith("application/") and kind.endswith("+json")):
        return "json"
    if kind in _NDJSON_TYPES:
        return "ndjson"
    return None


@dataclass(frozen=True, slots=True)
class FilterLimits:
    max_bytes: int = DEFAULT_MAX_BYTES  # of the decoded body
    max_depth: int = DEFAULT_MAX_DEPTH  # at most SERIALISER_MAX_DEPTH


def _parse(data: bytes, limits: FilterLimits) -> Any:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise FilterFailed("the body is not valid JSON") from None
    kind = type(value)
    if (
        limits.max_depth < SERIALISER_MAX_DEPTH
        and (kind is dict or kind is list)
        and _too_deep(value, limits.max_depth)
    ):
        raise FilterFailed(f"the body nests deeper than {limits.max_depth} levels")
    return value


def _dump(value: Any, limits: FilterLimits) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:  # deeper than the serialiser writes
        raise FilterFailed(f"the body nests deeper than {limits.max_depth} levels") from None


def filter_body(
    body: bytes,
    content_type: str | None,
    flt: FieldFilter,
    at: tuple[DocumentPath, ...] = (),
    limits: FilterLimits = FilterLimits(),
) -> bytes:
    """The filtered body (decoded bytes in, identity bytes out) or `FilterFailed`."""
    if len(body) > limits.max_bytes:
        raise FilterFailed(f"the body is larger than {limits.max_bytes} bytes")
    kind = body_kind(content_type)
    if kind is None:
        raise FilterFailed(f"the body is not JSON (Content-Type {media_type(content_type)!r})")
    if not body.strip():
        return b""  # nothing to hide in an empty body
    # A parsed document holds no reference cycles, yet its thousands of new containers
    # set off the cyclic collector's young-generation passes: paused while it lives
    # (json64k array of 406 records, exclude 2 paths: 598 -> 565 µs).
    collecting = gc.isenabled()
    gc.disable()
    try:
        if kind == "json":
            return _dump(filter_document(_parse(body, limits), flt, at), limits)
        out = []
        for line in body.split(b"\n"):
            if line.strip():
                out.append(_dump(filter_document(_parse(line, limits), flt, at), limits))
        return b"\n".join(out) + b"\n"
    finally:
        if collecting:
            gc.enable()


def filter_encoded(
    body: bytes,
    content_type: str | None,
    content_encoding: str | None,
    accept_encoding: str | None,
    flt: FieldFilter,
    at: tuple[DocumentPath, ...] = (),
    limits: FilterLimits = FilterLimits(),
    clean: Callable[[bytes], bytes] | None = None,
    memo: FilterMemo | None = None,
) -> tuple[bytes, str | None]:
    """A whole upstream body as received -> (the filtered body, its Content-Encoding or None).

    `clean` (the secret scrubber) runs over the filtered JSON before it is encoded: the
    filter writes strings afresh, so a secret the upstream sent JSON-escaped (`\\u0041`,
    `\\/`), which no scan of its bytes finds, would come out spelled plainly.

    Decodes whatever `Content-Encoding` the upstream used (bounded: a bomb stops
    at `limits.max_bytes`), filters, and encodes again only if the upstream had
    encoded and the client's `Accept-Encoding` allows a coding; otherwise identity.
    Every failure, decoding included, is `FilterFailed`. With a `memo`, an answer whose
    inputs were all seen before is the one made then.
    """
    encoded = content_encoding is not None and content_encoding.strip().lower() not in (
        "",
        "identity",
    )
    # The coding chosen for the client, not its Accept-Encoding: two spellings of one
    # choice share a memo entry. None when the upstream sent identity, whatever it accepts.
    out_coding = choose_encoding(accept_encoding) if encoded else None

    def run() -> tuple[bytes, str | None]:
        if not encoded:
            filtered = filter_body(body, content_type, flt, at, limits)  # checks the size
            return (clean(filtered) if clean is not None else filtered), None
        try:
            decoded = decode(body, content_encoding, limits.max_bytes)
        except DecodeFailed as error:
            raise FilterFailed(error.reason) from None
        filtered = filter_body(decoded, content_type, flt, at, limits)
        if clean is not None:
            filtered = clean(filtered)
        return encode(filtered, out_coding), out_coding

    if memo is None:
        return run()
    inputs = (body, body_kind(content_type), content_encoding, out_coding, flt, at, limits, clean)
    return memo.answer(inputs, len(body), run)


# --------------------------------------------------------------------------- memo

#: What one process keeps of filtered answers per configuration snapshot: the upstream
#: bodies (keys) and the filtered bodies (values) together, in bytes.
DEFAULT_MEMO_BYTES = 4 * MiB
#: An answer whose body and filtered body together are larger than this is filtered every
#: time (and its body never hashed): a few large answers would push out many small ones.
DEFAULT_MEMO_ENTRY_BYTES = 512 * 1024
#: Counted per entry besides its bytes: the key tuple, the value tuple, the LRU links.
_ENTRY_OVERHEAD = 256


def _entry_size(entry: tuple[bytes, str | None, int]) -> int:
    return entry[2]


class FilterMemo:
    """The last filtered answers of one snapshot, so a body served again is not parsed again.

    List endpoints polled by many clients answer with the same bytes until something
    changes, and filtering (parse, filter, serialise, rescan, re-encode) is the whole cost
    of such an answer. The output is a pure function of what the key holds: the exact body
    bytes (compared whole by the dict: no digest, so no collision can hand one body's
    output to another), its Content-Encoding, the JSON kind of its Content-Type, the
    filter, the route's document paths, the limits, the scrubber and the coding chosen
    for the client. A body that cannot be filtered is not kept: it fails again, the same
    way, each time. Bounded by `max_bytes` of bodies and outputs together, least
    recently used first out; not shared between processes or snapshots (a reload starts
    empty, so a changed filter can never meet an old output).
    """

    __slots__ = ("count", "entries", "max_entry_bytes")

    def __init__(
        self,
        max_bytes: int = DEFAULT_MEMO_BYTES,
        max_entry_bytes: int = DEFAULT_MEMO_ENTRY_BYTES,
        count: Callable[[str], None] = lambda result: None,
    ) -> None:
        self.entries: LRUCache[tuple[object, ...], tuple[bytes, str | None, int]] = LRUCache(
            max_bytes, getsizeof=_entry_size
        )
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        #: Told "hit", "miss" or "bypass" (an answer too large to keep) per answer.
        self.count = count

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def size(self) -> int:
        """Bytes held: bodies, outputs and the per-entry overhead."""
        return int(self.entries.currsize)

    def answer(
        self,
        inputs: tuple[object, ...],
        body_size: int,
        run: Callable[[], tuple[bytes, str | None]],
    ) -> tuple[bytes, str | None]:
        """The answer remembered for `inputs` (the body first, then all the output depends
        on), or `run`'s, kept when it fits; `run`'s `FilterFailed` is never kept."""
        if body_size + _ENTRY_OVERHEAD > self.max_entry_bytes:
            self.count("bypass")  # never kept, so not hashed either
            return run()
        entries = self.entries
        entry = entries.get(inputs)
        if entry is not None:
            self.count("hit")
            return entry[0], entry[1]
        self.count("miss")
        filtered, coding = run()
        size = body_size + len(filtered) + _ENTRY_OVERHEAD
        if size <= self.max_entry_bytes:
            entries[inputs] = (filtered, coding, size)
        return filtered, coding
