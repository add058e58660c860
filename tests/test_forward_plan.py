"""What forwarding decides from the configuration alone: redirects and secrets in replies."""

from __future__ import annotations

import base64

import pytest

from keyproxy.config import parse_config
from keyproxy.forward.plan import ForwardPlan

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
        # Never a scheme-relative redirect to another host, nor the upstream's origin.
        ("http://up.internal:8000/api//evil.example/x", "/.//evil.example/x"),
        ("http://up.internal:8000//evil.example/x", "/.//evil.example/x"),
        ("http://up.internal:8000/api/\\evil.example/x", "/./\\evil.example/x"),
        # Every spelling a browser reads as the upstream's origin.
        ("//up.internal:8000/api/next", "/next"),
        ("/\\up.internal:8000/api/next", "/next"),
        ("\\\\up.internal:8000/next", "/next"),
        ("http:/\\up.internal:8000/api/next", "/next"),
        ("http:\\\\up.internal:8000/api/next", "/next"),
        ("http:///up.internal:8000/api/next", "/next"),
        ("ht\ttp://up.internal:8000/api/next", "/next"),  # browsers drop tabs in URLs
        ("http://user:pw@up.internal:8000/api/next", "/next"),
        ("http://up.internal.:8000/api/next", "/next"),
        ("http://up.internal:8000/api#frag", "/#frag"),
        ("http://up.internal:8000/apix", "/apix"),  # not under the base path
        # Not the upstream: another port, another host, a look-alike, userinfo tricks.
        ("http://up.internal:9000/api/next", "http://up.internal:9000/api/next"),
        ("http://up.internal/api/next", "http://up.internal/api/next"),
        ("//up.internal.evil.example/x", "//up.internal.evil.example/x"),
        ("http://up.internal:8000@evil.example/x", "http://up.internal:8000@evil.example/x"),
        ("/next", "/next"),
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


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("http://up.example/next", "/next"),
        ("http://up.example:80/next", "/next"),  # the default port written out
        ("HTTP://UP.EXAMPLE:80", "/"),
        ("//up.example/next", "/next"),
        ("//up.example:80/next", "/next"),
        ("/\\up.example/next", "/next"),
        ("https://up.example/next", "https://up.example/next"),  # port 443: another origin
        ("https://up.example:80/next", "/next"),
        ("http://up.example:8080/next", "http://up.example:8080/next"),
    ],
)
def test_default_ports_are_the_same_origin(location: str, expected: str) -> None:
    assert plan("http://up.example").rewrite_location(location.encode()) == expected.encode()


def test_ipv6_upstreams_are_recognised() -> None:
    rewrite = plan("http://[::1]:3000").rewrite_location
    assert rewrite(b"http://[::1]:3000/next") == b"/next"
    assert rewrite(b"//[::1]:3000/next") == b"/next"
    assert rewrite(b"http://[::1]:4000/next") == b"http://[::1]:4000/next"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Content-Location: http://up.internal:8000/api/items/1", "Content-Location: /items/1"),
        (
            'Link: <http://up.internal:8000/api/p?page=2>; rel="next", <//up.internal:8000/api/p>; '
            'rel="first"',
            'Link: </p?page=2>; rel="next", </p>; rel="first"',
        ),
        ("Refresh: 5; url=http://up.internal:8000/api/done", "Refresh: 5; url=/done"),
        ("Refresh: 0;URL='HTTP://UP.INTERNAL:8000/api'", "Refresh: 0;URL='/'"),
        ("X-Backend: see http://up.internal:8000/status", "X-Backend: see /status"),
        (
            "Refresh: 0; url=http://up.internal:8000//evil.example/",
            "Refresh: 0; url=/.//evil.example/",
        ),
    ],
)
def test_the_upstream_origin_is_rewritten_in_every_header(header: str, expected: str) -> None:
    scrubber = plan().scrubber
    block = f"Content-Type: text/html\r\n{header}\r\n".encode()
    assert scrubber.found_in(block)
    assert scrubber.scrub(block) == f"Content-Type: text/html\r\n{expected}\r\n".encode()


@pytest.mark.parametrize(
    "spelling",
    [
        SECRET.upper(),
        SECRET.lower(),
        SECRET.encode().hex(),
        SECRET.encode().hex().upper(),
        base64.b64encode(SECRET.encode()).decode(),  # the secret alone, not user:pass
        base64.b64encode(SECRET.encode()).decode().rstrip("="),
        base64.urlsafe_b64encode(SECRET.encode()).decode(),
        base64.b64encode(b"token=" + SECRET.encode() + b";x").decode(),  # inside a longer value
        base64.b64encode(b"t:" + SECRET.encode()).decode(),
        base64.b64encode(b"tk:" + SECRET.encode() + b"!").decode(),
        "P%40SS+WORD",
        "%61%62%63%2f%64%65%66%2b%67%68%7e%69%6a",  # lower-case letters fully escaped
    ],
)
def test_more_spellings_of_a_secret_are_scrubbed(spelling: str) -> None:
    scrubber = plan().scrubber
    block = f"X-Debug: {spelling}\r\nSet-Cookie: s={spelling}; Path=/\r\n".encode()
    assert scrubber.found_in(block)
    scrubbed = scrubber.scrub(block)
    assert spelling.encode() not in scrubbed
    assert scrubbed.count(b"[REDACTED]") == 2


def test_headers_without_a_secret_are_left_alone() -> None:
    block = b"Content-Type: application/json\r\nX-Note: AbC dEf Gh Ij p@ss\r\n"
    assert not plan().scrubber.found_in(block)


def test_clean_header_blocks_are_remembered_and_a_secret_is_still_scrubbed_each_time():
    """Header hygiene remembers blocks it found clean; a block holding the secret is
    never remembered, so every answer carrying it is redacted."""
    from keyproxy.response.chain import ResponseHead
    from keyproxy.response.links import HeaderHygiene

    hygiene = HeaderHygiene(plan().scrubber)
    clean = [b"Content-Type: application/json\r\n", b'ETag: "1"\r\n']
    leaky = [b"Content-Type: application/json\r\n", b"X-Debug: key=AbC/dEf+Gh~Ij\r\n"]
    for _ in range(3):
        head = ResponseHead(200, list(clean), 0, "GET")
        hygiene.on_head(head)
        assert head.lines == clean
        head = ResponseHead(200, list(leaky), 0, "GET")
        hygiene.on_head(head)
        assert b"AbC/dEf+Gh~Ij" not in b"".join(head.lines)
        assert head.lines[1] == b"X-Debug: key=[REDACTED]\r\n"
    assert hygiene.clean == {b"".join(clean)}
