"""The decision memo: a repeated request skips steps 0–7, and only when that is exact.

Every test compares a memo hit with the same request decided afresh, or shows the
memo stepping aside (a changed input, a fact that ran out, a reload)."""

from __future__ import annotations

import ast
import dataclasses
import time
from pathlib import Path

import jwt
import pytest

import keyproxy
from keyproxy.checks import Pipeline, build_checks
from keyproxy.checks.memo import DecisionMemo, memo_key
from keyproxy.config import parse_config
from keyproxy.policy.headers import MEMO_IGNORED_HEADERS
from keyproxy.ratelimit import open_limiter
from keyproxy.request import Deny, Headers, RequestContext
from tests.proxy_process import digest

SECRET = "memo-test-secret-0123456789abcdef0123456789"
KEYS = {name: f"pk_{name}_" + "0" * 40 for name in ("reader", "fenced", "soon", "watch", "user")}
NOW = time.time()


CONFIG = f"""\
upstream: {{url: "http://127.0.0.1:3000"}}
routes:
  - {{match: "GET /v1/data/{{table}}", acl: get, op: list}}
  - {{match: "GET /v1/data/{{table}}/{{id}}", acl: get, op: read}}
  - {{match: "POST /v1/data/{{table}}", acl: write, op: create}}
keys:
  - {{id: reader, hash: {digest(KEYS["reader"])}, type: read, acls: [get], rate_limit: 1000/second}}
  - {{id: fenced, hash: {digest(KEYS["fenced"])}, type: read, acls: [get], ips: [10.0.0.0/8],
      referers: ["https://app.example/*"]}}
  - {{id: soon, hash: {digest(KEYS["soon"])}, type: read, acls: [get],
      expires: {time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW + 60))}}}
  - {{id: watch, hash: {digest(KEYS["watch"])}, type: read, acls: [get], mode: report,
      ips: [192.0.2.0/24]}}
  - {{id: user, hash: {digest(KEYS["user"])}, type: admin, roles: [guest]}}
users:
  jwt: {{algorithms: [HS256], secret: {SECRET}, issuer: idp, audience: api}}
roles:
  guest: {{"*": [read, list]}}
  member: {{"*": [read, list, create]}}
"""


@pytest.fixture(scope="module")
def config():
    return parse_config(CONFIG, "memo.yaml", {})


def token(roles: list[str], exp: float) -> str:
    claims = {"sub": "ann", "iss": "idp", "aud": "api", "exp": exp, "roles": roles}
    return jwt.encode(claims, SECRET, "HS256")


def request(config, key: str, path: str = "/v1/data/posts", **extra: str):
    ip = extra.pop("ip", "10.1.2.3")
    now = float(extra.pop("now", NOW))
    method = extra.pop("method", "GET")
    headers = [("x-api-key", KEYS[key])] + [(n.replace("_", "-"), v) for n, v in extra.items()]
    ctx = RequestContext(config, method, path, Headers.from_lowered(headers), ip, now, "t")
    varying = any(n in MEMO_IGNORED_HEADERS for n, _ in headers)
    return ctx, memo_key(method, path, ip, headers, varying)


def fields(ctx: RequestContext) -> dict[str, object]:
    skip = {"limit", "request_id", "cache_key", "now", "headers", "notes"}
    return {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx) if f.name not in skip}


def pipelines(config):
    checks = build_checks(open_limiter(config.rate_limits))
    return Pipeline(checks, DecisionMemo()), Pipeline(checks)


CASES = [
    ("reader", {}),
    ("reader", {"path": "/v1/data/posts/7"}),
    ("fenced", {"referer": "https://app.example/page"}),
    ("soon", {}),
    ("user", {"authorization": "Bearer " + token(["member"], NOW + 3600)}),
    ("user", {"authorization": "Bearer " + token([], NOW + 3600), "path": "/v1/data/posts/1"}),
]


@pytest.mark.parametrize(("key", "extra"), CASES)
def test_a_hit_sets_what_a_fresh_decision_sets(config, key: str, extra: dict[str, str]):
    memoised, plain = pipelines(config)
    first, memo_key_ = request(config, key, **extra)
    assert memoised.decide(first, memo_key_) is None
    again, same_key = request(config, key, **extra)
    assert memoised.decide(again, same_key) is None
    assert memoised.memo is not None and memoised.memo.hits == 1
    fresh, _ = request(config, key, **extra)
    assert plain.decide(fresh) is None
    assert fields(again) == fields(fresh)
    assert again.limit is not None or again.key.rate_limit is None  # step 8 still ran
    # Every repeat shares the first request's notes; an unremembered decision has none.
    assert again.notes is first.notes and again.notes is not None and fresh.notes is None


def test_the_rate_limit_still_counts_every_hit(config):
    pipeline, _ = pipelines(config)
    spent = parse_config(CONFIG.replace("1000/second", "2/minute"), "memo.yaml", {})
    pipeline = Pipeline(build_checks(open_limiter(spent.rate_limits)), DecisionMemo())
    outcomes = [pipeline.decide(*request(spent, "reader")) for _ in range(3)]
    assert outcomes[:2] == [None, None]
    assert isinstance(outcomes[2], Deny) and outcomes[2].code == "RATE_LIMITED"
    assert pipeline.memo is not None and pipeline.memo.hits == 2


