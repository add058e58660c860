"""Referer patterns and IP allowlists (decision step 2, docs/decision.md)."""

from __future__ import annotations

import re
import time
from ipaddress import ip_address

import pytest

from keyproxy.policy.allowlists import IpAllowlist, RefererPattern, match_referer


def matches(pattern: str, referer: str | None) -> bool:
    return match_referer([RefererPattern.parse(pattern)], referer)


# --- referer patterns: parsing ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "https://example.com",
        "https://*.example.com/*",
        "*://*/*",
        "http://localhost:8080/app/*",
        "https://example.com:*/",
        "https://[2001:db8::1]:8443/*",
        "HTTPS://Example.COM/Path",
        "https://example.com/search?q=*",
    ],
)
def test_pattern_parses(text):
    assert RefererPattern.parse(text).text == text


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "non-empty"),
        ("example.com", "no scheme"),
        ("ftp://example.com/", "scheme"),
        ("https://user@example.com/", "user information"),
        ("https://exa*mple.com/", "host"),
        ("https://*example.com/", "host"),
        ("https://*.*.example.com/", "after '*.'"),
        ("https://*./", "after '*.'"),
        ("https://example..com/", "host"),
        ("https:///path", "host"),
        ("https://example.com:0/", "port"),
        ("https://example.com:65536/", "port"),
        ("https://example.com:http/", "port"),
        ("https://example.com:/", "empty port"),
        ("https://[zz::1]/", "IPv6"),
        ("https://example.com/a#b", "fragment"),
        ("https://example.com/ a", "spaces"),
        ("https://exämple.com/", "xn--"),
        ("https://example.com/" + "a" * 1100, "longer"),
    ],
)
def test_pattern_errors(text, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        RefererPattern.parse(text)


# --- referer patterns: matching -------------------------------------------------------------

WILD = "https://*.example.com/*"


@pytest.mark.parametrize(
    "pattern, referer, expected",
    [
        # subdomain wildcard
        (WILD, "https://app.example.com/", True),
        (WILD, "https://app.example.com/page?x=1", True),
        (WILD, "https://a.b.example.com/x", True),
        (WILD, "https://APP.Example.COM/x", True),
        (WILD, "https://example.com/", False),  # the bare domain is not a subdomain
        (WILD, "https://example.com.evil.com/", False),
        (WILD, "https://evilexample.com/", False),
        (WILD, "https://evil.com/?https://app.example.com/", False),
        (WILD, "https://evil.com/https://app.example.com/", False),
        (WILD, "https://evil.com/#https://app.example.com/", False),
        (WILD, "https://.example.com/", False),
        # userinfo and parser-confusion tricks
        (WILD, "https://app.example.com@evil.com/", False),
        (WILD, "https://app.example.com:443@evil.com/", False),
        (WILD, "https://evil.com\\@app.example.com/", False),
        (WILD, "https://evil.com\\.app.example.com/", False),
        (WILD, "https://app.exam\tple.com/", False),
        (WILD, "https://app.example.com/\n", False),
        (WILD, "https://app.exämple.com/", False),
        (WILD, "//app.example.com/", False),
        (WILD, "app.example.com", False),
        (WILD, "https:///x", False),
        # scheme
        (WILD, "http://app.example.com/", False),
        ("*://app.example.com/*", "http://app.example.com/", True),
        ("*://app.example.com/*", "https://app.example.com/", True),
        ("*://app.example.com/*", "ftp://app.example.com/", False),
        ("*://*/*", "chrome-extension://abc/", False),
        # ports
        (WILD, "https://app.example.com:443/", True),
        (WILD, "https://app.example.com:8443/", False),
        ("https://app.example.com:8443/*", "https://app.example.com:8443/x", True),
        ("https://app.example.com:8443/*", "https://app.example.com/x", False),
        ("https://app.example.com:*/*", "https://app.example.com:9/x", True),
        ("https://app.example.com:*/*", "https://app.example.com/x", True),
        ("*://app.example.com/*", "http://app.example.com:443/", False),  # default is per scheme
        ("http://app.example.com:80", "http://app.example.com/", True),
        (WILD, "https://app.example.com:0/", False),
        (WILD, "https://app.example.com:99999/", False),
        (WILD, "https://app.example.com:x/", False),
        # exact hosts and any host
        ("https://app.example.com", "https://app.example.com/anything?at=all", True),
        ("https://app.example.com", "https://other.example.com/", False),
        ("https://*", "https://anything.test/x", True),
        ("https://*", "https://1.2.3.4/", True),
        ("http://[::1]:8080/*", "http://[0:0::1]:8080/x", True),
        ("http://[::1]:8080/*", "http://[::2]:8080/x", False),
        # paths
        ("https://app.example.com/", "https://app.example.com", True),  # empty path is "/"
        ("https://app.example.com/", "https://app.example.com/x", False),
        ("https://app.example.com/", "https://app.example.com/?x", False),
        ("https://app.example.com/docs/*", "https://app.example.com/docs/a/b", True),
        ("https://app.example.com/docs/*", "https://app.example.com/docs", False),
        ("https://app.example.com/docs/*", "https://app.example.com/doc/x", False),
        ("https://app.example.com/*.html", "https://app.example.com/a/b.html", True),
        ("https://app.example.com/*.html", "https://app.example.com/a.html?x", False),
        ("https://app.example.com/*/end", "https://app.example.com/a/b/end", True),
        ("https://app.example.com/a*b*c", "https://app.example.com/abc", True),
        ("https://app.example.com/a*b*c", "https://app.example.com/acb", False),
        ("https://app.example.com/a*bc*bc", "https://app.example.com/abc", False),
        ("https://app.example.com/s?q=*", "https://app.example.com/s?q=shoes", True),
        ("https://app.example.com/s?q=*", "https://app.example.com/s", False),
    ],
)
def test_referer_table(pattern, referer, expected):
    assert matches(pattern, referer) is expected


@pytest.mark.parametrize("referer", [None, ""])
def test_missing_referer_matches_nothing(referer):
    assert matches("https://*", referer) is False


def test_no_patterns_matches_nothing():
    assert match_referer([], "https://app.example.com/") is False


def test_any_pattern_may_match():
    patterns = [RefererPattern.parse(p) for p in ("https://a.test/*", "https://b.test/*")]
    assert match_referer(patterns, "https://b.test/x")
    assert not match_referer(patterns, "https://c.test/x")


def test_overlong_referer_is_refused():
    referer = "https://app.example.com/" + "a" * 4096
    assert matches(WILD, referer) is False
    assert matches(WILD, referer[:4096]) is True


def test_pathological_glob_is_linear():
    # A backtracking matcher needs time exponential in the number of stars here.
    # Prefix and suffix match, so every middle piece is searched for.
    pattern = RefererPattern.parse("https://app.example.com/" + "*a" * 400 + "*aab*c")
    referer = "https://app.example.com/" + "a" * (4096 - 25) + "c"
    started = time.perf_counter()
    for _ in range(100):
        assert match_referer([pattern], referer) is False
    assert time.perf_counter() - started < 1.0


# --- IP allowlists -------------------------------------------------------------------------


def allow(*items: str) -> IpAllowlist:
    return IpAllowlist.parse(list(items))


@pytest.mark.parametrize(
    "items, address, expected",
    [
        (["10.0.0.0/8"], "10.255.255.255", True),
        (["10.0.0.0/8"], "11.0.0.0", False),
        (["10.0.0.0/8"], "9.255.255.255", False),
        (["203.0.113.7"], "203.0.113.7", True),
        (["203.0.113.7"], "203.0.113.8", False),
        (["0.0.0.0/0"], "255.255.255.255", True),
        (["2001:db8::/32"], "2001:db8:ffff::1", True),
        (["2001:db8::/32"], "2001:db9::1", False),
        (["2001:db8::1"], "2001:db8::1", True),
        (["::/0"], "2001:db8::1", True),
        (["::/0"], "10.0.0.1", False),  # IPv4 clients need an IPv4 entry
        (["0.0.0.0/0"], "2001:db8::1", False),
        # IPv4-mapped IPv6 addresses are IPv4 clients
        (["10.0.0.0/8"], "::ffff:10.1.2.3", True),
        (["10.0.0.0/8"], "::ffff:11.1.2.3", False),
        (["::ffff:10.0.0.0/104"], "10.9.9.9", True),
        (["::ffff:10.0.0.0/104"], "::ffff:10.9.9.9", True),
        (["::/0"], "::ffff:10.1.2.3", False),
        # overlapping and adjacent entries are merged correctly
        (["10.0.0.0/9", "10.128.0.0/9", "192.168.1.0/24"], "10.200.0.1", True),
        (["10.0.0.0/8", "10.1.0.0/16", "192.168.1.0/24"], "192.168.1.77", True),
        (["10.0.0.0/8", "10.1.0.0/16", "192.168.1.0/24"], "172.16.0.1", False),
        (["192.168.1.0/24", "10.0.0.0/8", "2001:db8::/32"], "2001:db8::5", True),
    ],
)
def test_ip_allowlist(items, address, expected):
    assert allow(*items).contains(ip_address(address)) is expected


def test_ip_allowlist_keeps_texts():
    items = ["10.0.0.0/8", "2001:db8::/32"]
    assert IpAllowlist.parse(items).texts == tuple(items)


def test_ip_allowlist_host_bits_error_gives_the_network():
    with pytest.raises(ValueError, match=r"host bits.*10\.0\.0\.0/8.*10\.1\.2\.3"):
        allow("10.1.2.3/8")
    with pytest.raises(ValueError, match=r"2001:db8::/32"):
        allow("2001:db8::1/32")


@pytest.mark.parametrize(
    "items, fragment",
    [
        ([], "non-empty"),
        (["10.0.0.0/33"], "not an IP"),
        (["example.com"], "not an IP"),
        (["010.0.0.1"], "not an IP"),
        ([" 10.0.0.1"], "not an IP"),
        (["fe80::1%eth0"], "not an IP"),
        ([""], "not an IP"),
        ([10], "not an IP"),
        ([f"10.0.{i // 256}.{i % 256}" for i in range(101)], "at most 100"),
    ],
)
def test_ip_allowlist_errors(items, fragment):
    with pytest.raises(ValueError, match=fragment):
        IpAllowlist.parse(items)


def test_ip_allowlist_accepts_100_entries():
    items = [f"10.0.{i}.0/24" for i in range(100)]
    allowlist = IpAllowlist.parse(items)
    assert allowlist.contains(ip_address("10.0.99.1"))
    assert not allowlist.contains(ip_address("10.0.100.1"))
