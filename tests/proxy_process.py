"""Run `keyproxy serve` as a real process against a real upstream, for integration tests."""

from __future__ import annotations

import copy
import hashlib
import http.client
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.procs import Process, free_port, spawn

KEYS = {
    "reader": "pk_" + "1" * 64,
    "writer": "sk_" + "2" * 64,
    "admin": "sk_" + "3" * 64,
    "getonly": "pk_" + "4" * 64,
    "revoked": "pk_" + "5" * 64,
    "expired": "pk_" + "6" * 64,
}

#: A REST table's five operations, each on its own ACL and `op` (steps 6-7).
CRUD_ROUTES = [
    {"match": "GET /v1/data/{table}", "acl": "search", "op": "list"},
    {"match": "GET /v1/data/{table}/{id}", "acl": "get", "op": "read"},
    {"match": "POST /v1/data/{table}", "acl": "index", "op": "create"},
    {"match": "PATCH /v1/data/{table}/{id}", "acl": "index", "op": "update"},
    {"match": "DELETE /v1/data/{table}/{id}", "acl": "delete", "op": "delete"},
]

ROUTES = [
    {"match": "GET /v1/data/{table}", "acl": "search", "op": "list"},
    {"match": "GET /v1/data/{table}/{id}", "acl": "get", "op": "read"},
    {"match": "POST /v1/data/{table}", "acl": "index", "op": "create"},
    {"match": "DELETE /v1/data/{table}/{id}", "acl": "delete", "op": "delete"},
    {"match": "POST /{index}/_search", "acl": "search", "access": "read"},
    {"match": "GET|HEAD|OPTIONS /echo/**", "acl": "echo", "op": "none"},
    {"match": "POST|PUT|PATCH|DELETE /echo/**", "acl": "echo-write", "op": "none"},
    {"match": "POST|PUT /legacy/**", "acl": "legacy", "allow_method_override": True},
    {"match": "GET /json/{n}", "acl": "get"},
    {"match": "GET /big/{n}", "acl": "get"},
    {"match": "GET /chunked/{n}", "acl": "get"},
    {"match": "GET /ndjson/{n}", "acl": "get"},
    {"match": "GET /slow/{ms}", "acl": "get"},
    {"match": "GET /slow-body/{ms}", "acl": "get"},
    {"match": "GET /status/{code}", "acl": "get"},
    {"match": "GET /redirect", "acl": "get"},
    {"match": "GET /leak", "acl": "get"},
    {"match": "GET /hop", "acl": "get"},
    {"match": "GET /crash", "acl": "get"},
    {"match": "GET /crash-mid-body", "acl": "get"},
    {"match": "GET /gzip", "acl": "get"},
    {"match": "POST|PUT /upload", "acl": "upload"},
]


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def base_keys() -> list[dict[str, Any]]:
    return [
        {"id": "reader", "hash": digest(KEYS["reader"]), "type": "read"},
        {"id": "writer", "hash": digest(KEYS["writer"]), "type": "write"},
        {"id": "admin", "hash": digest(KEYS["admin"]), "type": "admin"},
        {"id": "getonly", "hash": digest(KEYS["getonly"]), "type": "read", "acls": ["get"]},
        {"id": "revoked", "hash": digest(KEYS["revoked"]), "type": "read", "revoked": True},
        {
            "id": "expired",
            "hash": digest(KEYS["expired"]),
            "type": "read",
            "expires": "2020-01-01T00:00:00Z",
        },
    ]


def base_config(upstream_url: str, inject: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
            "max_body": "1MiB",
        },
        "upstream": {"url": upstream_url, "timeout": "2s", "inject": copy.deepcopy(inject)},
        "routes": copy.deepcopy(ROUTES),
        "keys": base_keys(),
    }


class Keyproxy:
    """A running keyproxy: where it listens and how to talk to it."""

    def __init__(self, process: Process, config_path: Path, config: dict[str, Any]) -> None:
        self.process = process
        self.config_path = config_path
        self.config = config
        host, port = config["server"]["listen"].rsplit(":", 1)
        self.host, self.port = host, int(port)
        ahost, aport = config["server"]["admin_listen"].rsplit(":", 1)
        self.admin_host, self.admin_port = ahost, int(aport)
        self.url = f"http://{host}:{port}"

    def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        key: str | None = None,
    ) -> tuple[int, dict[str, str], bytes, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
            # A Host among `headers` replaces the one http.client would add.
            own_host = any(name.lower() == "host" for name, _ in items)
            conn.putrequest(method, target, skip_host=own_host, skip_accept_encoding=True)
            if key is not None:
                items.append(("X-API-Key", key))
            for name, value in items:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, resp
        finally:
            conn.close()

    def raw(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send bytes as they are and return everything read until the server closes or idles."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(data)
            chunks = []
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except TimeoutError:
                pass
            return b"".join(chunks)

    def admin(self, path: str) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection(self.admin_host, self.admin_port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def rewrite_config(self, config: dict[str, Any]) -> None:
        self.config = config
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.replace(self.config_path)

    def stop(self) -> int:
        return self.process.stop()


#: "1": every keyproxy started here must say it is the compiled build ("0": must not).
EXPECT_COMPILED = "KEYPROXY_TEST_EXPECT_COMPILED"


def start_keyproxy(
    tmp_path: Path,
    config: dict[str, Any],
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    cwd: Path | None = None,
) -> Keyproxy:
    """`cwd`: where `python -m keyproxy` runs, the first place it imports keyproxy from."""
    path = tmp_path / f"keyproxy-{free_port()}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "keyproxy", "serve", "-c", str(path), *(extra_args or [])]
    process, _ = spawn(
        argv, ready=r'"event":"listening"', ready_stream="stderr", env=env, cwd=cwd, name="keyproxy"
    )
    expected = (env or os.environ).get(EXPECT_COMPILED)
    if expected is not None:  # set by tests/test_compiled_build.py for the tests it reruns
        # One `listening` event per worker already up (with `--workers`, more than one).
        events = [json.loads(line) for line in process.stderr.splitlines() if '"listening"' in line]
        if not events or any(event["compiled"] != (expected == "1") for event in events):
            process.stop()
            raise AssertionError(f"keyproxy started {'not ' * (expected == '1')}compiled")
    return Keyproxy(process, path, config)


def error_of(body: bytes) -> str:
    return json.loads(body)["error"]


def read_log(path: Path, count: int, timeout: float = 5.0) -> list[dict]:
    """Wait (bounded) until `count` lines have been flushed, then parse them all."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.1)
