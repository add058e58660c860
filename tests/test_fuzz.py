"""Mangled requests never crash keyproxy, never get a 500, never hang it (bounded, seeded)."""

from __future__ import annotations

import random
import re
import socket

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
        except (TimeoutError, ConnectionResetError):
            pass
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
