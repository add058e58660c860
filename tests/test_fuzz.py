"""Mangled requests never crash keyproxy, never get a 500, never hang it (bounded, seeded)."""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import time

from tests.proxy_process import KEYS, Keyproxy

VALID = (
    b"POST /echo/fuzz?a=1 HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEYS["admin"].encode() + b"\r\n"
    b'Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{"a":1}'
)
PIECES = [
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b":",
    b"%",
    b"%2F",
    b"/..",
    b"\x00",
    b"\xff",
    b"chunked",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 99\r\n",
    b"Host: y\r\n",
    b"\t",
    b"HTTP/1.0",
    b"GET",
    b"0\r\n\r\n",
    b"Expect: 100-continue\r\n",
    b"Upgrade: x\r\n",
]


def mangle(rng: random.Random) -> bytes:
    if rng.random() < 0.1:
        return VALID  # the control group: these must still be served
    data = bytearray(VALID)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        choice = rng.random()
        if choice < 0.4:
            data[at:at] = rng.choice(PIECES)
        elif choice < 0.7 and data:
            del data[at : at + rng.randint(1, 8)]
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
    return bytes(data)


def exchange(proxy: Keyproxy, data: bytes) -> bytes:
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # no more input: an incomplete request must end, not hang
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass  # a refusal may close before the rest was read; a hang (TimeoutError) fails
        return b"".join(chunks)


def test_mangled_requests_get_clean_answers(proxy: Keyproxy):
    rng = random.Random(20261126)
    statuses = []
    for _ in range(300):
        response = exchange(proxy, mangle(rng))
        statuses += [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", response)]
        for body_start in re.finditer(rb'\{"statusCode":(\d{3})', response):
            assert body_start.group(1) != b"500", response
    assert 500 not in statuses, statuses
    assert {200, 400} <= set(statuses), sorted(set(statuses))  # both kinds of input were made
    assert statuses, "no answers at all"
    # still serving, and nothing went wrong inside
    assert proxy.request("GET", "/echo/after", key=KEYS["reader"])[0] == 200
    assert "internal_error" not in proxy.process.stderr
    assert "Traceback" not in proxy.process.stderr


def statuses_of(response: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", response)]


def get(path: str) -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nX-API-Key: " + READER + b"\r\n\r\n"


READER = KEYS["reader"].encode()


def test_pipelines_of_any_depth_are_answered_in_order_up_to_a_bad_request(proxy: Keyproxy):
    rng = random.Random(20261204)
    for _ in range(25):
        depth = rng.randint(1, 60)
        requests = [get(f"/echo/d{i}") for i in range(depth)]
        bad_at = rng.randrange(depth) if rng.random() < 0.5 else None
        if bad_at is not None:
            requests[bad_at] = mangle(rng) if rng.random() < 0.5 else b"BAD\x00 / HTTP/1.1\r\n\r\n"
        response = exchange(proxy, b"".join(requests))
        statuses = statuses_of(response)
        assert 500 not in statuses
        answered = depth if bad_at is None else bad_at
        assert statuses[:answered] == [200] * answered, (depth, bad_at, statuses)
        paths = re.findall(rb'"path": ?"(/echo/d\d+)"', response)
        assert paths[:answered] == [f"/echo/d{i}".encode() for i in range(answered)]
    assert "Traceback" not in proxy.process.stderr


def test_chunk_shapes_and_slow_senders_deliver_the_exact_body(proxy: Keyproxy):
    rng = random.Random(4242)
    admin = KEYS["admin"].encode()
    deadline = time.monotonic() + 60
    for _ in range(30):
        sizes = [rng.choice((1, 7, 100, 1000, 5000, 70000)) for _ in range(rng.randint(1, 40))]
        pieces = [
            bytes(rng.randrange(256) for _ in range(min(n, 64))) * (n // 64 + 1) for n in sizes
        ]
        pieces = [p[:n] for p, n in zip(pieces, sizes, strict=True)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        data = (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: " + admin + b"\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body
        )
        slow = rng.random() < 0.3
        with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
            at = 0
            while at < len(data):  # cut anywhere, head and chunk framing included
                step = rng.randint(1, 40) if slow and at < 400 else rng.randint(1, 200_000)
                sock.sendall(data[at : at + step])
                at += step
                if slow and at < 400:
                    time.sleep(rng.uniform(0, 0.02))
            response = b""
            while chunk := sock.recv(65536):
                response += chunk
        assert statuses_of(response) == [200], response[:300]
        info = json.loads(response.split(b"\r\n\r\n", 1)[1])
        assert info["body_len"] == sum(sizes)
        assert info["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
        assert time.monotonic() < deadline
