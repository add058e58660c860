"""Body work through a real `keyproxy serve`: field filtering, body scrubbing, cache hits.

One keep-alive client sends requests one after another (latency, not throughput)
to keyproxy in front of tests/upstream_server.py, and reports the median time per
request for each case, and the difference per KiB against the case without the work:

* filtering: the same JSON list (1 KiB, 64 KiB, 1 MiB) read with a key without
  `fields` and with a key whose `fields: {exclude: [email, author.phone]}` applies;
* body scrubbing: a 64 KiB and a 1 MiB body on a route with `scrub_body: false`
  and on the same upstream path through a route that scans it;
* cache: a 1 KiB and a 64 KiB JSON read from the upstream (a route not cached)
  and from the cache (the same body on a cached route, after one miss).

Usage: python bench/body_work.py [--requests 200]
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.procs import start_upstream
from tests.proxy_process import KEYS, base_config, digest, start_keyproxy

FILTERED = "pk_" + "f" * 64
SIZES = {"1 KiB": 1024, "64 KiB": 64 * 1024, "1 MiB": 1024 * 1024}


def timed(conn: http.client.HTTPConnection, path: str, key: str, n: int) -> float:
    """Median seconds per request over `n` requests (after 5 unmeasured ones)."""
    samples = []
    for i in range(n + 5):
        start = time.perf_counter()
        conn.request("GET", path, headers={"X-API-Key": key})
        response = conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - start
        assert response.status == 200, (path, response.status, body[:200])
        if i >= 5:
            samples.append(elapsed)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    n = args.requests
    upstream = start_upstream(header_secrets={"X-Upstream-Key": "bench-body-secret-0123456789"})
    config = base_config(upstream.url, upstream.inject())
    config["server"]["max_body"] = "4MiB"
    config["routes"] = [
        {"match": "GET /raw/big/{n}", "acl": "get", "scrub_body": False},
        {"match": "GET /cached/json/{n}", "acl": "get"},
        *config["routes"],
    ]
    config["keys"].append(
        {
            "id": "filtered",
            "hash": digest(FILTERED),
            "type": "read",
            "fields": {"exclude": ["email", "author.phone"]},
        }
    )
    config["cache"] = {
        "backend": "memory",
        "ttl": "10m",
        "routes": ["GET /cached/json/{n}"],
        "max_bytes": "64MiB",
        "max_entry_bytes": "2MiB",
    }
    with tempfile.TemporaryDirectory() as tmp:
        kp = start_keyproxy(Path(tmp), config)
        try:
            conn = http.client.HTTPConnection(kp.host, kp.port, timeout=30)
            reader = KEYS["reader"]
            print(f"median per request over {n} sequential keep-alive requests\n")
            print("| body | unfiltered | filtered | filtering cost | per KiB |")
            print("|---|---:|---:|---:|---:|")
            for name, size in SIZES.items():
                count = n if size < 1 << 20 else max(20, n // 10)
                plain = timed(conn, f"/json/{size}", reader, count)
                filtered = timed(conn, f"/json/{size}", FILTERED, count)
                extra = filtered - plain
                print(
                    f"| {name} | {plain * 1e6:,.0f} µs | {filtered * 1e6:,.0f} µs "
                    f"| {extra * 1e6:,.0f} µs | {extra * 1e6 / (size / 1024):.1f} µs |"
                )
            print("\n| body | scrub_body: false | scanned | scan cost | per KiB |")
            print("|---|---:|---:|---:|---:|")
            for name, size in (("64 KiB", 64 * 1024), ("1 MiB", 1024 * 1024)):
                count = n if size < 1 << 20 else max(20, n // 10)
                raw = timed(conn, f"/raw/big/{size}", reader, count)
                scanned = timed(conn, f"/big/{size}", reader, count)
                extra = scanned - raw
                print(
                    f"| {name} | {raw * 1e6:,.0f} µs | {scanned * 1e6:,.0f} µs "
                    f"| {extra * 1e6:,.0f} µs | {extra * 1e6 / (size / 1024):.2f} µs |"
                )
            print("\n| body | from the upstream | cache hit | hit, filtered key |")
            print("|---|---:|---:|---:|")
            for name, size in (("1 KiB", 1024), ("64 KiB", 64 * 1024)):
                upstream_time = timed(conn, f"/json/{size}", reader, n)
                hit = timed(conn, f"/cached/json/{size}", reader, n)
                hit_filtered = timed(conn, f"/cached/json/{size}", FILTERED, n)
                print(
                    f"| {name} | {upstream_time * 1e6:,.0f} µs | {hit * 1e6:,.0f} µs "
                    f"| {hit_filtered * 1e6:,.0f} µs |"
                )
            conn.close()
        finally:
            kp.stop()
            upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
