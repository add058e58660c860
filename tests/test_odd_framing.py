"""Upstream answers with odd framing, through a real `keyproxy serve` with field filtering
on: a close-delimited body, interim answers, a 204 that carries bytes, HEAD. Each must
reach the client filtered and framed by keyproxy, and must not leak into the answer of
the next request that reuses the upstream connection.

The upstream here is a raw socket server (a framework would not send these answers),
serving every request of a kept-alive connection in turn.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socketserver
from collections.abc import Iterator

import pytest

from tests.procs import raw_upstream, recv_head
from tests.proxy_process import KEYS, Keyproxy, base_config, digest, start_keyproxy

FILTERED = "pk_" + "7" * 64
RECORD = b'{"id":1,"email":"e@x","title":"t"}'
#: A complete answer hidden in the body of a 204, and one whose body is still to come.
SMUGGLED_WHOLE = b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"stolen":true}'
SMUGGLED_HEAD = b"HTTP/1.1 200 OK\r\nX-Smuggled: yes\r\nContent-Length: 60\r\n\r\n"


#: A JSON array split over two gzip members, the first inflating past one decoding step.
MEMBERS_JSON = json.dumps(
    [{"id": i, "email": f"u{i}@x", "title": "t" * 40} for i in range(2000)]
).encode()
GZIP_MEMBERS = gzip.compress(MEMBERS_JSON[:100_000]) + gzip.compress(MEMBERS_JSON[100_000:])


def _answer(path: bytes, count: int) -> tuple[bytes, bool]:
    """The raw answer for `path` and whether the connection closes after it."""
    json_head = b"Content-Type: application/json\r\n"
    if path == b"/close-delimited":
        return b"HTTP/1.1 200 OK\r\n" + json_head + b"Connection: close\r\n\r\n" + RECORD, True
    if path == b"/early-hints":
        return (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\n" + json_head + b"Content-Length: %d\r\n\r\n" % len(RECORD)
        ) + RECORD, False
    if path == b"/no-content-whole":
        return b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n%s" % (
            len(SMUGGLED_WHOLE),
            SMUGGLED_WHOLE,
        ), False
    if path == b"/no-content-head":
        return b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n%s" % (
            len(SMUGGLED_HEAD),
            SMUGGLED_HEAD,
        ), False
    if path in (b"/gzip-members", b"/gzip-junk"):
        body = GZIP_MEMBERS if path == b"/gzip-members" else gzip.compress(RECORD) + b"junk"
        return (
            b"HTTP/1.1 200 OK\r\n" + json_head + b"Content-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        ) + body, False
    if path == b"/public":
        return (
            b"HTTP/1.1 200 OK\r\n" + json_head + b"Cache-Control: public, max-age=60, "
            b"s-maxage=300\r\nContent-Length: %d\r\n\r\n" % len(RECORD)
        ) + RECORD, False
    body = b'{"id":%d,"email":"victim@x","title":"mine"}' % count
    return (
        b"HTTP/1.1 200 OK\r\n" + json_head + b"Content-Length: %d\r\n\r\n" % len(body) + body,
        False,
    )


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(10)
        data = b""
        count = 0
        while True:
            read = recv_head(self.request, data)
            if read is None:
                return
            head, data = read
            method, path = head.split(b" ", 2)[:2]
            count += 1
            answer, close = _answer(path.split(b"?")[0], count)
            if method == b"HEAD":
                answer = answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
            self.request.sendall(answer)
            if close:
                return


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyproxy]:
    with raw_upstream(_Handler) as url:
        config = base_config(url, {})
        config["upstream"]["inject"] = {"headers": {"X-Upstream-Key": "odd-framing-secret-0123"}}
        config["routes"] = [{"match": "GET|HEAD /{name}", "acl": "get"}]
        config["keys"] = [
            {"id": "reader", "hash": digest(KEYS["reader"]), "type": "read"},
            {
                "id": "filtered",
                "hash": digest(FILTERED),
                "type": "read",
                "fields": {"exclude": ["email"]},
            },
        ]
        kp = start_keyproxy(tmp_path_factory.mktemp("odd-framing"), config)
        yield kp
        kp.stop()


def _get(proxy: Keyproxy, path: str, key: str, method: str = "GET") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=4)
    try:
        conn.request(method, path, headers={"X-API-Key": key})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


@pytest.mark.parametrize("key", [FILTERED, KEYS["reader"]], ids=["filtered", "plain"])
def test_a_close_delimited_answer_is_framed_by_keyproxy(proxy: Keyproxy, key: str) -> None:
    status, headers, body = _get(proxy, "/close-delimited", key)
    assert status == 200
    expected = json.loads(RECORD)
    if key == FILTERED:
        del expected["email"]
        assert headers["content-length"] == str(len(body))
    assert json.loads(body) == expected


@pytest.mark.parametrize("key", [FILTERED, KEYS["reader"]], ids=["filtered", "plain"])
def test_interim_answers_are_skipped_and_the_final_one_filtered(proxy: Keyproxy, key: str) -> None:
    status, headers, body = _get(proxy, "/early-hints", key)
    assert status == 200 and "link" not in headers
    assert ("email" in json.loads(body)) is (key != FILTERED)


def test_a_head_answer_has_no_body_and_no_stale_length(proxy: Keyproxy) -> None:
    status, headers, body = _get(proxy, "/record", FILTERED, method="HEAD")
    assert status == 200 and body == b""
    # The upstream's length is that of the unfiltered body: it must not be passed on.
    assert "content-length" not in headers
    status, _, body = _get(proxy, "/record", FILTERED)  # the connection is still in step
    assert status == 200 and json.loads(body)["title"] == "mine"


@pytest.mark.parametrize("key", [FILTERED, KEYS["reader"]], ids=["filtered", "plain"])
def test_a_whole_answer_hidden_in_a_204_never_reaches_the_next_request(
    proxy: Keyproxy, key: str
) -> None:
    status, _, body = _get(proxy, "/no-content-whole", key)
    assert (status, body) == (204, b"")
    for _ in range(3):  # whichever request reuses the upstream connection
        status, _, body = _get(proxy, "/record", key)
        assert status == 200 and b"stolen" not in body
        assert json.loads(body)["title"] == "mine"


def test_a_head_hidden_in_a_204_does_not_swallow_the_next_answer(proxy: Keyproxy) -> None:
    status, _, body = _get(proxy, "/no-content-head", KEYS["reader"])
    assert (status, body) == (204, b"")
    for _ in range(2):
        status, headers, body = _get(proxy, "/record", KEYS["reader"])
        assert status == 200 and "x-smuggled" not in headers
        assert json.loads(body)["title"] == "mine"


@pytest.mark.parametrize("accept", [None, "gzip"])
@pytest.mark.parametrize("key", [FILTERED, KEYS["reader"]], ids=["filtered", "plain"])
def test_every_gzip_member_is_read_and_the_proxy_keeps_answering(
    proxy: Keyproxy, key: str, accept: str | None
) -> None:
    """Several gzip members (as a streaming server writes them), the first inflating past
    one decoding step: decoded whole, not cut after the first, and not spun on forever."""
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=4)
    try:
        headers = {"X-API-Key": key, **({"Accept-Encoding": accept} if accept else {})}
        conn.request("GET", "/gzip-members", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body[:200]
        if resp.getheader("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        want = json.loads(MEMBERS_JSON)
        if key == FILTERED:
            want = [{k: v for k, v in item.items() if k != "email"} for item in want]
        assert json.loads(body) == want
    finally:
        conn.close()
    assert _get(proxy, "/record", key)[0] == 200


@pytest.mark.parametrize("key", [FILTERED, KEYS["reader"]], ids=["filtered", "plain"])
def test_bytes_after_the_gzip_stream_are_refused(proxy: Keyproxy, key: str) -> None:
    status, _, body = _get(proxy, "/gzip-junk", key)
    # The secret scan sits first in the chain: it refuses before the filter would.
    assert (status, json.loads(body)["error"]) == (502, "BODY_NOT_SCANNED")
    assert b"e@x" not in body


def test_a_filtered_answer_is_never_left_to_shared_caches(proxy: Keyproxy) -> None:
    """A filtered answer is one key's view: a CDN in front must not serve it to others,
    whatever the upstream said. Unfiltered answers keep the upstream's own policy."""
    status, headers, body = _get(proxy, "/public", FILTERED)
    assert status == 200 and b"email" not in body
    assert headers["cache-control"] == "max-age=60, private"
    status, headers, _ = _get(proxy, "/public", KEYS["reader"])
    assert headers["cache-control"] == "public, max-age=60, s-maxage=300"
    status, headers, body = _get(proxy, "/plain", FILTERED)  # none given: private added
    assert status == 200 and headers["cache-control"] == "private"
