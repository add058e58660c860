from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import UpstreamServer, start_upstream
from tests.proxy_process import Keyproxy, base_config, start_keyproxy

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
