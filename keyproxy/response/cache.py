"""A cache of upstream GET answers, in memory (cachetools) or in Redis (redis-py, no pickle).

Why not aiohttp-client-cache's backends (the obvious library for this): they
store and return aiohttp `ClientResponse`/`CachedResponse` objects, and
keyproxy's data path never has one (it relays raw bytes parsed by httptools);
the SQLite and Redis backends serialise with pickle by default (reading a
poisoned entry would run code in the proxy); the Redis backend keeps every
entry in one hash without a per-entry expiry and neither backend bounds
entries or bytes; and expiry is checked by unpickling on read. Here an entry
is the status, the header lines and the body, framed in a simple byte format.

What is cached, and for whom: the key is the forwarded request (method,
upstream target with any filters keyproxy added, and the request headers an
answer may vary on) and the response policy it was stored under (whether its
body was scanned for the upstream's secret), never a client credential. The decision always runs
before the cache, and field filtering after it, so an answer fetched for one
key is served to another only within that key's rights. Only 200 answers
without `Set-Cookie`, `no-store`, `private`, `no-cache`, a zero max-age or a
`Vary` on other headers are stored. A successful write through the proxy
evicts the cached reads of the resource and of its collection: entries are
grouped by upstream path, so eviction is one dictionary pop or one Redis DEL.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cachetools import TTLCache

#: Request headers an answer may differ by; they are part of the cache key. The client's
#: `Host` travels upstream as X-Forwarded-Host (and a trusted proxy's X-Forwarded-Proto
#: as it is), which frameworks write into absolute links: an answer fetched under
#: `Host: evil.example` must never be served to clients that sent another.
KEYED_HEADERS = ("accept", "accept-encoding", "accept-language", "host", "x-forwarded-proto")
#: Variants (query strings, Accept values) kept per path; the oldest goes beyond it.
MAX_VARIANTS_PER_PATH = 64
_MAGIC = b"KPC1"
_HEAD = struct.Struct(">dHI")  # stored_at, status, number of headers
_HEADER = struct.Struct(">HI")  # name length, value length
_BODY = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class CachedResponse:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # as the upstream sent them (before scrubbing)
    body: bytes  # as received (still in its Content-Encoding)
    stored_at: float  # epoch seconds

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(n) + len(v) + 4 for n, v in self.headers) + 64


@dataclass(frozen=True, slots=True)
class CacheKey:
    path: str  # the upstream path without query: what a write evicts
    variant: str  # hex digest of everything else the answer depends on


def cache_key(
    method: str, upstream_target: str, headers: Iterable[tuple[str, str]], policy: str = ""
) -> CacheKey:
    """The key of a forwarded request. `headers` are the request's (lower-case names);
    only `KEYED_HEADERS` are read, so no credential can ever be part of a key. `policy`
    names the work done on the answer before it is stored (`ResponseCache.key_for`), so
    an entry is found only under the policy that made it."""
    wanted: dict[str, list[str]] = {}
    for name, value in headers:
        if name in KEYED_HEADERS:
            wanted.setdefault(name, []).append(value.strip())
    parts = [method, upstream_target]
    for name in KEYED_HEADERS:
        parts.append(",".join(wanted.get(name, ())))
    parts.append(policy)
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()
    return CacheKey(upstream_target.partition("?")[0], digest)


def storable(status: int, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether an answer may be stored and served to other callers."""
    if status != 200:
        return False
    for name, value in headers:
        lname = name.lower()
        if lname == b"set-cookie":
            return False
        if lname == b"cache-control":
            for directive in value.lower().split(b","):
                token, _, argument = directive.strip().partition(b"=")
                token = token.strip()
                if token in (b"no-store", b"private", b"no-cache"):
                    return False
                if token in (b"max-age", b"s-maxage") and argument.strip(b' "') == b"0":
                    return False
        elif lname == b"vary":
            for field in value.lower().split(b","):
                if field.strip().decode("latin-1") not in KEYED_HEADERS:
                    return False
    return True


def eviction_paths(upstream_path: str) -> tuple[str, ...]:
    """A write to `/v1/data/posts/7` evicts it and its collection `/v1/data/posts`."""
    path = upstream_path.partition("?")[0]
    trimmed = path.rstrip("/") or "/"
    parent = trimmed.rsplit("/", 1)[0] or "/"
    return tuple(dict.fromkeys((path, trimmed, parent)))


# --------------------------------------------------------------------------- framing


def encode_entry(entry: CachedResponse) -> bytes:
    parts = [_MAGIC, _HEAD.pack(entry.stored_at, entry.status, len(entry.headers))]
    for name, value in entry.headers:
        parts += (_HEADER.pack(len(name), len(value)), name, value)
    parts += (_BODY.pack(len(entry.body)), entry.body)
    return b"".join(parts)


