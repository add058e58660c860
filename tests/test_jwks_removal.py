"""A signing key removed from the JWKS takes its cached tokens with it, through
`keyproxy serve` and a real JWKS endpoint whose document the test rewrites."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt

from tests.procs import start_upstream
from tests.proxy_process import error_of, start_keyproxy
from tests.test_users_e2e import _jwk, _jwks_config, _rsa, _start_jwks

KEY = "pk_" + "e" * 64


def rs(private, kid: str, sub: str = "alice") -> str:
    claims = {"sub": sub, "exp": int(time.time()) + 600, "aud": "api"}
    return jwt.encode(claims, private, algorithm="RS256", headers={"kid": kid})


def test_cached_tokens_of_a_removed_key_are_refused_after_the_refresh(tmp_path: Path):
    first, second = _rsa(), _rsa()
    keys_file = tmp_path / "jwks.json"
    keys_file.write_text(json.dumps({"keys": [_jwk(first, "k1"), _jwk(second, "k2")]}))
    jwks, port = _start_jwks(keys_file)
    with start_upstream() as upstream:
        config = _jwks_config(upstream.url, KEY, port, "1h", "1s")
        kp = start_keyproxy(tmp_path, config)

        def get(token: str) -> tuple[int, bytes]:
            status, _, body, _ = kp.request(
                "GET", "/v1/data/posts", [("X-API-Key", KEY), ("Authorization", f"Bearer {token}")]
            )
            return status, body

        try:
            seen_k1, seen_k2 = rs(first, "k1"), rs(second, "k2")
            assert get(seen_k1)[0] == 200 and get(seen_k2)[0] == 200  # both now cached
            keys_file.write_text(json.dumps({"keys": [_jwk(second, "k2")]}))  # k1 withdrawn
            time.sleep(1.1)
            assert get(rs(second, "k3-unknown"))[0] == 401  # an unknown kid: one refresh
            status, body = get(seen_k1)
            assert (status, error_of(body)) == (401, "INVALID_TOKEN"), body
            assert get(seen_k2)[0] == 200  # the key still published keeps its tokens
        finally:
            kp.stop()
            jwks.stop()


def test_verifier_forgets_only_tokens_of_changed_keys():
    """The pure part: a JWKS generation change drops the cached tokens whose kid is gone
    or whose key was replaced, and keeps the others (no network: the refresh is not due)."""
    from keyproxy.jwks import JwksCache
    from keyproxy.policy.users import Identity, JwtSettings, TokenVerifier

    first, second, third = _rsa(), _rsa(), _rsa()
    cache = JwksCache("http://127.0.0.1:9/jwks.json")
    cache._jwks = {"k1": _jwk(first, "k1"), "k2": _jwk(second, "k2")}
    cache.last_attempt = time.monotonic()
    settings = JwtSettings(
        algorithms=("RS256",), jwks_url=cache.url, audience="api", jwks_min_refresh=3600
    )
    verifier = TokenVerifier(settings, cache)
    now = time.time()
    t1, t2 = rs(first, "k1"), rs(second, "k2")
    assert isinstance(verifier.verify(t1, now), Identity)
    assert isinstance(verifier.verify(t2, now), Identity)
    assert len(verifier.cache) == 2
    cache._jwks, cache.keys = {"k2": _jwk(second, "k2")}, {}  # what a refresh does
    cache.generation += 1
    assert isinstance(verifier.verify(t2, now), Identity)
    assert len(verifier.cache) == 1  # k1's token forgotten
    assert not isinstance(verifier.verify(t1, now), Identity)
    cache._jwks, cache.keys = {"k2": _jwk(third, "k2")}, {}  # same kid, another key
    cache.generation += 1
    assert not isinstance(verifier.verify(t2, now), Identity)
    assert verifier.cache == {}
