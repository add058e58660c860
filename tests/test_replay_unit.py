"""`keyproxy replay` and the vouched identity, directly: the pure parts, fast."""

from __future__ import annotations

import calendar
import hashlib
import time

import orjson
import pytest

from keyproxy.checks import Pipeline, build_checks
from keyproxy.commands.replay import _epoch, replay
from keyproxy.config import parse_config
from keyproxy.ratelimit import open_limiter
from keyproxy.request import Headers, RequestContext, Vouched

T0 = calendar.timegm((2026, 12, 4, 6, 0, 0))


def _hash(name: str) -> str:
    return "sha256:" + hashlib.sha256(f"pk_{name}_".encode() + b"0" * 40).hexdigest()


def config(*key_lines: str, users: bool = False) -> object:
    text = "\n".join(
        [
            "upstream:",
            "  url: http://127.0.0.1:3000",
            "routes:",
            '  - {match: "GET /v1/data/{table}", acl: get, op: list}',
            "keys:",
            *key_lines,
        ]
    )
    if users:
        text += "\nusers:\n  jwt:\n    algorithms: [HS256]\n    secret: ${S}\n"
        text += "    issuer: any\n    audience: any\n"
    return parse_config(text, "candidate.yaml", {"S": "x" * 40})


def line(seconds: float, key: str | None = "k", ip: str = "127.0.0.1", **extra: object) -> bytes:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(T0 + int(seconds)))
    record = {
        "time": f"{stamp}.{round((seconds % 1) * 1000):03d}Z",
        "request_id": "r",
        "key": key,
        "user": None,
        "client_ip": ip,
        "method": "GET",
        "path": "/v1/data/posts",
        "route": "GET /v1/data/{table}",
        "decision": "allow",
        "reason": None,
        "status": 200,
        "referer_origin": None,
        "credential_source": "header",
        "query_names": None,
        "roles": None,
        **extra,
    }
    return orjson.dumps(record)


KEY = f"  - {{id: k, hash: {_hash('k')}, type: read, acls: [get]}}"


def test_epoch_reads_the_access_log_time():
    cache: dict[str, float] = {}
    assert _epoch("2026-12-04T06:00:00.250Z", cache) == T0 + 0.25
    assert _epoch("2026-12-04T06:00:01.000Z", cache) == T0 + 1
    assert _epoch("2026-12-04T06:00:00Z", cache) == T0


def test_rate_limits_run_on_the_logged_clock():
    limited = config(
        f"  - {{id: k, hash: {_hash('k')}, type: read, acls: [get], rate_limit: 2/minute}}"
    )
    burst = replay(limited, [line(0), line(1), line(2)])
    assert [(k[:2], g.count) for k, g in burst.groups.items()] == [(("allow", "deny"), 1)]
    assert next(iter(burst.groups))[4] == "RATE_LIMITED"
    # The same three requests spread over two minutes: the bucket refills between them.
    spread = replay(limited, [line(0), line(40), line(80)])
    assert spread.changed == 0 and spread.unchanged == 3
    # Per client address, as live: two addresses each get their own two.
    two = replay(limited, [line(0), line(1, ip="127.0.0.2"), line(2), line(3, ip="127.0.0.2")])
    assert two.changed == 0


def test_key_states_in_the_candidate():
    assert replay(config(KEY), [line(0)]).changed == 0
    cases = {
        "removed": (config(f"  - {{id: other, hash: {_hash('o')}, type: read}}"), "INVALID_TOKEN"),
        "revoked": (
            config(f"  - {{id: k, hash: {_hash('k')}, type: read, acls: [get], revoked: true}}"),
            "TOKEN_REVOKED",
        ),
        "expired": (
            config(
                f"  - {{id: k, hash: {_hash('k')}, type: read, acls: [get],"
                " expires: 2026-12-04T05:00:00Z}"
            ),
            "TOKEN_EXPIRED",
        ),
    }
    for name, (candidate, code) in cases.items():
        result = replay(candidate, [line(0)])
        assert [k[4] for k in result.groups] == [code], name


def test_a_user_without_users_configured_is_refused_and_kept_with_it():
    logged = line(0, user="alice", user_roles=["user"])
    assert replay(config(KEY, users=True), [logged]).changed == 0
    result = replay(config(KEY), [logged])
    assert [k[4] for k in result.groups] == ["INVALID_TOKEN"]


