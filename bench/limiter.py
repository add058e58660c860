"""Cost of one rate-limit decision, per store.

    python bench/limiter.py [--quick] [--redis-only]

Memory store: µs per `hit` on one hot bucket and over 100k distinct client IPs,
and bytes per bucket (tracemalloc). Redis store: CPU µs per `hit` (this
process's `time.process_time()`, best of several rounds) and wall time, as sequential
round trips and with 32 concurrent callers, against a redis-server this script starts
on a free loopback port (and always stops). Runs on uvloop when it is installed,
as `keyproxy serve` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keyproxy.config.model import Rate
from keyproxy.ratelimit.memory import MemoryLimiter
from keyproxy.ratelimit.redis import RedisLimiter
from tests.redis_server import running_redis

GENEROUS = Rate(1_000_000_000, 1.0, "1000000000/second")  # every hit allowed
STRICT = Rate(10, 3600.0, "10/hour")  # a hot bucket is refused after 10 hits


def ips(n: int) -> list[str]:
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(n)]


def per_hit_us(
    make: Callable[[], MemoryLimiter],
    calls: list[tuple[str, Rate]],
    quota: int | None,
    warm: bool = False,
) -> float:
    """Best of three runs, each on a fresh limiter (pre-filled with `calls` if `warm`)."""
    best = math.inf
    for _ in range(3):
        limiter = make()
        hit = limiter.hit
        now = 1000.0
        if warm:
            for ip, rate in calls:
                hit("bench", ip, rate, quota, now)
        start = time.perf_counter()
        for ip, rate in calls:
            hit("bench", ip, rate, quota, now)
            now += 1e-6
        best = min(best, time.perf_counter() - start)
    return best / len(calls) * 1e6


def bench_memory(n: int) -> None:
    print("memory store (µs per hit, best of 3)")
    hot = [("192.0.2.1", GENEROUS)] * n
    print(f"  hot bucket, allowed              {per_hit_us(MemoryLimiter, hot, None):6.2f}")
    print(f"  hot bucket, allowed + quota      {per_hit_us(MemoryLimiter, hot, 10**12):6.2f}")
    refused = [("192.0.2.1", STRICT)] * n
    print(f"  hot bucket, refused              {per_hit_us(MemoryLimiter, refused, None):6.2f}")

    calls = [(ip, GENEROUS) for ip in ips(100_000)]

    def full_size() -> MemoryLimiter:
        return MemoryLimiter(max_buckets=100_000)

    def small() -> MemoryLimiter:
        return MemoryLimiter(max_buckets=10_000)

    print(f"  100k distinct IPs, new buckets   {per_hit_us(full_size, calls, None):6.2f}")
    print(f"  100k distinct IPs, known buckets {per_hit_us(full_size, calls, None, True):6.2f}")
    print(f"  100k distinct IPs, 10k LRU       {per_hit_us(small, calls, None, True):6.2f}")

    gc.collect()
    tracemalloc.start()
    limiter = MemoryLimiter(max_buckets=100_000)
    before = tracemalloc.take_snapshot()
    for ip in ips(100_000):  # the address strings are made here: buckets keep them alive
        limiter.hit("bench", ip, GENEROUS, None, 1000.0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    print(f"  memory per bucket                {grown / 100_000:6.0f} bytes (IP string included)")


async def bench_redis(url: str, n: int, rounds: int) -> None:
    """CPU per hit from `time.process_time()` (this process only: redis-server's own
    work is not counted), best of `rounds`; wall-clock figures swing with the machine's
    load, CPU time much less."""
    limiter = RedisLimiter(url, timeout=1.0)
    try:
        for i in range(200):  # connect, load the script
            await limiter.hit("bench", f"10.0.0.{i % 50}", GENEROUS, None, 0.0)
        print(f"redis store (per hit, best of {rounds} rounds of {n} hits)")

        async def sequential() -> list[float]:
            for i in range(n):
                await limiter.hit("bench", f"10.0.0.{i % 50}", GENEROUS, 10**12, 0.0)
            return []

        async def concurrent(callers: int) -> list[float]:
            each = max(n // callers, 1)
            latencies: list[float] = []

            async def caller(c: int) -> None:
                for i in range(each):
                    t = time.perf_counter()
                    await limiter.hit("bench", f"10.{c}.0.{i % 50}", GENEROUS, 10**12, 0.0)
                    latencies.append(time.perf_counter() - t)

            await asyncio.gather(*(caller(c) for c in range(callers)))
            return latencies

        for label, run, total in (
            ("sequential round trips        ", sequential, n),
            ("32 concurrent callers         ", lambda: concurrent(32), 32 * max(n // 32, 1)),
        ):
            best_cpu = best_wall = math.inf
            latencies: list[float] = []
            for _ in range(rounds):
                gc.collect()
                cpu, wall = time.process_time(), time.perf_counter()
                got = await run()
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                if cpu < best_cpu:
                    best_cpu, latencies = cpu, sorted(got)
                best_wall = min(best_wall, wall)
            line = (
                f"  {label} {best_cpu / total * 1e6:6.1f} µs CPU, "
                f"wall {best_wall / total * 1e6:6.1f} µs ({total / best_wall:,.0f} hits/s)"
            )
            if latencies:
                line += (
                    f", latency p50 {latencies[len(latencies) // 2] * 1e6:.0f} µs,"
                    f" p99 {latencies[len(latencies) * 99 // 100] * 1e6:.0f} µs"
                )
            print(line)
    finally:
        await limiter.aclose()


def main() -> None:
    quick = "--quick" in sys.argv
    loop = "asyncio"
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        loop = "uvloop"
    print(f"Python {sys.version.split()[0]}, event loop {loop}")
    if "--redis-only" not in sys.argv:
        bench_memory(20_000 if quick else 200_000)
    with running_redis() as server:
        asyncio.run(bench_redis(server.url, 2_000 if quick else 10_000, 3 if quick else 5))


if __name__ == "__main__":
    main()
