"""Body work: field filtering, body scrubbing, cache hits — in-process and through the proxy.

In-process (`--pure`, and the first part of a full run): the real response links
(`ScrubLink`, `FieldsLink`) driven the way the exchange drives them (heads in
order, each chunk through each link, then each link's end), over the bodies the
upstream of the tests serves. Figures are CPU time of this process
(`time.process_time`), best of `--rounds` rounds: on a shared machine, time spent
descheduled would swamp the difference. Per KiB is the cost divided by the body's
size.

* scrubbing: a JSON list, the same with PHP's `\\/` escapes, an HTML table dense with
  `&amp;`, and a binary body (every byte value, so a `%` every 256 bytes) of 1 KiB,
  64 KiB and 1 MiB, with the upstream secret of the proxy part,
  in one chunk (a `Content-Length` body read at once), in 16 KiB chunks, and
  without a declared length (chunked framing, 16 KiB chunks);
* filtering: the same JSON lists read with `fields: {exclude: [email,
  author.phone]}` and `{include: [id, title, author.name]}`, each body new to the
  filter's memo (the filtering itself), and `bench/run.py`'s json64k body with its
  `{exclude: [author.email, internal]}` (the `keyproxy-fields` target): answered from
  the memo (the same bytes again), missed (every body differs, as json64k-varied), and
  with no memo at all.

Through a real `keyproxy serve` (skipped with `--pure`): one keep-alive client
sends requests one after another to keyproxy in front of tests/upstream_server.py,
and reports the median time per request, and keyproxy's own CPU per request
(/proc/<pid>/task/*/schedstat), for each case against the case without the work:

* filtering: the same JSON list (1 KiB, 64 KiB, 1 MiB) read with a key without
  `fields` and with a key whose `fields: {exclude: [email, author.phone]}` applies;
* body scrubbing: a 64 KiB and a 1 MiB body on a route with `scrub_body: false`
  and on the same upstream path through a route that scans it;
* cache: a 1 KiB and a 64 KiB JSON read from the upstream (a route not cached)
  and from the cache (the same body on a cached route, after one miss).

Usage: python bench/body_work.py [--pure | --proxy] [--rounds 7] [--requests 200]
"""

from __future__ import annotations

import argparse
import gc
import http.client
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import FIELDS_EXCLUDE, VARY_MARK, _json_array

from keyproxy.config.model import Key, KeyType, Route
from keyproxy.request import Deny, Headers, RequestContext
from keyproxy.response.body_links import BodyScrubFactory, FieldsFactory
from keyproxy.response.body_scrub import BodyScrubber
from keyproxy.response.chain import ResponseHead
from keyproxy.response.fields import FilterLimits, FilterMemo, compile_fields
from tests.procs import start_upstream
from tests.proxy_process import KEYS, base_config, digest, start_keyproxy
from tests.upstream_server import big_body, json_body

FILTERED = "pk_" + "f" * 64
SECRET = "bench-body-secret-0123456789"
SIZES = {"1 KiB": 1024, "64 KiB": 64 * 1024, "1 MiB": 1024 * 1024}
#: What an upstream's answer head looks like once the framing headers are gone.
HEAD_LINES = (
    b"Server: nginx/1.22.1",
    b"Date: Thu, 26 Nov 2026 11:10:00 GMT",
    b"Content-Type: application/json",
    b"Last-Modified: Thu, 26 Nov 2026 10:00:00 GMT",
    b'ETag: "6745a2b0-12d"',
    b"Accept-Ranges: bytes",
)


