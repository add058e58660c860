"""An operator's ordinary actions (rotating logs, stopping, editing the file) never lose
traffic, log lines or the last good configuration: through real `keyproxy serve` processes."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.proxy_process import KEYS, Keyproxy, base_config, start_keyproxy


def read_log(path: Path, count: int, timeout: float = 5.0) -> list[dict]:
    """Wait (bounded) until `count` lines have been flushed, then parse them all."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.1)


@pytest.fixture
def make(tmp_path):
    started: list[Keyproxy] = []

    def _make(config: dict, extra_args: list[str] | None = None) -> Keyproxy:
        kp = start_keyproxy(tmp_path, config, extra_args=extra_args)
        started.append(kp)
        return kp

    yield _make
    for kp in started:
        kp.stop()


@pytest.mark.parametrize("signum", [None, signal.SIGHUP])
def test_a_renamed_access_log_is_reopened_without_sigusr1(upstream, tmp_path, make, signum):
    """logrotate renames the file and then sends nothing (no postrotate) or SIGHUP, the
    signal most daemons reopen their logs on: the next lines go to the path again, not
    into the rotated file that logrotate compresses and deletes."""
    log_path = tmp_path / "access.log"
    config = base_config(upstream.url, upstream.inject())
    config["log"] = {"access": str(log_path)}
    kp = make(config)
    assert kp.request("GET", "/echo/1", key=KEYS["reader"])[0] == 200
    assert len(read_log(log_path, 1)) == 1
    rotated = tmp_path / "access.log.1"
    log_path.rename(rotated)
    if signum is not None:
        kp.process.send_signal(signum)
        time.sleep(0.3)
    assert kp.request("GET", "/echo/2", key=KEYS["reader"])[0] == 200
    assert [line["path"] for line in read_log(log_path, 1)] == ["/echo/2"]
    assert [line["path"] for line in read_log(rotated, 1, timeout=0)] == ["/echo/1"]
    # and the path deleted outright (rotate with `create` off, or rm): back at the path too
    log_path.unlink()
    assert kp.request("GET", "/echo/3", key=KEYS["reader"])[0] == 200
    assert [line["path"] for line in read_log(log_path, 1)] == ["/echo/3"]
