"""keyproxy's own per-request CPU cost, without sockets or a kernel.

Feeds one request's bytes to a client connection and the upstream's answer
to a pooled upstream connection, both over in-memory transports, through the
real parser callbacks, pipeline and forwarding code. What is left out is what
no proxy can avoid: system calls and the event loop's polling. Useful to see,
deterministically, what a change to the hot path costs.

`--full` runs the full policy (a cached end-user JWT, roles, a quota, identity
headers, the access log to a file, whose queued lines are serialised and written
on this thread after each round, so their CPU counts too).

Times are CPU time of this process (`time.process_time`), best of 5 rounds: on a
shared machine, time spent descheduled would swamp a difference of a few µs.

`--breakdown` prints where the microseconds go, by area of the code: cProfile's
own time per function (built-ins charged to their caller), grouped by module and
scaled to the unprofiled per-request time. The profiler's overhead is per call, so
call-heavy areas come out somewhat larger than they are: a map, not a stopwatch.

`--opcodes` counts the Python bytecodes and Python calls of one request instead
(`sys.settrace`): a deterministic figure, unlike time on a shared machine, for
telling whether a change removed work (C code, syscalls not included).

Usage: python bench/datapath.py [--iterations 100000] [--full] [--profile | --breakdown | --opcodes]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policy import SMALL_PATH, Features, build_policy

from keyproxy.app import ProxyServer
from keyproxy.config import parse_config
from keyproxy.config.reload import ConfigHolder
from keyproxy.wire.client import ClientConnection
from keyproxy.wire.upstream import UpstreamConnection
from tests.memory_transport import MemoryTransport

ENV = {"UPSTREAM_SECRET": "bench-upstream-secret-0123456789"}
BODY = b'[{"id": 0, "title": "post 0", "author": {"name": "alice", "phone": "555"}}]' * 4
#: What nginx answers for a static JSON file.
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 11:10:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n"
    b"Last-Modified: Thu, 26 Nov 2026 10:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6745a2b0-12d"\r\nAccept-Ranges: bytes\r\n\r\n' % len(BODY)
) + BODY


def setup(
    n_keys: int, access_log: str | None = None, full: bool = False
) -> tuple[ClientConnection, UpstreamConnection, bytes, MemoryTransport]:
    if full:
        assert access_log is not None
        features = Features.full(access_log)
    else:
        features = Features(access_log=access_log)
    policy = build_policy("http://127.0.0.1:8000", n_keys=n_keys, features=features)
    config = parse_config(policy.yaml, "bench", ENV)
    try:
        import uvloop
    except ImportError:  # the standard loop works too; uvloop is what `serve` uses
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    proxy = ProxyServer(ConfigHolder(config), loop)
    client = ClientConnection(proxy)
    client_transport = MemoryTransport(keep=False)
    client.connection_made(client_transport)
    pool = proxy.serving.pool
    upstream = UpstreamConnection(pool)
    upstream.connection_made(MemoryTransport(keep=False))
    pool._open += 1
    pool.release(upstream, True)
    request = (
        f"GET {SMALL_PATH} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-API-Key: {policy.key}\r\n"
        f"Referer: {policy.referer}\r\n"
        + (f"Authorization: Bearer {policy.token}\r\n" if policy.token else "")
        + "\r\n"
    ).encode()
    return client, upstream, request, client_transport


def serve_one(client: ClientConnection, upstream: UpstreamConnection, request: bytes) -> None:
    """One request as `serve` meets it: the client's read and the upstream's, each in
    its own loop turn, which ends by sending what was written (keyproxy.wire.outbox).
    The turn's end is called here, as the loop is not running."""
    outbox = client.outbox
    client.data_received(request)
    outbox.send()
    upstream.data_received(RESPONSE)
    outbox.send()


def end_turns(client: ClientConnection) -> None:
    """Run the loop callbacks the held writes scheduled (no-ops by now: each was sent
    by `serve_one`), so they do not pile up over a round."""
    loop = client.loop
    loop.call_soon(loop.stop)
    loop.run_forever()


def drain_access_log(client: ClientConnection) -> None:
    """What the writer thread does every 0.5 s in `serve`: serialise and write the lines."""
    log = client.proxy.observer.access_log
    if log is not None and log.pending:
        records, log.pending = log.pending, []
        log._write_records(records)


