"""Which address is the client (server.trusted_proxies: the proxies whose headers count)."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from keyproxy.policy.allowlists import IpAllowlist
from keyproxy.policy.clientip import client_ip, parse_peer, peer_is_trusted
from keyproxy.request import Deny, Headers

PEER = "198.51.100.9"
SPOOF = [
    ("X-Forwarded-For", "1.1.1.1"),
    ("Forwarded", "for=1.1.1.1"),
    ("X-Real-IP", "1.1.1.1"),
]


#: Trusted proxies by depth: 1 is the peer alone, 2 adds the 10/8 proxies behind it, 3 adds
#: 203.0.113.0/24 (so hop counts of the old tests read as the same chains of trusted proxies).
TRUST = {
    0: None,
    1: [PEER],
    2: [PEER, "10.0.0.0/8"],
    3: [PEER, "10.0.0.0/8", "203.0.113.0/24"],
    5: [PEER, "10.0.0.0/8", "203.0.113.0/24", "192.0.2.0/24", "198.18.0.0/15"],
    9: [PEER, "10.0.0.0/8", "203.0.113.0/24", "1.1.1.1", "2.2.2.2"],
}


def ip(headers: list[tuple[str, str]], trusted: int | list[str] | None, peer: str = PEER):
    proxies = TRUST[trusted] if isinstance(trusted, int) else trusted
    allowlist = IpAllowlist.parse(proxies) if proxies else None
    return client_ip(peer, Headers(headers), allowlist)


def assert_invalid(result) -> Deny:
    assert isinstance(result, Deny), result
    assert (result.status, result.code) == (400, "INVALID_FORWARDED_FOR")
    return result


# --- parse_peer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "peer, expected",
    [
        ("203.0.113.5", "203.0.113.5"),
        ("2001:db8::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("::ffff:203.0.113.5", "203.0.113.5"),
    ],
)
def test_parse_peer(peer, expected):
    assert parse_peer(peer) == ip_address(expected)


@pytest.mark.parametrize("peer", ["", "unix", "1.2.3.4%eth0", "fe80::1%", "1.2.3.4:80"])
def test_parse_peer_refuses_non_addresses(peer):
    with pytest.raises(ValueError):
        parse_peer(peer)


# --- trusted_proxies: 0 -------------------------------------------------------------------------


def test_no_trusted_proxies_means_the_peer_whatever_the_headers_say():
    assert ip(SPOOF, 0) == ip_address(PEER)


def test_no_trusted_proxies_ignores_even_garbage():
    assert ip([("X-Forwarded-For", "garbage"), ("Forwarded", "nonsense")], 0) == ip_address(PEER)


def test_mapped_peer_is_ipv4():
    assert ip([], 0, peer="::ffff:10.0.0.1") == ip_address("10.0.0.1")


# --- trusted_proxies: a list of proxies ----------------------------------------------------------


def test_a_direct_client_cannot_forge_its_address():
    """The peer is not a listed proxy: its X-Forwarded-For is its own claim, never read."""
    for headers in (SPOOF, [("X-Forwarded-For", "10.1.2.3")], [("Forwarded", "for=10.1.2.3")]):
        assert ip(headers, ["10.0.0.0/8"]) == ip_address(PEER)
    # not even parsed: garbage from an untrusted peer is no error either
    assert ip([("X-Forwarded-For", "garbage")], ["10.0.0.0/8"]) == ip_address(PEER)


def test_hops_are_walked_from_the_right_skipping_trusted_proxies():
    trusted = [PEER, "10.0.0.0/8"]
    chain = [("X-Forwarded-For", "6.6.6.6, 203.0.113.1, 10.0.0.9, 10.0.0.2")]
    assert ip(chain, trusted) == ip_address("203.0.113.1")
    # a trusted address further left than an untrusted one is the client's claim, ignored
    chain = [("X-Forwarded-For", "10.0.0.5, 203.0.113.1")]
    assert ip(chain, trusted) == ip_address("203.0.113.1")
    # every hop a trusted proxy: the leftmost (as nginx's real_ip_recursive)
    assert ip([("X-Forwarded-For", "10.0.0.5, 10.0.0.6")], trusted) == ip_address("10.0.0.5")


def test_trust_is_by_network_and_mapped_peers_count_as_ipv4():
    chain = [("X-Forwarded-For", "203.0.113.1")]
    assert ip(chain, ["198.51.100.0/24"]) == ip_address("203.0.113.1")
    assert ip(chain, ["198.51.100.0/25"], peer="198.51.100.200") == ip_address("198.51.100.200")
    assert ip(chain, ["198.51.100.0/24"], peer="::ffff:198.51.100.7") == ip_address("203.0.113.1")
    assert ip(chain, ["2001:db8::/32"], peer="2001:db8::5") == ip_address("203.0.113.1")


def test_peer_is_trusted():
    proxies = IpAllowlist.parse(["10.0.0.0/8"])
    assert peer_is_trusted("10.2.3.4", proxies)
    assert not peer_is_trusted("11.2.3.4", proxies)
    assert not peer_is_trusted("10.2.3.4", None)
    assert not peer_is_trusted("not-an-address", proxies)


# --- the old hop-count cases, as the same chains of trusted proxies -------------------------


def test_no_header_means_the_peer():
    assert ip([("X-Real-IP", "1.1.1.1")], 1) == ip_address(PEER)


@pytest.mark.parametrize(
    "value, trusted, expected",
    [
        ("203.0.113.1", 1, "203.0.113.1"),
        ("1.1.1.1, 203.0.113.1", 1, "203.0.113.1"),  # the client's own claim is ignored
        ("1.1.1.1, 203.0.113.1, 10.0.0.2", 2, "203.0.113.1"),
        ("1.1.1.1, 203.0.113.1, 10.0.0.2", 3, "1.1.1.1"),
        ("203.0.113.1", 2, "203.0.113.1"),  # shorter than N: the leftmost
        ("203.0.113.1, 10.0.0.2", 5, "203.0.113.1"),
        ("203.0.113.1:5678", 1, "203.0.113.1"),
        ("[2001:db8::7]:443", 1, "2001:db8::7"),
        ("[2001:db8::7]", 1, "2001:db8::7"),
        ("2001:db8::7", 1, "2001:db8::7"),
        ("::ffff:203.0.113.1", 1, "203.0.113.1"),
        ("  203.0.113.1  ,\t10.0.0.2 ", 2, "203.0.113.1"),
        (", 203.0.113.1,", 1, "203.0.113.1"),  # empty list elements count for nothing
    ],
)
def test_x_forwarded_for(value, trusted, expected):
    assert ip([("X-Forwarded-For", value)], trusted) == ip_address(expected)


def test_x_forwarded_for_lines_are_joined_in_order():
    headers = [("X-Forwarded-For", "1.1.1.1, 2.2.2.2"), ("X-Forwarded-For", "3.3.3.3")]
    assert ip(headers, 1) == ip_address("3.3.3.3")
    assert ip(headers, [PEER, "3.3.3.3"]) == ip_address("2.2.2.2")


def test_empty_x_forwarded_for_means_the_peer():
    assert ip([("X-Forwarded-For", " , ")], 1) == ip_address(PEER)


@pytest.mark.parametrize(
    "value, trusted, expected",
    [
        ("for=203.0.113.1", 1, "203.0.113.1"),
        ("For=203.0.113.1;proto=https;by=10.0.0.1", 1, "203.0.113.1"),
        ('for="203.0.113.1:4711"', 1, "203.0.113.1"),
        ('for="[2001:db8:cafe::17]:4711"', 1, "2001:db8:cafe::17"),
        ('for="[2001:db8:cafe::17]"', 1, "2001:db8:cafe::17"),
        ("for=2001:db8::17", 1, "2001:db8::17"),  # unquoted, as nginx configs often write it
        ("for=1.1.1.1, for=203.0.113.1", 1, "203.0.113.1"),
        ("for=1.1.1.1, for=203.0.113.1", 3, "1.1.1.1"),
        ("for=1.1.1.1, for=203.0.113.1", 9, "1.1.1.1"),
        ('proto=https;for="203.0.113.1";host="a,b;c"', 1, "203.0.113.1"),
        ('for=1.1.1.1;host="x\\"y", for=203.0.113.1', 1, "203.0.113.1"),
        ("for=1.1.1.1,,  ,for=203.0.113.1", 1, "203.0.113.1"),
        (";for=203.0.113.1;", 1, "203.0.113.1"),
    ],
)
def test_forwarded(value, trusted, expected):
    assert ip([("Forwarded", value)], trusted) == ip_address(expected)


def test_forwarded_lines_are_joined_in_order():
    headers = [("Forwarded", "for=1.1.1.1"), ("Forwarded", "for=3.3.3.3")]
    assert ip(headers, 1) == ip_address("3.3.3.3")


@pytest.mark.parametrize(
    "value",
    [
        "unknown",
        "1.1.1.1, unknown",
        "_hidden",
        "1.1.1.1, garbage, 203.0.113.1",  # garbage anywhere, even left of the trusted part
        "203.0.113.1:",
        "203.0.113.1:99999",
        "203.0.113.1:http",
        "[2001:db8::1",
        "[2001:db8::1]x",
        "[2001:db8::1]:",
        "[203.0.113.1]x",
        "2001:db8::1%",
        "010.0.0.1",
        "1.2.3.4 5.6.7.8",
        ", ".join(["10.0.0.1"] * 65),
    ],
)
def test_invalid_x_forwarded_for(value):
    deny = assert_invalid(ip([("X-Forwarded-For", value)], 1))
    assert "X-Forwarded-For" in deny.message


@pytest.mark.parametrize(
    "value",
    [
        "for=unknown",
        "for=_hidden",
        'for="_gazonk"',
        "for=1.1.1.1, for=unknown",
        "proto=https",  # an element without for= would shift the count
        "for=1.1.1.1, by=10.0.0.1",
        "for=1.1.1.1;for=2.2.2.2",
        "for=",
        'for=""',
        'for="203.0.113.1',
        "for 203.0.113.1",
        "=203.0.113.1",
        "203.0.113.1",
        "for=203.0.113.1 x",
        'for="[2001:db8::1]:4711"x',
        "for=[2001:db8::1",
        ", ".join(["for=10.0.0.1"] * 65),
    ],
)
def test_invalid_forwarded(value):
    deny = assert_invalid(ip([("Forwarded", value)], 1))
    assert "Forwarded" in deny.message


def test_headers_that_agree_are_accepted():
    headers = [
        ("X-Forwarded-For", "1.1.1.1, 203.0.113.1:99"),
        ("Forwarded", 'for=1.1.1.1, for="203.0.113.1:1234"'),
    ]
    assert ip(headers, 1) == ip_address("203.0.113.1")


@pytest.mark.parametrize(
    "xff, forwarded",
    [
        ("203.0.113.1", "for=1.1.1.1"),
        ("1.1.1.1, 203.0.113.1", "for=203.0.113.1"),  # a hop missing from one of them
        ("203.0.113.1, 1.1.1.1", "for=1.1.1.1, for=203.0.113.1"),  # same hops, other order
    ],
)
def test_headers_that_disagree_are_refused(xff, forwarded):
    deny = assert_invalid(ip([("X-Forwarded-For", xff), ("Forwarded", forwarded)], 1))
    assert "different" in deny.message


def test_garbage_in_one_header_is_refused_even_if_the_other_is_fine():
    headers = [("X-Forwarded-For", "203.0.113.1"), ("Forwarded", "for=unknown")]
    assert_invalid(ip(headers, 1))


def test_x_real_ip_is_never_read():
    assert ip([("X-Real-IP", "1.1.1.1"), ("X-Forwarded-For", "203.0.113.1")], 1) == ip_address(
        "203.0.113.1"
    )
