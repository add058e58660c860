"""What seeing a request costs: µs per request for the metrics and the access log together.

Times `Observer.exchange_finished` (the one call every finished exchange makes:
the counts, both histograms and the queued access-log line) plus turning the
queued lines into JSON (done once per flush on the loop, so charged to every
request here), over a request the real pipeline has just decided.

For comparison it times the same counts kept with `prometheus_client`'s own
metric objects (`labels(...).inc()` and `Histogram.observe`), in-process and in
the library's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`, mmap files per
process), the two designs that were not chosen.

Usage: python bench/observe.py [--iterations 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy import SMALL_PATH, build_policy

from keyproxy.checks import Pipeline, build_checks
from keyproxy.config import parse_config
from keyproxy.observe import AccessLog, Observer, metrics
from keyproxy.ratelimit import open_limiter
from keyproxy.request import Headers, RequestContext
from keyproxy.wire.exchange import Exchange

ENV = {"UPSTREAM_SECRET": "bench-upstream-secret-0123456789"}
LABELS = ("key", "route", "method", "status", "decision")


def decided_exchange(loop: asyncio.AbstractEventLoop) -> Exchange:
    policy = build_policy("http://127.0.0.1:8000", n_keys=1000)
    config = parse_config(policy.yaml, "bench", ENV)
    pipeline = Pipeline(build_checks(open_limiter(config.rate_limits)))
    headers = [
        ("host", "127.0.0.1:8080"),
        ("x-api-key", policy.key),
        ("referer", policy.referer),
        ("accept", "application/json"),
    ]
    target = SMALL_PATH + "?page=2&size=10"
    ctx = RequestContext(config, "GET", target, Headers.from_lowered(headers), "127.0.0.1", 0.0)
    assert pipeline.decide(ctx) is None, "the benchmark request must be allowed"
    proxy = SimpleNamespace(observer=None)
    conn = SimpleNamespace(loop=loop, peer_ip="127.0.0.1", proxy=proxy)
    ex = Exchange(conn, "GET", target, [], True, True, "0123456789ab00000001")  # type: ignore[arg-type]
    ex.ctx = ctx
    ex.allowed = True
    ex.status = 200
    ex.sent = 512
    ex.upstream_started = ex.started
    return ex, config  # type: ignore[return-value]


#: Requests per timed batch: what one half-second flush holds at 10,000 requests/s.
BATCH = 5000


def time_observer(iterations: int) -> tuple[float, float]:
    """The best batch of each, as `timeit` reports, in this thread's CPU time: on a shared
    machine the minimum is the cost, the rest is other processes' noise."""
    loop = asyncio.new_event_loop()
    try:
        ex, config = decided_exchange(loop)  # type: ignore[misc]
        observer = Observer(config, loop)
        log = observer.access_log = AccessLog("off-the-record")  # queued, never written here
        finished = observer.exchange_finished
        counted = serialized = float("inf")
        for _ in range(max(1, iterations // BATCH)):
            start = time.thread_time()
            for _ in range(BATCH):
                finished(ex)
            counted = min(counted, time.thread_time() - start)
            start = time.thread_time()
            data = log._take_lines()
            serialized = min(serialized, time.thread_time() - start)
            assert data.count(b"\n") == BATCH
        assert sum(metrics.requests.values()) >= BATCH
        return counted / BATCH * 1e6, serialized / BATCH * 1e6
    finally:
        loop.close()


PROMETHEUS_OBJECTS = """
import sys, time
from prometheus_client import Counter, Histogram
from keyproxy.observe import BUCKETS
n = int(sys.argv[1])
requests = Counter("r", "", ["key", "route", "method", "status", "decision"])
request_s = Histogram("d", "", buckets=BUCKETS)
upstream_s = Histogram("u", "", buckets=BUCKETS)
best = float("inf")
for _ in range(max(1, n // 5000)):
    start = time.thread_time()
    for _ in range(5000):
        requests.labels("k1", "GET /v1/data/{table}", "GET", "200", "allow").inc()
        request_s.observe(0.0012)
        upstream_s.observe(0.0009)
    best = min(best, time.thread_time() - start)
print(best / 5000 * 1e6)
"""


def time_prometheus_objects(iterations: int, multiprocess: bool) -> float:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if multiprocess:
            env["PROMETHEUS_MULTIPROC_DIR"] = tmp
        out = subprocess.run(
            [sys.executable, "-c", PROMETHEUS_OBJECTS, str(iterations)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    args = parser.parse_args()
    counted, serialized = time_observer(args.iterations)
    objects = time_prometheus_objects(args.iterations, multiprocess=False)
    mmap = time_prometheus_objects(args.iterations, multiprocess=True)
    print(f"exchange_finished (counts + histograms + queued log line): {counted:.2f} µs/request")
    print(f"access-log JSON serialisation (writer thread, orjson):    {serialized:.2f} µs/request")
    print(f"together:                                                  {counted + serialized:.2f}")
    print(f"prometheus_client objects, in-process (counts only):       {objects:.2f} µs/request")
    print(f"prometheus_client objects, multiprocess mmap (counts only): {mmap:.2f} µs/request")


if __name__ == "__main__":
    main()