#: Areas of the code, by module path (first match), for `--breakdown`.
AREAS = (
    ("keyproxy/wire/client.py", "client side: request parsing, queueing"),
    ("keyproxy/wire/upstream.py", "upstream side: pool, parsing the answer"),
    ("keyproxy/wire/exchange.py", "exchange: forwarding, framing the answer"),
    ("keyproxy/checks/", "decision: memo, rate limit (and steps 0-7 on a miss)"),
    ("keyproxy/policy/", "decision: memo, rate limit (and steps 0-7 on a miss)"),
    ("keyproxy/ratelimit/", "decision: memo, rate limit (and steps 0-7 on a miss)"),
    ("keyproxy/forward/", "upstream request head"),
    ("keyproxy/response/body", "response body scan for the secret"),
    ("keyproxy/response/", "response chain: header hygiene, limit headers"),
    ("keyproxy/observe.py", "metrics and the access log"),
    ("keyproxy/app.py", "server: decision meets transport"),
    ("keyproxy/request.py", "server: decision meets transport"),
)


def breakdown(stats: pstats.Stats, per_request: float, requests: int) -> list[tuple[str, float]]:
    """µs per request by area, scaled so the areas add up to `per_request`."""
    own: dict[str, float] = {}

    def area(where: str) -> str:
        for prefix, name in AREAS:
            if prefix in where:
                return name
        return "other (bench harness, interpreter)"

    table = stats.stats  # type: ignore[attr-defined]  # pstats keeps its table here
    for (file, _line, _name), (_cc, _nc, tt, _ct, callers) in table.items():
        if file == "~":  # a built-in: charge each caller its share
            for (caller_file, _l, _n), share in callers.items():
                name = area(caller_file)
                own[name] = own.get(name, 0.0) + share[2]
        else:
            own[area(file)] = own.get(area(file), 0.0) + tt
    total = sum(own.values())
    return sorted(((name, t / total * per_request) for name, t in own.items()), key=lambda x: -x[1])


def run(
    iterations: int,
    n_keys: int,
    profile: bool,
    access_log: str | None = None,
    full: bool = False,
) -> tuple[float, pstats.Stats | None]:
    client, upstream, request, client_transport = setup(n_keys, access_log, full)
    for _ in range(100):  # warm up caches and the interpreter's specialisation
        serve_one(client, upstream, request)
    end_turns(client)
    before = client_transport.written
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    rounds = []
    drain_access_log(client)
    for _ in range(5):  # the fastest round: the least disturbed by anything else running
        start = time.process_time()
        for _ in range(iterations // 5):
            serve_one(client, upstream, request)
        drain_access_log(client)
        rounds.append(time.process_time() - start)
        end_turns(client)
    elapsed = min(rounds) * 5
    stats = None
    if profiler is not None:
        profiler.disable()
        stats = pstats.Stats(profiler)
    answered = (client_transport.written - before) // (iterations // 5 * 5)
    assert answered > len(BODY), "the proxy did not answer with the body"
    return elapsed / iterations * 1e6, stats


def count_opcodes(access_log: str, full: bool, requests: int = 200) -> tuple[float, float]:
    """Python bytecodes and Python calls per request, after a warm-up."""
    client, upstream, request, _ = setup(10_000, access_log, full)
    for _ in range(300):
        serve_one(client, upstream, request)
    drain_access_log(client)  # the warm-up's lines are not the counted requests' work
    end_turns(client)
    counts = [0, 0]

    def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "opcode":
            counts[0] += 1
        elif event == "call":
            counts[1] += 1
            frame.f_trace_opcodes = True
        return tracer

    sys.settrace(tracer)
    try:
        for _ in range(requests):
            serve_one(client, upstream, request)
        drain_access_log(client)
    finally:
        sys.settrace(None)
    return counts[0] / requests, counts[1] / requests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=100_000)
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--profile", action="store_true", help="print a cProfile table as well")
    p.add_argument("--breakdown", action="store_true", help="µs per request by area of the code")
    p.add_argument("--opcodes", action="store_true", help="Python bytecodes per request")
    p.add_argument("--full", action="store_true", help="the full policy (JWT, access log, ...)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        # Both policies log to a file here (the minimal one logs to stdout by default in
        # `serve`): the lines' CPU then counts alike, and the output stays readable.
        log = str(Path(tmp) / "access.log")
        if args.opcodes:
            opcodes, calls = count_opcodes(log, args.full)
            policy = "full policy" if args.full else "minimal policy"
            print(
                f"{opcodes:.0f} Python bytecodes, {calls:.1f} Python calls per request ({policy})"
            )
            return 0
        per_request, _ = run(args.iterations, args.keys, False, log, args.full)
        if args.profile or args.breakdown:
            _, stats = run(args.iterations, args.keys, True, log, args.full)
            assert stats is not None
            if args.profile:
                stats.sort_stats("tottime").print_stats(25)
            if args.breakdown:
                for name, us in breakdown(stats, per_request, args.iterations):
                    print(f"{us:7.2f} µs  {name}")
    policy = "full policy" if args.full else "minimal policy"
    print(
        f"data path + decision, no sockets: {per_request:.2f} µs per request "
        f"({policy}; CPU time, best of 5 rounds)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
