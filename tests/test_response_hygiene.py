"""What the client learns from response headers, and what the upstream learns of the Host,
through a real keyproxy in front of a real upstream."""

from __future__ import annotations

import base64
import html
import json

import pytest

from keyproxy.response.headers import SecretScrubber
from tests.conftest import UPSTREAM_SECRET
from tests.proxy_process import KEYS, Keyproxy


def echo_with(proxy: Keyproxy, *headers: tuple[str, str]) -> dict[str, list[str]]:
    """Ask the upstream to answer with `headers`; the response headers as the client sees them."""
    asks = [("X-Echo-Response-Header", f"{name}={value}") for name, value in headers]
    status, _, _, resp = proxy.request("GET", "/echo/hygiene", asks, key=KEYS["reader"])
    assert status == 200
    seen: dict[str, list[str]] = {}
    for name, value in resp.getheaders():
        seen.setdefault(name.lower(), []).append(value)
    return seen


@pytest.mark.parametrize(
    "spelling",
    [
        UPSTREAM_SECRET.upper(),
        UPSTREAM_SECRET.encode().hex().upper(),
        base64.b64encode(UPSTREAM_SECRET.encode()).decode(),
        base64.urlsafe_b64encode(b"key=" + UPSTREAM_SECRET.encode()).decode(),
    ],
)
def test_more_spellings_of_the_secret_never_reach_the_client(proxy: Keyproxy, spelling):
    seen = echo_with(proxy, ("X-Debug", spelling), ("Set-Cookie", f"s={spelling}; Path=/"))
    # what surrounds the secret in a longer encoded value (or its padding) may stay
    assert len(seen["x-debug"]) == 1 and "[REDACTED]" in seen["x-debug"][0]
    assert "[REDACTED]" in seen["set-cookie"][0]
    assert spelling not in json.dumps(seen)


def test_the_upstream_origin_never_reaches_the_client(proxy: Keyproxy, upstream):
    origin = upstream.url  # http://127.0.0.1:<port>
    authority = origin.removeprefix("http://")
    seen = echo_with(
        proxy,
        ("Content-Location", f"{origin}/items/1"),
        ("Link", f'<{origin}/p?page=2>; rel="next"'),
        ("Refresh", f"5; url={origin.upper()}/done"),
    )
    assert seen["content-location"] == ["/items/1"]
    assert seen["link"] == ['</p?page=2>; rel="next"']
    assert seen["refresh"] == ["5; url=/done"]
    for location, expected in [
        (f"//{authority}/next", "/next"),
        (f"/\\{authority}/next", "/next"),
        (f"http:/\\{authority}/next?a=1", "/next?a=1"),
        (f"{origin}//evil.example/x", "/.//evil.example/x"),
    ]:
        assert echo_with(proxy, ("Location", location))["location"] == [expected], location


def forwarded_host(proxy: Keyproxy, upstream, host: bytes) -> tuple[bytes, list[str]]:
    upstream.reset()
    answer = proxy.raw(
        b"GET /echo/host HTTP/1.1\r\nHost: "
        + host
        + b"\r\nX-API-Key: "
        + KEYS["reader"].encode()
        + b"\r\nConnection: close\r\n\r\n"
    )
    records = upstream.records()
    if not records:
        return answer, []
    headers = records[-1]["headers"]
    return answer, [v for n, v in headers if n.lower() == "x-forwarded-host"]


@pytest.mark.parametrize(
    "host", [b"proxy.example", b"proxy.example:8080", b"127.0.0.1:80", b"[2001:db8::1]:443"]
)
def test_a_valid_host_becomes_x_forwarded_host(proxy: Keyproxy, upstream, host):
    answer, seen = forwarded_host(proxy, upstream, host)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert seen == [host.decode()]


@pytest.mark.parametrize(
    "host",
    [
        b"evil.example/reset?to=",
        b"a,b.example",
        b"evil.example:8080:9090",
        b"evil.example:99999",
        b"[not-v6]:80",
        b"user@evil.example",
        b"..",
        b"evil example",
    ],
)
def test_an_invalid_host_is_never_passed_on(proxy: Keyproxy, upstream, host):
    """Frameworks build password-reset links from X-Forwarded-Host: garbage is dropped."""
    _answer, seen = forwarded_host(proxy, upstream, host)
    assert seen == []


def _escaped(template: str, text: str) -> str:
    return "".join(template % ord(c) for c in text)


@pytest.mark.parametrize(
    "value",
    [
        '{"key":"' + _escaped("\\u%04x", UPSTREAM_SECRET[0]) + UPSTREAM_SECRET[1:] + '"}',
        '{"key":"' + _escaped("\\u%04X", UPSTREAM_SECRET) + '"}',
        "<b>" + _escaped("&#%d;", UPSTREAM_SECRET) + "</b>",
    ],
    ids=["one \\u escape", "every byte \\u", "html"],
)
def test_a_json_escaped_secret_in_a_header_never_reaches_the_client(proxy: Keyproxy, value):
    """A header carrying JSON (a debug dump of the request) or HTML is read by a client
    that parses it: the header scrub must read the escapes as the body scrub does."""
    seen = echo_with(proxy, ("X-Debug", value))
    assert len(seen["x-debug"]) == 1 and "[REDACTED]" in seen["x-debug"][0]
    text = seen["x-debug"][0]
    readable = json.loads(text) if text.startswith("{") else {"html": html.unescape(text)}
    assert UPSTREAM_SECRET not in json.dumps(readable)


def test_php_json_encode_of_a_secret_with_slashes_is_redacted_in_a_header() -> None:
    """PHP's `json_encode` writes `/` as `\\/`: a secret with a `/` in it (base64 keys
    often have one) was no raw spelling, and a client parsing the header read it back."""
    secret = "sk/live+9f8e7d6c5b4a/3210"
    scrubber = SecretScrubber((secret,))
    line = b'X-Debug: {"key":"' + secret.replace("/", "\\/").encode() + b'"}\r\n'
    assert scrubber.found_in(line)
    assert scrubber.scrub(line) == b'X-Debug: {"key":"[REDACTED]"}\r\n'
