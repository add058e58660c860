"""`serve --workers N`: N processes accepting on one port (SO_REUSEPORT).

The kernel spreads new connections across the workers; each is a complete
keyproxy with its own config watcher. The supervisor only forwards signals
and restarts a worker that dies unexpectedly, as nginx's master does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

RESTART_BACKOFF = 1.0
CRASH_LOOP_WINDOW = 5.0


def _spawn(
    config_path: str, host: str | None, port: int | None, metrics_dir: str = ""
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "keyproxy", "serve", "-c", config_path]
    if host is not None:
        cmd += ["--host", host]
    if port is not None:
        cmd += ["--port", str(port)]
    # Each worker leaves a snapshot of its counts there; any worker's /metrics sums them all.
    env = dict(os.environ, KEYPROXY_REUSE_PORT="1", KEYPROXY_METRICS_DIR=metrics_dir)
    return subprocess.Popen(cmd, env=env)


def supervise(config_path: str, host: str | None, port: int | None, workers: int) -> int:
    if port == 0:
        print("--workers needs a fixed port: workers share it", file=sys.stderr)
        return 2
    metrics_dir = tempfile.mkdtemp(prefix="keyproxy-metrics-")
    try:
        return _supervise(config_path, host, port, workers, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(
    config_path: str, host: str | None, port: int | None, workers: int, metrics_dir: str
) -> int:
    children = [_spawn(config_path, host, port, metrics_dir) for _ in range(workers)]
    started = [time.monotonic()] * workers
    stopping = False
    status = 0

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while not stopping:
        for i, child in enumerate(children):
            code = child.poll()
            if code is None or stopping:
                continue
            if time.monotonic() - started[i] < CRASH_LOOP_WINDOW:
                # Dying right after start (a bad config, a taken port) is not
                # fixed by restarting: stop everything and report it.
                status = code or 1
                forward(signal.SIGTERM, None)
                break
            time.sleep(RESTART_BACKOFF)
            children[i] = _spawn(config_path, host, port, metrics_dir)
            started[i] = time.monotonic()
        time.sleep(0.2)
    for child in children:
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return status
