"""The response-side work per body, without sockets: JSON parsing, field filtering, body scrubbing.

Measures, on JSON list bodies of 1 KiB, 64 KiB and 1 MiB:
* parse + serialise with orjson and with the standard library's json;
* `filter_body` (parse, filter, serialise) with an exclude and an include filter, and the
  include filter alone on a parsed body;
* `ScrubStream` over the body in 16 KiB chunks, with the secrets of a typical
  upstream (one header secret and Basic credentials), clean and with one
  occurrence per chunk;
* gzip decoding (`Decoder`) of the same body.

Figures are the median of `--repeats` timings, in µs per body and ns per KiB.

Usage: python bench/response.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from keyproxy.response.body_scrub import BodyScrubber
from keyproxy.response.codings import Decoder
from keyproxy.response.fields import compile_fields, filter_body

SIZES = {"1 KiB": 1024, "64 KiB": 64 * 1024, "1 MiB": 1024 * 1024}
SECRET = "bench-upstream-secret-0123456789"


def record(i: int) -> dict:
    return {
        "id": i,
        "title": f"post number {i}",
        "email": f"user{i}@example.com",
        "author": {"name": "Ann Example", "phone": "+1 555 0100", "id": i % 97},
        "tags": ["a", "b", "c"],
        "score": i * 1.5,
        "published": i % 2 == 0,
    }


def body_of(size: int) -> bytes:
    items: list[dict] = []
    while len(orjson.dumps(items)) < size:
        items.append(record(len(items)))
    return orjson.dumps(items[: max(1, len(items) - 1)])


def timed(fn: Callable[[], object], repeats: int, budget: float = 0.2) -> float:
    """Median seconds per call; each repeat runs enough calls to last about `budget`."""
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, int(budget / once))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def scrub_all(scrubber: BodyScrubber, chunks: list[bytes]) -> int:
    stream = scrubber.stream()
    total = 0
    for chunk in chunks:
        total += len(stream.feed(chunk))
    return total + len(stream.end())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    exclude = compile_fields("exclude", ["email", "author.phone"])
    include = compile_fields("include", ["id", "title", "author.name"])
    scrubber = BodyScrubber((SECRET,), ("svc", "basic-password-42"))
    rows = []
    for label, size in SIZES.items():
        body = body_of(size)
        kib = len(body) / 1024
        chunks = [body[i : i + 16384] for i in range(0, len(body), 16384)]
        dirty = [c[: len(c) // 2] + SECRET.encode() + c[len(c) // 2 :] for c in chunks]
        gz = gzip.compress(body)
        parsed = orjson.loads(body)
        measures = {
            "orjson loads+dumps": lambda body=body: orjson.dumps(orjson.loads(body)),
            "json loads+dumps": lambda body=body: json.dumps(
                json.loads(body), separators=(",", ":")
            ).encode(),
            "filter_body exclude": lambda body=body: filter_body(body, "application/json", exclude),
            "filter_body include": lambda body=body: filter_body(body, "application/json", include),
            "include, parsed only": lambda parsed=parsed: include.apply(parsed),
            "scrub, clean": lambda chunks=chunks: scrub_all(scrubber, chunks),
            "scrub, 1 hit/16 KiB": lambda dirty=dirty: scrub_all(scrubber, dirty),
            "gzip decode": lambda gz=gz: Decoder("gzip", 8 << 20).feed(gz),
        }
        for name, fn in measures.items():
            seconds = timed(fn, args.repeats)
            rows.append((label, len(body), name, seconds * 1e6, seconds * 1e9 / kib))
    print(f"{'body':>7} {'bytes':>8}  {'what':<22} {'µs/body':>10} {'ns/KiB':>9}")
    for label, nbytes, name, micros, per_kib in rows:
        print(f"{label:>7} {nbytes:>8}  {name:<22} {micros:>10.1f} {per_kib:>9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