@pytest.mark.parametrize(
    "changed",
    [
        {"referer": "https://evil.example/"},
        {"ip": "192.0.2.9"},
        {"x_http_method_override": "DELETE"},
        {"path": "/v1/data/posts?_method=DELETE"},
        {"method": "POST"},
    ],
)
def test_any_input_a_check_reads_is_part_of_the_key(config, changed: dict[str, str]):
    pipeline, _ = pipelines(config)
    assert pipeline.decide(*request(config, "fenced", referer="https://app.example/x")) is None
    extra = {"referer": "https://app.example/x", **changed}
    outcome = pipeline.decide(*request(config, "fenced", **extra))
    assert isinstance(outcome, Deny)
    assert pipeline.memo is not None and pipeline.memo.hits == 0


def test_trace_headers_do_not_split_repeats(config):
    pipeline, _ = pipelines(config)
    for i in range(3):
        ctx, key = request(config, "reader", traceparent=f"00-{i:032x}-{i:016x}-01")
        assert pipeline.decide(ctx, key) is None
    assert pipeline.memo is not None and pipeline.memo.hits == 2


def test_an_expiring_key_is_refused_once_it_has_expired(config):
    pipeline, _ = pipelines(config)
    assert pipeline.decide(*request(config, "soon")) is None
    outcome = pipeline.decide(*request(config, "soon", now=str(NOW + 61)))
    assert isinstance(outcome, Deny) and outcome.code == "TOKEN_EXPIRED"


def test_an_expiring_token_is_refused_once_it_has_expired(config):
    pipeline, _ = pipelines(config)
    bearer = "Bearer " + token(["member"], NOW + 30)
    assert pipeline.decide(*request(config, "user", authorization=bearer)) is None
    assert pipeline.decide(*request(config, "user", authorization=bearer, now=str(NOW + 1))) is None
    late = pipeline.decide(*request(config, "user", authorization=bearer, now=str(NOW + 31)))
    assert isinstance(late, Deny) and late.code == "TOKEN_EXPIRED"


def test_report_mode_findings_are_never_remembered(config):
    pipeline, _ = pipelines(config)
    for _ in range(2):
        ctx, key = request(config, "watch")
        assert pipeline.decide(ctx, key) is None
        assert ctx.would_deny is not None and ctx.would_deny.code == "IP_NOT_ALLOWED"
    assert pipeline.memo is not None and pipeline.memo.hits == 0


def test_a_reload_starts_an_empty_memo(config):
    pipeline, _ = pipelines(config)
    assert pipeline.decide(*request(config, "reader")) is None
    revoked = parse_config(
        CONFIG.replace("rate_limit: 1000/second}", "rate_limit: 1000/second, revoked: true}"),
        "memo.yaml",
        {},
    )
    outcome = pipeline.decide(*request(revoked, "reader"))
    assert isinstance(outcome, Deny) and outcome.code == "TOKEN_REVOKED"


def test_a_jwks_change_voids_every_entry(config):
    class Keys:
        generation = 0

    users = config.users
    assert users is not None
    pipeline, _ = pipelines(config)
    bearer = "Bearer " + token(["member"], NOW + 3600)
    saved = users.jwks
    users.jwks = Keys()  # only the generation is read by the memo
    try:
        pipeline.decide(*request(config, "user", authorization=bearer))
        Keys.generation = 1
        pipeline.decide(*request(config, "user", authorization=bearer))
        assert pipeline.memo is not None and pipeline.memo.hits == 0
    finally:
        users.jwks = saved


def _string_constants(path: Path) -> set[str]:
    """String literals as written: checks name request headers in lower case, as
    `Headers` holds them (a Title-Case literal is a header keyproxy sends)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, bytes):
            found.add(node.value.decode("latin-1"))
    return found


def test_no_check_reads_a_header_the_memo_ignores():
    """The memo key leaves these names out: no decision code may name one."""
    root = Path(keyproxy.__file__).parent
    deciding = [
        *sorted((root / "checks").glob("*.py")),
        *sorted((root / "policy").glob("*.py")),
        root / "response" / "cors.py",
    ]
    for path in deciding:
        if path.name in {"headers.py", "memo.py"}:
            continue
        named = _string_constants(path) & MEMO_IGNORED_HEADERS
        assert not named, f"{path.name} reads {sorted(named)}: drop them from the memo's list"
    from keyproxy.policy import headers as h

    read_by_checks = {
        *(name.decode() for name in h.CREDENTIAL_HEADERS | h.CLIENT_ADDRESS_HEADERS),
        *h.METHOD_OVERRIDE_HEADERS,
        *h.URL_OVERRIDE_HEADERS,
    }
    assert not read_by_checks & MEMO_IGNORED_HEADERS
