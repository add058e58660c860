"""Reading rotation (`hashes:`), `mode`, refilling quotas and rate-limit lists from YAML."""

from __future__ import annotations

import hashlib
import textwrap
from datetime import UTC, datetime

import pytest

from keyproxy.config import ConfigError, ConfigIssue, parse_config
from keyproxy.config.model import Config, KeyHash, Rate
from keyproxy.policy.credentials import Presented, lookup, rotation_block
from keyproxy.request import Deny, Headers, RequestContext

BASE = """\
upstream:
  url: http://127.0.0.1:3000
routes:
  - {match: "GET /v1/data/{table}", acl: search}
keys:
"""
NEW = "pk_" + "a" * 64
OLD = "pk_" + "b" * 64
OLDER = "pk_" + "c" * 64
UNTIL = "2027-01-15T00:00:00Z"
UNTIL_EPOCH = datetime(2027, 1, 15, tzinfo=UTC).timestamp()


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def parse(keys: str) -> Config:
    return parse_config(BASE + textwrap.indent(textwrap.dedent(keys), "  "), "t.yaml", {})


def issues(keys: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        parse(keys)
    return caught.value.issues


def the_issue(keys: str) -> ConfigIssue:
    found = issues(keys)
    assert len(found) == 1, found
    return found[0]


def key(extra: str, *, hash_line: str = f"hash: {sha(NEW)}") -> str:
    return f"- id: k\n  {hash_line}\n  type: read\n" + textwrap.indent(extra, "  ")


# -- rotation ------------------------------------------------------------------------------


ROTATED = f"""\
- id: k
  type: read
  hashes:
    - {sha(NEW)}
    - {{hash: "{sha(OLD)}", until: {UNTIL}}}
    - {{hash: "{sha(OLDER)}"}}
"""


def test_hashes_index_every_hash_and_say_which_one() -> None:
    config = parse(ROTATED)
    assert len(config.keys) == 1 and len(config.keys_by_digest) == 3
    by = {k: config.keys_by_digest[hashlib.sha256(k.encode()).digest()] for k in (NEW, OLD, OLDER)}
    assert {k.id for k in by.values()} == {"k"}
    assert by[NEW] is config.keys[0]
    assert by[NEW].rotation == KeyHash(0, sha(NEW)[:15], None)
    assert by[OLD].rotation == KeyHash(1, sha(OLD)[:15], UNTIL_EPOCH)
    assert by[OLDER].rotation == KeyHash(2, sha(OLDER)[:15], None)
    assert NEW not in repr(by[NEW]) and "aaaa" not in by[NEW].rotation.label[15:]


def test_an_old_hash_is_refused_after_its_until_and_never_echoes_the_key() -> None:
    config = parse(ROTATED)
    for k in (NEW, OLD):
        assert lookup(Presented("header", k), config.keys_by_digest, UNTIL_EPOCH - 1).id == "k"
    refused = lookup(Presented("header", OLD), config.keys_by_digest, UNTIL_EPOCH)
    assert isinstance(refused, Deny)
    assert (refused.status, refused.code) == (401, "TOKEN_EXPIRED")
    assert refused.message == f"this key was rotated on {UNTIL}; use the new key"
    assert OLD not in refused.message and sha(OLD)[7:] not in refused.message
    assert lookup(Presented("header", NEW), config.keys_by_digest, UNTIL_EPOCH + 1e6).id == "k"
    assert lookup(Presented("header", OLDER), config.keys_by_digest, UNTIL_EPOCH + 1e6).id == "k"


@pytest.mark.parametrize(
    ("keys", "where", "message"),
    [
        (
            f"- id: k\n  hash: {sha(NEW)}\n  hashes: [{sha(OLD)}]\n  type: read\n",
            "keys[0].hash",
            "either hash or hashes",
        ),
        (
            f"- id: k\n  hashes: [{sha(NEW)}, {sha(NEW)}]\n  type: read\n",
            "keys[0].hashes[1]",
            "appears twice",
        ),
        (
            f"- id: a\n  hash: {sha(OLD)}\n  type: read\n"
            f"- id: k\n  hashes: [{sha(NEW)}, {sha(OLD)}]\n  type: read\n",
            "keys[1].hashes[1]",
            "already used by keys[0]",
        ),
        ("- id: k\n  hashes: []\n  type: read\n", "keys[0].hashes", "empty list"),
        (f"- id: k\n  hashes: [{NEW}]\n  type: read\n", "keys[0].hashes[0]", "expected sha256:"),
        (
            f"- id: k\n  hashes: [{{hash: {sha(NEW)}, until: soon}}]\n  type: read\n",
            "keys[0].hashes[0].until",
            "not a date",
        ),
        (
            f"- id: k\n  hashes: [{{hash: {sha(NEW)}, untill: {UNTIL}}}]\n  type: read\n",
            "keys[0].hashes[0].untill",
            "unknown field",
        ),
        (f"- id: k\n  hashes: [{{until: {UNTIL}}}]\n  type: read\n", "keys[0].hashes[0]", "'hash'"),
    ],
)
def test_bad_hashes_are_refused_with_their_line(keys: str, where: str, message: str) -> None:
    issue = the_issue(keys)
    assert issue.where == where and message in issue.message, issue
    assert issue.line is not None
    assert NEW not in str(issue) or "expected sha256:" in issue.message  # the hint warns


# -- mode -------------------------------------------------------------------------------------


def test_mode_report_and_enforce() -> None:
    assert parse(key("mode: report\n")).keys[0].report is True
    assert parse(key("mode: enforce\n")).keys[0].report is False
    assert parse(key("")).keys[0].report is False
    issue = the_issue(key("mode: audit\n"))
    assert issue.where == "keys[0].mode" and issue.line == 9


# -- quotas and windows ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "quota", "period"),
    [
        ("5000", 5000, None),
        ("100000/month", 100000, "month"),
        ("7/week", 7, "week"),
        ("1/day", 1, "day"),
    ],
)
def test_quota_forms(text: str, quota: int, period: str | None) -> None:
    k = parse(key(f"quota: {text}\n")).keys[0]
    assert (k.quota, k.quota_period) == (quota, period)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5/hour", "per day, week or month"),
        ("0/day", "at least 1"),
        ("5/year", "not per"),
        ("lots", "whole number"),
        ("-1/day", "whole number"),
    ],
)
def test_bad_quotas(text: str, message: str) -> None:
    issue = the_issue(key(f"quota: {text}\n"))
    assert issue.where == "keys[0].quota" and message in issue.message, issue
    assert issue.line == 9