def test_lines_replay_cannot_decide_are_counted_apart():
    result = replay(
        config(KEY),
        [
            line(0, key=None, decision="deny", reason="INVALID_TOKEN", status=401),
            line(1, decision="deny", reason="INVALID_TOKEN", status=401),  # the user's token
            line(2, decision="deny", reason="UPGRADE_NOT_ALLOWED", status=400),
            line(3, decision="allow", reason="UPSTREAM_UNAVAILABLE", status=502),
            b"",
            b"{not json",
            line(4, decision="maybe"),
        ],
    )
    assert (result.no_key, result.credential, result.kept) == (1, 1, 1)
    assert result.replayed == result.unchanged == 1 and result.changed == 0
    assert result.bad_lines == 2 and [n for n, _ in result.bad_examples] == [6, 7]


def test_a_query_key_is_refused_when_the_candidate_stops_reading_the_query():
    server = "server: {credential_sources: [header, query]}\n"
    text = (
        "upstream:\n  url: http://127.0.0.1:3000\nroutes:\n"
        '  - {match: "GET /v1/data/{table}", acl: get}\nkeys:\n' + KEY + "\n"
    )
    logged = line(0, credential_source="query", query_names=["api_key", "page"])
    with_query = parse_config(server + text, "a.yaml", {})
    assert replay(with_query, [logged]).changed == 0
    without = parse_config(text, "b.yaml", {})
    assert [k[4] for k in replay(without, [logged]).groups] == ["INVALID_TOKEN"]


@pytest.mark.parametrize(("revoked", "expected"), [(False, None), (True, "TOKEN_REVOKED")])
def test_a_vouched_key_goes_through_the_same_credential_rules(revoked, expected):
    extra = ", revoked: true" if revoked else ""
    cfg = config(f"  - {{id: k, hash: {_hash('k')}, type: read, acls: [get]{extra}}}")
    pipeline = Pipeline(build_checks(open_limiter(cfg.rate_limits)))
    ctx = RequestContext(cfg, "GET", "/v1/data/posts", Headers([]), "127.0.0.1", T0, "t")
    ctx.vouched = Vouched("k")
    outcome = pipeline.decide(ctx)
    assert (outcome.code if outcome is not None else None) == expected


def test_report_mode_keys_replay_to_would_deny_and_switching_to_enforce_shows():
    fenced = f"  - {{id: k, hash: {_hash('k')}, type: read, acls: [get], ips: [10.0.0.0/8]"
    logged = line(0, decision="would_deny", reason="IP_NOT_ALLOWED")
    same = replay(config(fenced + ", mode: report}"), [logged])
    assert same.changed == 0 and same.unchanged == 1
    enforced = replay(config(fenced + "}"), [logged])
    assert list(enforced.groups) == [
        ("would_deny", "deny", "k", "GET /v1/data/{table}", "IP_NOT_ALLOWED")
    ]


def test_explain_key_id_refuses_a_revoked_key_as_live():
    import asyncio

    from keyproxy.commands.explain import explain

    revoked = config(f"  - {{id: k, hash: {_hash('k')}, type: read, acls: [get], revoked: true}}")
    result = asyncio.run(explain(revoked, "GET", "/v1/data/posts", key_id="k"))
    assert not result.allowed
    assert [s.deny.code for s in result.steps if s.deny is not None] == ["TOKEN_REVOKED"]
    fine = asyncio.run(explain(config(KEY), "GET", "/v1/data/posts", key_id="k"))
    assert fine.allowed and "via --key-id" in fine.steps[1].detail


def test_a_rotated_key_replays_by_the_hash_the_request_used():
    new, old = _hash("new"), _hash("k")
    rotated = f"  - {{id: k, hashes: [{new}, {old}], type: read, acls: [get]}}"
    logged = line(0, key_hash=old[:15])  # the client still sends the old key
    assert replay(config(rotated), [logged]).changed == 0
    ended = f'  - {{id: k, hashes: [{new}, {{hash: "{old}", until: 2026-12-01T00:00:00Z}}],'
    expired = replay(config(ended + " type: read, acls: [get]}"), [logged])
    assert [k[4] for k in expired.groups] == ["TOKEN_EXPIRED"]
    dropped = replay(config(f"  - {{id: k, hash: {new}, type: read, acls: [get]}}"), [logged])
    assert [k[4] for k in dropped.groups] == ["INVALID_TOKEN"]
    message = next(iter(dropped.groups.values())).examples[0]["after"]["message"]
    assert message == f"key 'k' no longer lists the hash {old[:15]}"
    # The new key's requests are untouched by the old hash's end.
    assert (
        replay(config(ended + " type: read, acls: [get]}"), [line(0, key_hash=new[:15])]).changed
        == 0
    )
