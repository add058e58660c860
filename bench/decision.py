"""The decision's own cost, without sockets: µs per request through the whole pipeline.

It builds what the server builds once a request's head is parsed (the
`RequestContext` over the parsed header list) and runs the same
`Pipeline.decide`, against the benchmark's realistic policy (10,000 keys, 200 routes, referer and IP
allowlists and a rate limit on the key). It also times loading a 100,000-key
registry, as YAML and as a `keys_file` of JSON lines, each in a fresh process
(seconds and peak RSS), and reports memory per key in the loaded registry.

Usage: python bench/decision.py [--iterations 200000] [--keys 10000] [--big-keys 100000]
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy import SMALL_PATH, build_policy

from keyproxy.checks import Pipeline, build_checks
from keyproxy.config import parse_config
from keyproxy.policy import routes
from keyproxy.ratelimit import open_limiter
from keyproxy.request import Headers, RequestContext

ENV = {"UPSTREAM_SECRET": "bench-upstream-secret-0123456789"}


def request_headers(key: str, referer: str) -> list[tuple[bytes, bytes]]:
    """What wrk-like clients send, as the parser hands it over."""
    return [
        (b"Host", b"127.0.0.1:8080"),
        (b"User-Agent", b"bench/1.0"),
        (b"Accept", b"application/json"),
        (b"X-API-Key", key.encode()),
        (b"Referer", referer.encode()),
        (b"Accept-Encoding", b"gzip"),
    ]


def time_decisions(
    iterations: int, n_keys: int, distinct: bool = False, cold_routes: bool = False
) -> tuple[float, str]:
    """µs per decision; `distinct` sends a new path (id) each time; `cold_routes`
    empties the route table's shape cache before every lookup, the worst case."""
    policy = build_policy("http://127.0.0.1:8000", n_keys=n_keys)
    config = parse_config(policy.yaml, "bench", ENV)
    pipeline = Pipeline(build_checks(open_limiter(config.rate_limits)))
    raw = request_headers(policy.key, policy.referer)
    base = SMALL_PATH.rsplit("/", 1)[0]
    paths = [f"{base}/{i}" for i in range(iterations)] if distinct else [SMALL_PATH] * iterations
    # What the parser callbacks hand over (counted in bench/datapath.py, not here).
    lowered = [(n.lower().decode("latin-1"), v.decode("latin-1")) for n, v in raw]
    deny = None
    cache_size = routes.SHAPE_CACHE_SIZE
    if cold_routes:
        routes.SHAPE_CACHE_SIZE = 0  # no shape is remembered
    try:
        start = time.perf_counter()
        for path in paths:
            headers = Headers.from_lowered(lowered)
            ctx = RequestContext(config, "GET", path, headers, "127.0.0.1", time.time(), "bench")
            deny = pipeline.decide(ctx)  # synchronous: the memory store never waits
        elapsed = time.perf_counter() - start
    finally:
        routes.SHAPE_CACHE_SIZE = cache_size
    assert deny is None, deny  # a benchmark of refusals would measure the wrong thing
    return elapsed / iterations * 1e6, config.summary()


JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123"
USERS_SECTION = f"""
users:
  jwt: {{algorithms: [HS256], secret: {JWT_SECRET}, issuer: bench, audience: any, leeway: 30s}}
"""