def php_json_body(size: int) -> bytes:
    """A JSON list as PHP's `json_encode` writes it: every `/` of its URLs as `\\/` (a
    backslash every ~15 bytes: the dense case for the scan's JSON-escape check)."""
    record = b'{"id":1,"url":"https:\\/\\/example.com\\/a\\/b\\/c","title":"say \\"hi\\""},'
    return (b"[" + record * (size // len(record) + 1))[:size]


def html_body(size: int) -> bytes:
    """An HTML table dense with `&amp;` and `&nbsp;` (the dense case for the HTML check)."""
    row = b"<tr><td>fish &amp; chips</td><td>&nbsp;&lt;3</td></tr>\n"
    return (b"<table>" + row * (size // len(row) + 1))[:size]


# --------------------------------------------------------------------------- in-process


def best_cpu(fn: Callable[[], object], rounds: int, budget: float = 0.2) -> float:
    """CPU seconds per call, the best of `rounds` rounds of about `budget` seconds each."""
    start = time.process_time()
    fn()
    once = max(time.process_time() - start, 1e-6)
    calls = max(1, int(budget / once))
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - start) / calls)
    return best


def context(fields: object = None) -> RequestContext:
    ctx = RequestContext(None, "GET", "/x", Headers([]), "127.0.0.1", 0.0)  # type: ignore[arg-type]
    ctx.key = Key("k", b"", KeyType.READ, frozenset(), fields=fields)  # type: ignore[arg-type]
    ctx.route = Route(0, "GET /x", frozenset({"GET", "HEAD"}), ("x",), "a")
    return ctx


def through_link(
    make: Callable[[RequestContext], object],
    ctx: RequestContext,
    chunks: list[bytes],
    length: int | None,
) -> int:
    """One answer through one link, as the exchange runs it; the bytes that leave."""
    link = make(ctx)
    assert link is not None
    head = ResponseHead(200, [line + b"\r\n" for line in HEAD_LINES], length, "GET")
    if link.on_head(head) is not None:  # type: ignore[attr-defined]
        raise AssertionError("refused")
    sent = 0
    for chunk in chunks:
        sent += len(link.on_body(chunk))  # type: ignore[attr-defined]
    rest = link.on_end()  # type: ignore[attr-defined]
    assert not isinstance(rest, Deny)
    return sent + len(rest)


def pure(rounds: int) -> None:
    scrub = BodyScrubFactory(BodyScrubber((SECRET,), None, same_length=True), 8 << 20)
    ctx = context()
    print(f"In-process, CPU time per body, best of {rounds} rounds\n")
    print("| body scrub | size | one chunk | per KiB | 16 KiB chunks | per KiB | no length |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    kinds = (
        ("JSON", json_body),
        ("JSON, `\\/` escapes", php_json_body),
        ("HTML, `&amp;`", html_body),
        ("binary", big_body),
    )
    for kind, make_body in kinds:
        for name, size in SIZES.items():
            body = make_body(size)
            kib = len(body) / 1024
            pieces = [body[i : i + 16384] for i in range(0, len(body), 16384)]
            whole = best_cpu(lambda b=body: through_link(scrub, ctx, [b], len(b)), rounds)
            split = best_cpu(lambda b=body, p=pieces: through_link(scrub, ctx, p, len(b)), rounds)
            unknown = best_cpu(lambda p=pieces: through_link(scrub, ctx, p, None), rounds)
            print(
                f"| {kind} | {name} | {whole * 1e6:,.1f} µs | {whole * 1e6 / kib:.2f} µs "
                f"| {split * 1e6:,.1f} µs | {split * 1e6 / kib:.2f} µs | {unknown * 1e6:,.1f} µs |"
            )
    fields = FieldsFactory(FilterLimits(), memo=FilterMemo(0))  # the filtering, every time
    exclude = context(compile_fields("exclude", ["email", "author.phone"]))
    include = context(compile_fields("include", ["id", "title", "author.name"]))
    print("\n| fields | size | records | exclude | per KiB | include | per KiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, size in SIZES.items():
        body = json_body(size)
        kib = len(body) / 1024
        records = body.count(b'"id"')
        out = best_cpu(lambda b=body: through_link(fields, exclude, [b], len(b)), rounds)
        keep = best_cpu(lambda b=body: through_link(fields, include, [b], len(b)), rounds)
        print(
            f"| JSON list | {name} | {records} | {out * 1e6:,.1f} µs | {out * 1e6 / kib:.2f} µs "
            f"| {keep * 1e6:,.1f} µs | {keep * 1e6 / kib:.2f} µs |"
        )
    body = _json_array(64 * 1024)
    target = context(compile_fields("exclude", list(FIELDS_EXCLUDE)))
    out = best_cpu(lambda: through_link(fields, target, [body], len(body)), rounds)
    both = best_cpu(
        lambda: through_link(fields, target, [scrubbed(scrub, ctx, body)], len(body)), rounds
    )
    print(
        f"\nbench/run.py json64k, exclude {list(FIELDS_EXCLUDE)}, no memo: filter "
        f"{out * 1e6:,.1f} µs ({out * 1e6 / 64:.2f} µs/KiB); scrub + filter {both * 1e6:,.1f} µs"
    )
    # The snapshot's factory, memo included: the same bytes again hit; 64 bodies that
    # differ by a counter (as json64k-varied), taken in turn, outnumber what the memo
    # holds (~30 such answers), so each one misses.
    memoised = FieldsFactory(FilterLimits())
    hit = best_cpu(lambda: through_link(memoised, target, [body], len(body)), rounds)
    template = _json_array(64 * 1024, VARY_MARK)
    varied = [template.replace(VARY_MARK, b"%016d" % i) for i in range(64)]
    turn = iter(range(1 << 62))

    def next_varied() -> int:
        data = varied[next(turn) % len(varied)]
        return through_link(memoised, target, [data], len(data))

    miss = best_cpu(next_varied, rounds)
    print(
        f"with the memo: hit {hit * 1e6:,.1f} µs, miss {miss * 1e6:,.1f} µs "
        f"(memo holds {len(memoised.memo)} answers, {memoised.memo.size / 1024:,.0f} KiB)"
    )
    # The floor under any filter that works on parsed values: parsing alone (orjson,
    # garbage collection paused as `filter_body` does).
    parse = best_cpu(lambda: _parsed_paused(body), rounds)
    print(f"parsing it alone (orjson.loads): {parse * 1e6:,.1f} µs")


def _parsed_paused(body: bytes) -> object:
    gc.disable()
    try:
        return orjson.loads(body)
    finally:
        gc.enable()


def scrubbed(scrub: BodyScrubFactory, ctx: RequestContext, body: bytes) -> bytes:
    link = scrub(ctx)
    assert link is not None
    head = ResponseHead(200, [line + b"\r\n" for line in HEAD_LINES], len(body), "GET")
    link.on_head(head)
    out = link.on_body(body) + link.on_end()  # type: ignore[operator]
    return out  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- through the proxy


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its threads, in ns resolution (`schedstat`; the clock
    ticks of /proc/<pid>/stat are 10 ms, too coarse for a few hundred requests)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return total / 1e9


def timed(
    conn: http.client.HTTPConnection, path: str, key: str, n: int, pid: int
) -> tuple[float, float]:
    """Median seconds per request over `n` requests (after 5 unmeasured ones), and the
    proxy's CPU seconds per request over them."""
    samples = []
    cpu_start = 0.0
    for i in range(n + 5):
        if i == 5:
            cpu_start = cpu_seconds(pid)
        start = time.perf_counter()
        conn.request("GET", path, headers={"X-API-Key": key})
        response = conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - start
        assert response.status == 200, (path, response.status, body[:200])
        if i >= 5:
            samples.append(elapsed)
    return statistics.median(samples), (cpu_seconds(pid) - cpu_start) / n


def through_proxy(n: int) -> None:
    upstream = start_upstream(header_secrets={"X-Upstream-Key": SECRET})
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
        pid = kp.process.pid
        try:
            conn = http.client.HTTPConnection(kp.host, kp.port, timeout=30)
            reader = KEYS["reader"]
            print(f"\nThrough keyproxy: median per request over {n} sequential keep-alive")
            print("requests, and keyproxy's CPU per request (all its threads)\n")
            print("| body | unfiltered | filtered | CPU unfiltered | CPU filtered | CPU per KiB |")
            print("|---|---:|---:|---:|---:|---:|")
            for name, size in SIZES.items():
                count = n if size < 1 << 20 else max(20, n // 10)
                plain, plain_cpu = timed(conn, f"/json/{size}", reader, count, pid)
                filtered, filtered_cpu = timed(conn, f"/json/{size}", FILTERED, count, pid)
                extra = filtered_cpu - plain_cpu
                print(
                    f"| {name} | {plain * 1e6:,.0f} µs | {filtered * 1e6:,.0f} µs "
                    f"| {plain_cpu * 1e6:,.0f} µs | {filtered_cpu * 1e6:,.0f} µs "
                    f"| {extra * 1e6 / (size / 1024):.1f} µs |"
                )
            print(
                "\n| body | scrub_body: false | scanned | CPU not scanned | CPU scanned | per KiB |"
            )
            print("|---|---:|---:|---:|---:|---:|")
            for name, size in (("64 KiB", 64 * 1024), ("1 MiB", 1024 * 1024)):
                count = n if size < 1 << 20 else max(20, n // 10)
                raw, raw_cpu = timed(conn, f"/raw/big/{size}", reader, count, pid)
                scanned, scanned_cpu = timed(conn, f"/big/{size}", reader, count, pid)
                extra = scanned_cpu - raw_cpu
                print(
                    f"| {name} | {raw * 1e6:,.0f} µs | {scanned * 1e6:,.0f} µs "
                    f"| {raw_cpu * 1e6:,.0f} µs | {scanned_cpu * 1e6:,.0f} µs "
                    f"| {extra * 1e6 / (size / 1024):.2f} µs |"
                )
            print("\n| body | from the upstream | cache hit | hit, filtered key |")
            print("|---|---:|---:|---:|")
            for name, size in (("1 KiB", 1024), ("64 KiB", 64 * 1024)):
                upstream_time, _ = timed(conn, f"/json/{size}", reader, n, pid)
                hit, _ = timed(conn, f"/cached/json/{size}", reader, n, pid)
                hit_filtered, _ = timed(conn, f"/cached/json/{size}", FILTERED, n, pid)
                print(
                    f"| {name} | {upstream_time * 1e6:,.0f} µs | {hit * 1e6:,.0f} µs "
                    f"| {hit_filtered * 1e6:,.0f} µs |"
                )
            conn.close()
        finally:
            kp.stop()
            upstream.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pure", action="store_true", help="the in-process part only")
    parser.add_argument("--proxy", action="store_true", help="through keyproxy only")
    args = parser.parse_args()
    if not args.proxy:
        pure(args.rounds)
    if not args.pure:
        through_proxy(args.requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
