"""What forwarding decides from the configuration alone: redirects and secrets in replies."""

from __future__ import annotations

import base64

import pytest

from keyproxy.config import parse_config
from keyproxy.forward import ForwardPlan

CONFIG = """\
upstream:
  url: {url}
  inject:
    headers: {{X-Upstream-Key: "AbC/dEf+Gh~Ij"}}
    basic: {{username: svc, password: "p@ss word"}}
routes:
  - {{match: "GET /**", acl: all}}
"""


def plan(url: str = "http://up.internal:8000/api") -> ForwardPlan:
    return ForwardPlan(parse_config(CONFIG.format(url=url), "test.yaml", {}))


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("http://up.internal:8000/api/next", "/next"),  # the base path goes too
        ("HTTP://UP.INTERNAL:8000/api/next?a=1", "/next?a=1"),
        ("http://up.internal:8000/api", "/"),
        ("http://up.internal:8000/api?x=1", "/?x=1"),
        ("http://up.internal:8000/other", "/other"),
        ("https://elsewhere.example/x", "https://elsewhere.example/x"),
        # Never a scheme-relative redirect to another host.
        (
            "http://up.internal:8000/api//evil.example/x",
            "http://up.internal:8000/api//evil.example/x",
        ),
        ("http://up.internal:8000//evil.example/x", "http://up.internal:8000//evil.example/x"),
        (
            "http://up.internal:8000/api/\\evil.example/x",
            "http://up.internal:8000/api/\\evil.example/x",
        ),
    ],
)
def test_redirects_to_the_upstream_become_relative_and_never_leave_the_site(
    location: str, expected: str
) -> None:
    for _ in range(3):  # the same answer every time, in every process
        assert plan().rewrite_location(location.encode()) == expected.encode()


SECRET = "AbC/dEf+Gh~Ij"


@pytest.mark.parametrize(
    "spelling",
    [
        SECRET,
        "AbC%2FdEf%2BGh~Ij",
        "AbC%2fdEf%2bGh~Ij",  # lower-case escapes
        "AbC%2FdEf%2BGh%7EIj",  # an escaped unreserved character
        "%41bC%2FdEf%2BGh%7eIj",  # any character may be escaped
        "p@ss+word",  # form encoding of the Basic password's space
        "p%40ss%20word",
        base64.b64encode(b"svc:p@ss word").decode(),
        base64.b64encode(b"svc:p@ss word").decode().rstrip("="),
        base64.urlsafe_b64encode(b"svc:p@ss word").decode().rstrip("="),
    ],
)
def test_every_spelling_of_a_secret_is_scrubbed_from_reply_headers(spelling: str) -> None:
    scrubber = plan().scrubber
    block = f"Set-Cookie: k={spelling}; Path=/\r\nLocation: /x?key={spelling}\r\n".encode()
    assert scrubber.found_in(block)
    scrubbed = scrubber.scrub(block)
    assert spelling.encode() not in scrubbed
    assert scrubbed.count(b"[REDACTED]") == 2


def test_headers_without_a_secret_are_left_alone() -> None:
    block = b"Content-Type: application/json\r\nX-Note: AbC dEf Gh Ij p@ss\r\n"
    assert not plan().scrubber.found_in(block)