def time_token_decisions(iterations: int, n_keys: int) -> tuple[float, float]:
    """µs per decision with `users` configured: without a token, and with the same
    (cached after its first verification) token on every request."""
    import jwt

    policy = build_policy("http://127.0.0.1:8000", n_keys=n_keys)
    config = parse_config(policy.yaml + USERS_SECTION, "bench", ENV)
    token = jwt.encode(
        {"sub": "alice", "iss": "bench", "exp": int(time.time()) + 3600}, JWT_SECRET, "HS256"
    )
    best = [float("inf"), float("inf")]
    pipeline = Pipeline(build_checks(open_limiter(config.rate_limits)))
    rounds = 5  # interleaved, best of each: on a shared machine the difference is the point
    for _ in range(rounds):
        for with_token in (False, True):
            raw = request_headers(policy.key, policy.referer)
            if with_token:
                raw.append((b"Authorization", b"Bearer " + token.encode()))
            lowered = [(n.lower().decode("latin-1"), v.decode("latin-1")) for n, v in raw]
            deny = None
            # CPU time, not wall time: on a shared machine, time spent descheduled would
            # swamp a difference of a few µs.
            start = time.process_time()
            for _ in range(iterations // rounds):
                headers = Headers.from_lowered(lowered)
                ctx = RequestContext(
                    config, "GET", SMALL_PATH, headers, "127.0.0.1", time.time(), "bench"
                )
                deny = pipeline.decide(ctx)
            elapsed = (time.process_time() - start) / (iterations // rounds) * 1e6
            best[with_token] = min(best[with_token], elapsed)
            assert deny is None, deny
    return best[0], best[1]


def time_first_seen_rs256(tokens: int = 2000) -> float:
    """µs to verify an RS256 token never seen before (the signature check, not the cache)."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    from keyproxy.policy.users import JwtSettings, TokenVerifier

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    verifier = TokenVerifier(
        JwtSettings(algorithms=("RS256",), public_key=private.public_key(), cache_size=tokens)
    )
    exp = int(time.time()) + 3600
    signed = [jwt.encode({"sub": f"u{i}", "exp": exp}, private, "RS256") for i in range(tokens)]
    now = time.time()
    start = time.process_time()
    for token in signed:
        verifier.verify(token, now)
    elapsed = time.process_time() - start
    assert len(verifier.cache) == tokens
    return elapsed / tokens * 1e6


#: Peak RSS from VmHWM: `ru_maxrss` would carry the parent's peak across fork and exec.
_LOAD_CHILD = """
import re, sys, time
from keyproxy.config import load_config
start = time.perf_counter()
cpu = time.process_time()
config = load_config(sys.argv[1])
wall, cpu = time.perf_counter() - start, time.process_time() - cpu
status = open("/proc/self/status").read()
print(len(config.keys), wall, cpu, int(re.search(r"VmHWM:\\s+(\\d+)", status).group(1)) / 1024)
"""


def time_big_load(n_keys: int, rounds: int = 2) -> dict[str, tuple[float, float, float]]:
    """Per file format: wall seconds, CPU seconds and peak RSS (MiB) of loading `n_keys`,
    best of `rounds`, each in a fresh process so its peak RSS is the load's alone."""
    from reload import split_keys

    policy = build_policy("http://127.0.0.1:8000", n_keys=n_keys)
    results: dict[str, tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        yaml_path = Path(tmp) / "big.yaml"
        yaml_path.write_text(policy.yaml)
        text, lines = split_keys(policy.yaml, "keys.jsonl")
        (Path(tmp) / "keys.jsonl").write_bytes(lines)
        jsonl_path = Path(tmp) / "big-keys-file.yaml"
        jsonl_path.write_text(text)
        env = {**os.environ, **ENV}
        for _ in range(rounds):  # interleaved: both see the same machine
            for name, path in (("YAML", yaml_path), ("keys_file", jsonl_path)):
                out = subprocess.run(
                    [sys.executable, "-c", _LOAD_CHILD, str(path)],
                    capture_output=True, text=True, env=env, check=True,
                )  # fmt: skip
                count, wall, cpu, rss = out.stdout.split()
                assert int(count) == n_keys, out.stdout
                best = results.get(name, (float("inf"),) * 3)
                results[name] = (
                    min(best[0], float(wall)),
                    min(best[1], float(cpu)),
                    min(best[2], float(rss)),
                )
    return results


def registry_bytes_per_key(n_keys: int) -> float:
    """Memory the loaded registry keeps per key (whole config / keys, tracemalloc)."""
    policy = build_policy("http://127.0.0.1:8000", n_keys=n_keys)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    config = parse_config(policy.yaml, "bench", ENV)
    gc.collect()
    retained = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return retained / len(config.keys)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=200_000)
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--big-keys", type=int, default=100_000)
    args = p.parse_args(argv)
    per_decision, summary = time_decisions(args.iterations, args.keys)
    print(f"decision ({summary}), one path: {per_decision:.2f} µs per request")
    per_decision, _ = time_decisions(args.iterations, args.keys, distinct=True)
    print(f"decision ({summary}), a new path each time: {per_decision:.2f} µs per request")
    per_decision, _ = time_decisions(args.iterations, args.keys, distinct=True, cold_routes=True)
    print(
        f"decision ({summary}), a new path each time, no route shape cache: "
        f"{per_decision:.2f} µs per request"
    )
    without, cached = time_token_decisions(args.iterations, args.keys)
    print(
        f"decision with users configured: no token {without:.2f} µs, the same cached token "
        f"{cached:.2f} µs (+{cached - without:.2f} µs per request)"
    )
    print(f"a first-seen RS256 (2048-bit) token: {time_first_seen_rs256():.0f} µs to verify")
    for name, (wall, cpu, rss) in time_big_load(args.big_keys).items():
        print(
            f"load {args.big_keys} keys ({name}), in a fresh process: {wall:.2f} s "
            f"({cpu:.2f} s CPU), peak RSS {rss:.0f} MiB (best of 2)"
        )
    per_key = registry_bytes_per_key(args.keys)
    print(f"registry memory: {per_key:.0f} B per key ({args.keys} keys, tracemalloc)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
