"""An identity provider whose JWKS endpoint answers garbage, through `keyproxy serve` and a
real JWKS endpoint: a document that cannot be read keeps the keys already known (tokens
they signed pass, unknown ones are refused), and keys published in a form keyproxy must
not use (an HMAC key, an RSA key labelled for another algorithm) verify nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt

from tests.procs import start_upstream
from tests.proxy_process import Keyproxy, error_of, start_keyproxy
from tests.test_users_e2e import _fetches, _jwk, _jwks_config, _rsa, _start_jwks

KEY = "pk_" + "c" * 64


def rs(private: Any, kid: Any, alg: str = "RS256") -> str:
    claims = {"sub": "alice", "exp": int(time.time()) + 600, "aud": "api"}
    return jwt.encode(claims, private, algorithm=alg, headers={"kid": kid})


def status_of(kp: Keyproxy, token: str) -> tuple[int, str | None]:
    headers = [("X-API-Key", KEY), ("Authorization", f"Bearer {token}")]
    status, _, body, _ = kp.request("GET", "/v1/data/posts", headers)
    return status, (error_of(body) if status != 200 else None)


def wait_for_fetches(port: int, count: int) -> None:
    deadline = time.monotonic() + 10
    while _fetches(port) < count:
        assert time.monotonic() < deadline, "the JWKS was not fetched again"
        time.sleep(0.05)


def test_garbage_keeps_known_keys_and_unusable_keys_verify_nothing(tmp_path: Path) -> None:
    signer, stranger = _rsa(), _rsa()
    keys_file = tmp_path / "jwks.json"
    keys_file.write_text(json.dumps({"keys": [_jwk(signer, "k1")]}))
    jwks, port = _start_jwks(keys_file)
    with start_upstream() as upstream:
        # unknown kids never fetch (10 s apart): only the refresh timer does
        config = _jwks_config(upstream.url, KEY, port, "200ms", "10s")
        kp = start_keyproxy(tmp_path, config)
        try:
            known = rs(signer, "k1")
            assert status_of(kp, known) == (200, None)
            assert status_of(kp, rs(signer, "k1", alg="PS256")) == (401, "INVALID_TOKEN")
            garbage = [
                b"<html><body>502 Bad Gateway</body></html>",
                b'{"keys": "all of them"}',
                b"[]",
                b"",
                b'{"keys": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
            ]
            for document in garbage:
                keys_file.write_bytes(document)
                wait_for_fetches(port, _fetches(port) + 2)  # read at least once whole
                assert status_of(kp, known) == (200, None), document[:40]
                fresh = rs(signer, "k1")  # never seen: verified against the kept key
                assert status_of(kp, fresh) == (200, None), document[:40]
                assert status_of(kp, rs(stranger, "k2")) == (401, "INVALID_TOKEN")
            # A readable document whose keys keyproxy must not use: an HMAC key under the
            # signer's kid, and the signer's RSA key labelled for another algorithm. The
            # provider has withdrawn k1 as keyproxy can use it: its tokens, cached or
            # not, are refused, and an HS256 token "signed" with the oct key is too.
            oct_key = {"kty": "oct", "kid": "k1", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}
            relabelled = {**_jwk(signer, "k1"), "alg": "RS512"}
            for keys in ([oct_key], [relabelled]):
                keys_file.write_text(json.dumps({"keys": keys}))
                wait_for_fetches(port, _fetches(port) + 2)
                for token in (known, rs(signer, "k1")):
                    assert status_of(kp, token) == (401, "INVALID_TOKEN"), keys
            secret = b"secret-secret-secret-secret-secret"
            forged = jwt.encode(
                {"sub": "mallory", "exp": int(time.time()) + 600, "aud": "api"},
                secret,
                algorithm="HS256",
                headers={"kid": "k1"},
            )
            assert status_of(kp, forged) == (401, "INVALID_TOKEN")
        finally:
            kp.stop()
            jwks.stop()
