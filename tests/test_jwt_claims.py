"""`users.jwt.issuer` and `audience` are required (or explicitly `any`): a token an
identity provider issued for another application must not log in here."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import yaml

from keyproxy.config import ConfigError, parse_config
from tests.procs import start_upstream
from tests.proxy_process import base_config, digest, start_keyproxy

SECRET = "jwt-claims-secret-0123456789abcdef0123"
GUEST = "sk_" + "9" * 64
BASE = """
server: {listen: "127.0.0.1:0"}
upstream: {url: "http://127.0.0.1:9"}
routes:
  - {match: "GET /v1/data/{table}", acl: get, op: list}
keys:
  - {id: k, type: read,
     hash: "sha256:0000000000000000000000000000000000000000000000000000000000000000"}
"""


def issues(users: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + users, "t.yaml", {})
    return [f"{i.line}: {i.where}: {i.message} ({i.hint})" for i in info.value.issues]


@pytest.mark.parametrize("missing", ["issuer", "audience"])
def test_a_missing_issuer_or_audience_is_a_config_error(missing: str):
    other = "audience: my-api" if missing == "issuer" else "issuer: idp"
    found = issues(f"users:\n  jwt: {{algorithms: [HS256], secret: {SECRET}, {other}}}\n")
    assert len(found) == 1, found
    assert found[0].startswith(f"10: users.jwt: '{missing}' is required"), found
    assert f"{missing}: any" in found[0]


def test_any_opts_out_explicitly():
    config = parse_config(
        BASE + f"users:\n  jwt: {{algorithms: [HS256], secret: {SECRET},"
        " issuer: any, audience: any}\n",
        "t.yaml",
        {},
    )
    assert config.users is not None
    token = jwt.encode({"sub": "bob", "aud": "other", "iss": "x", "exp": 2**31}, SECRET)
    assert config.users.verify(token, int(time.time())).user == "bob"


def test_the_none_algorithm_message_reads_as_a_sentence():
    found = issues(
        f"users:\n  jwt: {{algorithms: [none], secret: {SECRET}, issuer: i, audience: a}}\n"
    )
    assert "'none' is never accepted: it means an unsigned token" in found[0]
    assert "accepted an accepted" not in found[0]


def test_serve_refuses_a_file_without_audience_in_one_line(tmp_path: Path):
    config = base_config("http://127.0.0.1:9", {})
    config["users"] = {"jwt": {"algorithms": ["HS256"], "secret": SECRET, "issuer": "idp"}}
    path = tmp_path / "keyproxy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "keyproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "'audience' is required" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_a_token_for_another_application_is_refused(tmp_path: Path):
    with start_upstream() as upstream:
        config = base_config(upstream.url, upstream.inject())
        config["keys"] = [
            {"id": "guest", "hash": digest(GUEST), "type": "admin", "roles": ["guest"]}
        ]
        config["users"] = {
            "jwt": {"algorithms": ["HS256"], "secret": SECRET, "issuer": "idp", "audience": "me"}
        }
        kp = start_keyproxy(tmp_path, config)
        try:

            def call(aud: str) -> int:
                claims = {"sub": "alice", "iss": "idp", "aud": aud, "exp": int(time.time()) + 60}
                headers = [
                    ("X-API-Key", GUEST),
                    ("Authorization", "Bearer " + jwt.encode(claims, SECRET)),
                ]
                return kp.request("GET", "/v1/data/posts", headers)[0]

            assert call("me") == 200
            upstream.reset()
            assert call("another-app") == 401
            assert upstream.records() == []
        finally:
            kp.stop()
