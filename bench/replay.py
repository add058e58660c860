"""`keyproxy replay` speed: access-log lines re-decided per second, on one core.

It records a log of N requests (default 200,000) against the benchmark's
realistic policy (10,000 keys, 200 routes, referer and IP allowlists, rate
limits): each request is decided once by the live pipeline and written as the
server's access log writes it (`keyproxy.observe.lines`). Then it times
`keyproxy.commands.replay` reading that file, first under the same
configuration (nothing changes) and then under a candidate that narrows the
benchmarked key's IP allowlist (a tenth of its traffic changes).

Usage: python bench/replay.py [--lines 200000] [--keys 10000]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy import BENCH_REFERER, build_policy

from keyproxy.checks import Pipeline, build_checks
from keyproxy.commands.replay import read_lines, replay
from keyproxy.config import parse_config
from keyproxy.observe import describe_verdict, lines
from keyproxy.ratelimit import open_limiter
from keyproxy.request import Deny, Headers, RequestContext

ENV = {"UPSTREAM_SECRET": "bench-upstream-secret-0123456789"}
TABLES = ("posts", "users", "orders", "invoices", "comments")


def record(config_text: str, bench_key: str, n_lines: int, path: Path) -> float:
    """Decide `n_lines` requests with the live pipeline and write their access-log lines;
    returns the live decision's µs per request, to compare machines by."""
    config = parse_config(config_text, "bench", ENV)
    pipeline = Pipeline(build_checks(open_limiter(config.rate_limits)))
    rng = random.Random(7)
    ips = ["127.0.0.1", "127.0.0.2", "10.1.2.3", "192.168.4.5", "127.0.0.9"]
    start = time.time() - n_lines / 1000  # a thousand requests a second, ending now
    records = []
    deciding = 0.0
    for i in range(n_lines):
        table = rng.choice(TABLES)
        if rng.random() < 0.6:
            method, target = "GET", f"/v1/data/{table}/{rng.randrange(1000)}"
        elif rng.random() < 0.5:
            method, target = "GET", f"/v1/data/{table}?page={i % 9}&limit=20"
        else:
            method, target = "POST", f"/v1/data/{table}"
        headers = Headers.from_lowered(
            [("host", "api.example.com"), ("x-api-key", bench_key), ("referer", BENCH_REFERER)]
        )
        when = start + i / 1000
        ctx = RequestContext(config, method, target, headers, rng.choice(ips), when, f"r{i}")
        began = time.perf_counter()
        outcome = pipeline.decide(ctx)
        deciding += time.perf_counter() - began
        deny = outcome if isinstance(outcome, Deny) else None
        path_only, _, query = target.partition("?")
        verdict = describe_verdict(
            ctx.key.id if ctx.key else "-",
            ctx.key,
            None,
            ctx.peer_ip,
            method,
            path_only,
            ctx.route.match if ctx.route else None,
            "deny" if deny else "allow",
            deny.code if deny else None,
            BENCH_REFERER,
            ctx.credential_source,
            query,
            ctx.roles or None,
            (),
        )
        records.append((when, f"r{i}", deny.status if deny else 200, 120, 0.0004, 0.0006, verdict))
    path.write_bytes(lines(records))
    return deciding / n_lines * 1e6


def timed(config_text: str, log: Path) -> tuple[float, int, int]:
    config = parse_config(config_text, "candidate", ENV)
    start = time.perf_counter()
    with open(log, "rb") as stream:
        result = replay(config, read_lines(stream))
    elapsed = time.perf_counter() - start
    assert result.bad_lines == 0, result.bad_examples
    return elapsed, result.lines, result.changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=200_000)
    p.add_argument("--keys", type=int, default=10_000)
    args = p.parse_args(argv)
    policy = build_policy("http://127.0.0.1:8000", n_keys=args.keys)
    # The candidate: the benchmarked key loses 127.0.0.0/8 but keeps 127.0.0.1.
    candidate = policy.yaml.replace('      - "127.0.0.0/8"', '      - "127.0.0.1/32"', 1)
    assert candidate != policy.yaml
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "access.log"
        live = record(policy.yaml, policy.key, args.lines, log)
        size = os.path.getsize(log)
        print(f"log: {args.lines} lines, {size / 1e6:.1f} MB; policy: {args.keys} keys, 200 routes")
        print(f"live decision of the same requests (with the key's digest lookup): {live:.1f} µs")
        for name, text in (
            ("same configuration", policy.yaml),
            ("narrowed IP allowlist", candidate),
        ):
            elapsed, n, changed = timed(text, log)
            print(
                f"{name:>22}: {n / elapsed:>9,.0f} lines/s ({elapsed:.2f} s,"
                f" {elapsed / n * 1e6:.1f} µs/line, {elapsed / n * 1e6 / live:.2f}x a live"
                f" decision); {changed} verdicts change"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
