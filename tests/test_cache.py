"""The response cache: keys, what may be stored, framing, and both stores (memory, real Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from keyproxy.config.load import _compose
from keyproxy.config.response_sections import read_cache
from keyproxy.config.yaml_reader import Reader
from keyproxy.response.cache import (
    MAX_VARIANTS_PER_PATH,
    CachedResponse,
    CacheKey,
    MemoryStore,
    RedisStore,
    cache_key,
    decode_entry,
    encode_entry,
    eviction_paths,
    storable,
)
from tests.redis_server import RedisServer

T0 = 1.8e9
ENTRY = CachedResponse(
    200,
    ((b"Content-Type", b"application/json"), (b"Content-Encoding", b"gzip")),
    b'{"id": 1}' * 10,
    T0,
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------ keys and rules


def test_cache_key_is_the_forwarded_request_never_a_credential() -> None:
    base = [("accept", "application/json"), ("x-api-key", "pk_one"), ("authorization", "Bearer a")]
    other_key = [("accept", "application/json"), ("x-api-key", "pk_two"), ("authorization", "x")]
    one = cache_key("GET", "/api/v1/data/posts?page=2", base)
    assert one == cache_key("GET", "/api/v1/data/posts?page=2", other_key)
    assert one.path == "/api/v1/data/posts"
    assert one != cache_key("GET", "/api/v1/data/posts?page=3", base)
    assert one != cache_key("GET", "/api/v1/data/posts?page=2&createdBy=ann", base)  # self filter
    assert one != cache_key("GET", "/api/v1/data/posts?page=2", [("accept", "text/csv")])
    gz = cache_key("GET", "/api/v1/data/posts?page=2", [*base, ("accept-encoding", "gzip")])
    assert one != gz
    assert one != cache_key("HEAD", "/api/v1/data/posts?page=2", base)


@pytest.mark.parametrize(
    ("status", "headers", "ok"),
    [
        (200, [(b"Content-Type", b"application/json")], True),
        (200, [(b"Cache-Control", b"public, max-age=60")], True),
        (200, [(b"Vary", b"Accept-Encoding, Accept")], True),
        (201, [], False),
        (206, [], False),
        (404, [], False),
        (500, [], False),
        (200, [(b"Set-Cookie", b"session=1")], False),
        (200, [(b"set-cookie", b"a=b")], False),
        (200, [(b"Cache-Control", b"no-store")], False),
        (200, [(b"Cache-Control", b"max-age=60, PRIVATE")], False),
        (200, [(b"Cache-Control", b"no-cache")], False),
        (200, [(b"Cache-Control", b"max-age=0")], False),
        (200, [(b"Vary", b"*")], False),
        (200, [(b"Vary", b"Cookie")], False),
        (200, [(b"Vary", b"Authorization")], False),
    ],
)
def test_storable(status: int, headers: list[tuple[bytes, bytes]], ok: bool) -> None:
    assert storable(status, headers) is ok


@pytest.mark.parametrize(
    ("path", "evicted"),
    [
        ("/v1/data/posts/7", ("/v1/data/posts/7", "/v1/data/posts")),
        ("/v1/data/posts", ("/v1/data/posts", "/v1/data")),
        ("/v1/data/posts/", ("/v1/data/posts/", "/v1/data/posts", "/v1/data")),
        ("/v1/data/posts/7?x=1", ("/v1/data/posts/7", "/v1/data/posts")),
        ("/", ("/",)),
    ],
)
def test_eviction_paths(path: str, evicted: tuple[str, ...]) -> None:
    assert eviction_paths(path) == evicted


def test_framing_round_trips_and_rejects_anything_malformed() -> None:
    data = encode_entry(ENTRY)
    assert decode_entry(data) == ENTRY
    assert b"pickle" not in data and data.startswith(b"KPC1")
    for broken in (b"", b"KPC1", data[:-1], data + b"x", b"KPC2" + data[4:], data[:20]):
        assert decode_entry(broken) is None, broken


# ------------------------------------------------------------------------ memory store


async def test_memory_store_hit_expiry_and_eviction() -> None:
    clock = Clock()
    store = MemoryStore(
        ttl=10, max_entries=100, max_bytes=1 << 20, max_entry_bytes=1 << 16, clock=clock
    )
    item = cache_key("GET", "/v1/data/posts/7", [])
    listing = cache_key("GET", "/v1/data/posts?page=1", [])
    other = cache_key("GET", "/v1/data/users?page=1", [])
    for key in (item, listing, other):
        assert await store.put(key, ENTRY)
    assert await store.get(item) == ENTRY and store.entries == 3
    clock.now = T0 + 9.9
    assert await store.get(listing) == ENTRY
    clock.now = T0 + 10
    assert await store.get(listing) is None  # never older than ttl
    clock.now = T0
    await store.evict(eviction_paths("/v1/data/posts/7"))  # a write to the item
    assert await store.get(item) is None and await store.get(listing) is None
    assert await store.get(other) == ENTRY


async def test_memory_store_is_bounded_in_entries_and_bytes() -> None:
    clock = Clock()
    store = MemoryStore(
        ttl=60, max_entries=10, max_bytes=10_000, max_entry_bytes=5_000, clock=clock
    )
    small = CachedResponse(200, (), b"x", T0)
    for i in range(50):
        await store.put(cache_key("GET", f"/p/{i}", []), small)
    assert store.entries <= 10 and store.bytes <= 10_000
    big = CachedResponse(200, (), b"x" * 3_000, T0)
    for i in range(50):
        await store.put(cache_key("GET", f"/big/{i}", []), big)
    assert store.bytes <= 10_000 and store.entries <= 3
    assert not await store.put(
        cache_key("GET", "/huge", []), CachedResponse(200, (), b"x" * 6000, T0)
    )
    assert await store.get(cache_key("GET", "/huge", [])) is None


async def test_memory_store_bounds_variants_per_path() -> None:
    store = MemoryStore(
        ttl=60, max_entries=10_000, max_bytes=1 << 24, max_entry_bytes=1 << 16, clock=Clock()
    )
    for i in range(MAX_VARIANTS_PER_PATH + 5):
        await store.put(cache_key("GET", f"/v1/data/posts?page={i}", []), ENTRY)
    assert store.entries == MAX_VARIANTS_PER_PATH
    assert await store.get(cache_key("GET", "/v1/data/posts?page=0", [])) is None
    assert await store.get(cache_key("GET", f"/v1/data/posts?page={MAX_VARIANTS_PER_PATH + 4}", []))


# ------------------------------------------------------------------------ redis store


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[tuple[RedisStore, Clock, Redis]]:
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    clock = Clock()
    store = RedisStore(redis_server.url, ttl=10, max_entry_bytes=1 << 16, timeout=2.0, clock=clock)
    yield store, clock, client
    await store.aclose()
    await client.aclose()


async def test_redis_store_hit_expiry_eviction_and_no_pickle(redis_store) -> None:
    store, clock, client = redis_store
    item = cache_key("GET", "/v1/data/posts/7", [])
    listing = cache_key("GET", "/v1/data/posts?page=1", [])
    other = cache_key("GET", "/v1/data/users", [])
    for key in (item, listing, other):
        assert await store.put(key, ENTRY)
    assert await store.get(item) == ENTRY and await store.get(listing) == ENTRY
    names = await client.keys("keyproxy:cache:*")
    assert len(names) == 3  # one hash per path
    for name in names:
        ttl_ms = await client.pttl(name)
        assert 0 < ttl_ms <= 10_000
        for raw in (await client.hgetall(name)).values():
            assert raw.startswith(b"KPC1") and decode_entry(raw) == ENTRY
    clock.now = T0 + 10
    assert await store.get(item) is None
    clock.now = T0
    await store.evict(eviction_paths("/v1/data/posts"))  # a POST to the collection
    assert await store.get(listing) is None and await store.get(item) == ENTRY
    assert await store.get(other) == ENTRY


async def test_redis_store_treats_a_poisoned_entry_as_a_miss(redis_store) -> None:
    store, _, client = redis_store
    key = cache_key("GET", "/v1/data/posts", [])
    await store.put(key, ENTRY)
    name = (await client.keys("keyproxy:cache:*"))[0]
    await client.hset(name, key.variant, b"\x80\x04\x95 pickled payload")
    assert await store.get(key) is None
    assert not await store.put(key, CachedResponse(200, (), b"x" * (1 << 17), T0))


async def test_redis_store_unreachable_raises_quickly(redis_server: RedisServer) -> None:
    """The caller treats an error as a miss; it must come fast, never hang a request."""
    store = RedisStore("redis://127.0.0.1:1/0", ttl=10, max_entry_bytes=1 << 16, timeout=0.2)
    with pytest.raises(Exception):  # noqa: B017 - redis raises ConnectionError or TimeoutError
        await store.get(CacheKey("/x", "y"))
    await store.aclose()


# ------------------------------------------------------------------------ the section


ROUTES_YAML = """
- {match: "GET /v1/data/{table}", acl: search}
- {match: "POST /v1/data/{table}", acl: index}
"""


def read(text: str):
    from keyproxy.config.routes_section import read_routes

    root = _compose("routes:" + ROUTES_YAML.replace("\n-", "\n  -") + "cache:\n" + text)
    r = Reader({})
    fields = {k.value: v for k, v in root.value}
    table, _ = read_routes(r, fields["routes"], root)
    assert r.issues == []
    return read_cache(r, fields["cache"], table), r.issues


def test_cache_section_reads_the_settings() -> None:
    settings, issues = read(
        "  backend: memory\n  ttl: 10s\n  routes: ['GET /v1/data/{table}']\n"
        "  max_entries: 500\n  max_bytes: 16MiB\n"
    )
    assert issues == [] and settings is not None
    assert (settings.backend, settings.ttl, settings.max_entries) == ("memory", 10.0, 500)
    assert [r.match for r in settings.routes] == ["GET /v1/data/{table}"]
    redis, issues = read(
        "  backend: redis://127.0.0.1:6379/1\n  ttl: 1m\n  routes: ['GET /v1/data/{table}']\n"
    )
    assert issues == [] and redis is not None and redis.backend.startswith("redis://")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("  backend: memory\n  ttl: 10s\n  routes: ['GET /v1/nope']\n", "is not one of the routes"),
        (
            "  backend: memory\n  ttl: 10s\n  routes: ['POST /v1/data/{table}']\n",
            "never answers a GET",
        ),
        ("  backend: memcached\n  ttl: 10s\n  routes: []\n", "expected memory"),
        (
            "  backend: sqlite:///tmp/c.db\n  ttl: 10s\n  routes: ['GET /v1/data/{table}']\n",
            "not supported yet",
        ),
        ("  backend: redis://\n  ttl: 10s\n  routes: ['GET /v1/data/{table}']\n", "needs a host"),
        ("  backend: memory\n  routes: ['GET /v1/data/{table}']\n", "ttl is required"),
        ("  backend: memory\n  ttl: 0s\n  routes: ['GET /v1/data/{table}']\n", "longer than zero"),
        (
            "  backend: memory\n  ttl: 1s\n  routes: ['GET /v1/data/{table}']\n"
            "  max_bytes: 1KiB\n  max_entry_bytes: 2KiB\n",
            "larger than max_bytes",
        ),
        (
            "  backend: memory\n  ttl: 1s\n  routes: ['GET /v1/data/{table}']\n  size: 1\n",
            "unknown field",
        ),
    ],
)
def test_cache_section_errors(text: str, problem: str) -> None:
    settings, issues = read(text)
    assert settings is None and any(problem in i.message for i in issues), issues
    assert all(i.line is not None for i in issues)