def test_rate_limit_lists() -> None:
    k = parse(key("rate_limit: [10/second, 1000/hour]\n")).keys[0]
    assert k.rate_limit == (Rate(10, 1.0, "10/second"), Rate(1000, 3600.0, "1000/hour"))
    # a list of one is the plain rate, so it costs what a plain rate costs
    assert parse(key("rate_limit: [5/minute]\n")).keys[0].rate_limit == Rate(5, 60.0, "5/minute")


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("[]", "keys[0].rate_limit", "empty list"),
        ("[10/second, 5/lots]", "keys[0].rate_limit[1]", "unknown period"),
        ("[10/second, 20/second]", "keys[0].rate_limit", "same period"),
        (
            "[1/second, 2/minute, 3/hour, 4/day, 5/second, 6/minute]",
            "keys[0].rate_limit",
            "at most 5",
        ),
    ],
)
def test_bad_rate_limit_lists(text: str, where: str, message: str) -> None:
    issue = the_issue(key(f"rate_limit: {text}\n"))
    assert issue.where == where and message in issue.message, issue


# -- keygen --rotate's lines ------------------------------------------------------------------


def test_rotation_block_keeps_live_hashes_and_drops_dead_ones() -> None:
    now = UNTIL_EPOCH - 86400
    old = [
        (hashlib.sha256(OLD.encode()).digest(), None),  # the current hash: gets the grace
        (hashlib.sha256(OLDER.encode()).digest(), UNTIL_EPOCH),  # already rotating: kept
        (hashlib.sha256(b"dead").digest(), now - 1),  # refused already: left out
    ]
    block, ends = rotation_block(NEW, old, now, 3 * 86400)
    assert ends == now + 3 * 86400
    assert block == (
        "    hashes:\n"
        f"      - {sha(NEW)}\n"
        f'      - {{hash: "{sha(OLD)}", until: 2027-01-17T00:00:00Z}}\n'
        f'      - {{hash: "{sha(OLDER)}", until: {UNTIL}}}\n'
    )
    assert NEW not in block and OLD not in block
    # pasted under a key, it reads back as the rotation it describes
    config = parse(f"- id: k\n  type: read\n{block[2:].replace(chr(10) + '  ', chr(10))}")
    assert len(config.keys_by_digest) == 3


def test_the_request_context_names_the_hash_used_never_the_key() -> None:
    config = parse(ROTATED + f"- id: plain\n  hash: {sha(OLDER + 'x')}\n  type: read\n")
    ctx = RequestContext(config, "GET", "/", Headers(), "127.0.0.1", 0.0)
    assert ctx.key_hash is None
    ctx.key = config.keys_by_digest[hashlib.sha256(OLD.encode()).digest()]
    assert ctx.key_hash == "sha256:" + hashlib.sha256(OLD.encode()).hexdigest()[:8]
    ctx.key = config.keys[1]
    assert ctx.key_hash is None  # a key with a single hash: nothing to tell apart


async def test_explain_names_the_hash_a_rotated_key_used() -> None:
    from keyproxy.commands.explain import explain, render

    config = parse(ROTATED)
    result = await explain(config, "GET", "/v1/data/posts", key=OLD, now=UNTIL_EPOCH - 1)
    text = render(result, "GET", "/v1/data/posts", config)
    assert f"hash #2 {sha(OLD)[:15]} (until {UNTIL})" in text and OLD not in text
    late = await explain(config, "GET", "/v1/data/posts", key=OLD, now=UNTIL_EPOCH)
    assert "401 TOKEN_EXPIRED: this key was rotated on" in render(late, "GET", "/x", config)


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("rate_limit", "{a: b}", "keys[0].rate_limit"),
        ("rate_limit", "[[1/second]]", "keys[0].rate_limit[0]"),
        ("rate_limit", "[{a: b}]", "keys[0].rate_limit[0]"),
        ("expires", "{a: b}", "keys[0].expires"),
        ("quota", "[5/day]", "keys[0].quota"),
    ],
)
def test_a_list_or_mapping_where_a_value_belongs_is_an_issue_not_a_crash(
    field: str, value: str, where: str
) -> None:
    issue = the_issue(key(f"{field}: {value}\n"))
    assert issue.where == where and "expected a single value" in issue.message