def decode_entry(data: bytes) -> CachedResponse | None:
    """The entry, or None for anything malformed (treated as a miss, never trusted)."""
    try:
        if data[:4] != _MAGIC:
            return None
        stored_at, status, count = _HEAD.unpack_from(data, 4)
        offset = 4 + _HEAD.size
        headers = []
        for _ in range(count):
            name_len, value_len = _HEADER.unpack_from(data, offset)
            offset += _HEADER.size
            name = data[offset : offset + name_len]
            value = data[offset + name_len : offset + name_len + value_len]
            offset += name_len + value_len
            if len(name) != name_len or len(value) != value_len:
                return None
            headers.append((name, value))
        (body_len,) = _BODY.unpack_from(data, offset)
        offset += _BODY.size
        body = data[offset:]
        if len(body) != body_len:
            return None
    except struct.error:
        return None
    return CachedResponse(status, tuple(headers), body, stored_at)


# --------------------------------------------------------------------------- stores


class MemoryStore:
    """One process's cache: bounded in entries and in bytes, entries expire after `ttl`.

    Entries are grouped per path in a cachetools `TTLCache` whose size is counted
    in bytes. Each entry counts at least `max_bytes / max_entries`, so the byte
    bound also bounds the number of entries.
    """

    def __init__(
        self,
        ttl: float,
        max_entries: int,
        max_bytes: int,
        max_entry_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl = ttl
        self.clock = clock
        self.max_entry_bytes = max_entry_bytes
        floor = max(1, max_bytes // max_entries)
        self.paths: TTLCache[str, dict[str, CachedResponse]] = TTLCache(
            maxsize=max_bytes,
            ttl=ttl,
            timer=clock,
            getsizeof=lambda group: sum(max(e.size, floor) for e in group.values()),
        )

    async def get(self, key: CacheKey) -> CachedResponse | None:
        return self.lookup(key)

    def lookup(self, key: CacheKey) -> CachedResponse | None:
        """`get` without a suspension: the data path looks up in memory synchronously."""
        group = self.paths.get(key.path)
        entry = group.get(key.variant) if group is not None else None
        if entry is None or self.clock() - entry.stored_at >= self.ttl:
            return None
        return entry

    async def put(self, key: CacheKey, entry: CachedResponse) -> bool:
        if entry.size > self.max_entry_bytes:
            return False
        group = dict(self.paths.get(key.path) or {})
        group.pop(key.variant, None)
        group[key.variant] = entry
        while len(group) > MAX_VARIANTS_PER_PATH:
            del group[next(iter(group))]
        try:
            self.paths[key.path] = group
        except ValueError:  # the group alone is over max_bytes
            self.paths.pop(key.path, None)
            return False
        return True

    async def evict(self, paths: Iterable[str]) -> None:
        for path in paths:
            self.paths.pop(path, None)

    @property
    def entries(self) -> int:
        return sum(len(group) for group in self.paths.values())

    @property
    def bytes(self) -> int:
        return int(self.paths.currsize)

    async def aclose(self) -> None:
        self.paths.clear()


class RedisStore:
    """A cache shared by every worker and replica: one Redis hash per upstream path.

    Each hash field is one variant, framed by `encode_entry`; the hash expires
    `ttl` after its last write, and each entry's age is checked on read, so no
    entry is served older than `ttl`. Entries over `max_entry_bytes` are not
    stored; the total is bounded by the Redis server's own `maxmemory` policy.
    """

    def __init__(
        self,
        url: str,
        ttl: float,
        max_entry_bytes: int,
        prefix: str = "keyproxy:cache:",
        timeout: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import redis.asyncio

        self.client = redis.asyncio.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.ttl = ttl
        self.max_entry_bytes = max_entry_bytes
        self.prefix = prefix
        self.clock = clock

    def _name(self, path: str) -> str:
        return self.prefix + hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()

    async def get(self, key: CacheKey) -> CachedResponse | None:
        data = await self.client.hget(self._name(key.path), key.variant)
        if data is None:
            return None
        # decode_responses is off (the default): the client returns bytes, never str.
        entry = decode_entry(data)  # type: ignore[arg-type]  # redis types hget as bytes | str
        if entry is None or self.clock() - entry.stored_at >= self.ttl:
            return None
        return entry

    async def put(self, key: CacheKey, entry: CachedResponse) -> bool:
        if entry.size > self.max_entry_bytes:
            return False
        name = self._name(key.path)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(name, key.variant, encode_entry(entry))
            pipe.pexpire(name, max(1, int(self.ttl * 1000)))
            await pipe.execute()
        return True

    async def evict(self, paths: Iterable[str]) -> None:
        names = [self._name(path) for path in paths]
        if names:
            await self.client.delete(*names)

    async def aclose(self) -> None:
        await self.client.aclose()


def open_store(
    backend: str, ttl: float, max_entries: int, max_bytes: int, max_entry_bytes: int
) -> MemoryStore | RedisStore:
    """The store a `cache:` section names (`memory` or a redis:// URL)."""
    if backend == "memory":
        return MemoryStore(ttl, max_entries, max_bytes, max_entry_bytes)
    return RedisStore(backend, ttl, max_entry_bytes)
