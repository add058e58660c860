"""`keyproxy explain --header` shows the refusals the server makes while parsing a head,
and they are the very answers a running keyproxy gives for the same head."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from keyproxy.policy.refusals import (
    BAD_REQUEST,
    EXPECTATION_FAILED,
    HOST_REQUIRED,
    UPGRADE_NOT_ALLOWED,
    head_refusal,
)
from tests.proxy_process import KEYS, Keyproxy

HEADS = [
    (["Host: a", "Host: b"], HOST_REQUIRED),
    (["Host: a", "Transfer-Encoding: gzip"], BAD_REQUEST),
    (["Host: a", "Expect: foo"], EXPECTATION_FAILED),
    (["Host: a", "Connection: Upgrade", "Upgrade: websocket"], UPGRADE_NOT_ALLOWED),
]


def explain_json(proxy: Keyproxy, headers: list[str]) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "keyproxy", "explain", "-c", str(proxy.config_path), "--json"]
    for header in headers:
        args += ["--header", header]
    args += ["--key", KEYS["reader"], "GET", "/v1/data/posts"]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def server_answer(proxy: Keyproxy, headers: list[str]) -> tuple[int, str]:
    head = "GET /v1/data/posts HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers)
    head += f"X-API-Key: {KEYS['reader']}\r\n\r\n"
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        sock.sendall(head.encode())
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]


@pytest.mark.parametrize(("headers", "deny"), HEADS)
def test_explain_shows_the_parse_refusal_the_server_gives(proxy: Keyproxy, headers, deny):
    result = explain_json(proxy, headers)
    assert result.returncode == 1, result.stdout + result.stderr
    out = json.loads(result.stdout)
    assert out["steps"] == [
        {
            "step": "parse",
            "name": "request head",
            "result": "deny",
            "status": deny.status,
            "code": deny.code,
            "detail": deny.message,
        }
    ]
    assert (out["verdict"], out["status"], out["code"]) == ("deny", deny.status, deny.code)
    assert server_answer(proxy, headers) == (deny.status, deny.code)


def test_headers_with_underscores_are_ignored_by_both(proxy: Keyproxy):
    headers = ["Host: a", "Transfer_Encoding: gzip", "X_Api_Key: nothing"]
    result = explain_json(proxy, headers)
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["verdict"] == "allow"
    assert head_refusal([("transfer_encoding", "gzip"), ("host", "a")]) is None


def test_head_refusal_rules():
    assert head_refusal([("host", "a")]) is None
    assert head_refusal([], http11=False) is None
    assert head_refusal([], http11=True) is HOST_REQUIRED
    assert head_refusal([("host", "a"), ("expect", "100-continue")]) is None
    assert head_refusal([("host", "a"), ("transfer-encoding", "chunked")]) is None
    both = [("host", "a"), ("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")]
    assert head_refusal(both) is BAD_REQUEST
    assert head_refusal([("host", "a"), ("upgrade", "websocket")]) is None  # not an upgrade
