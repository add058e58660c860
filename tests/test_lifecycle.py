"""Reloads, draining, workers and the demo, through real processes."""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from keyproxy.commands.demo import DEMO_KEYS, DEMO_REFERER
from tests.procs import free_port, start_demo
from tests.proxy_process import KEYS, base_config, digest, start_keyproxy


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def test_edit_takes_effect_within_two_seconds_and_bad_edit_keeps_last_good(tmp_path, upstream):
    config = base_config(upstream.url, upstream.inject())
    kp = start_keyproxy(tmp_path, config)
    try:
        new_key = "pk_" + "a" * 64
        assert kp.request("GET", "/echo/x", key=new_key)[0] == 401
        edited = copy.deepcopy(config)
        edited["keys"].append({"id": "new", "hash": digest(new_key), "type": "read"})
        edited["keys"][0]["revoked"] = True  # and revoke 'reader'
        kp.rewrite_config(edited)
        started = time.monotonic()
        assert wait_until(lambda: kp.request("GET", "/echo/x", key=new_key)[0] == 200, 2.0)
        assert time.monotonic() - started <= 2.0
        assert kp.request("GET", "/echo/x", key=KEYS["reader"])[0] == 401

        broken = copy.deepcopy(edited)
        broken["keys"].append({"id": "typo", "hash": digest("x" * 20), "type": "raed"})
        broken["keys"][-2]["revoked"] = True  # would revoke 'new' if it were applied
        kp.rewrite_config(broken)
        assert wait_until(lambda: '"result":"error"' in kp.process.stderr, 3.0)
        assert kp.request("GET", "/echo/x", key=new_key)[0] == 200  # last good still in force
        _status, ready = kp.admin("/readyz")
        assert ready["reloads"]["error"] >= 1 and "raed" in ready["last_reload_error"]
    finally:
        kp.stop()


def test_sighup_reloads(tmp_path, upstream):
    config = base_config(upstream.url, upstream.inject())
    kp = start_keyproxy(tmp_path, config)
    try:
        edited = copy.deepcopy(config)
        edited["keys"][0]["revoked"] = True
        kp.config_path.write_text(json.dumps(edited))  # JSON is YAML; same mtime risk is fine
        kp.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: kp.request("GET", "/echo/x", key=KEYS["reader"])[0] == 401, 2.0)
    finally:
        kp.stop()


def test_sigterm_drains_in_flight_requests(tmp_path, upstream):
    kp = start_keyproxy(tmp_path, base_config(upstream.url, upstream.inject()))
    result: dict = {}

    def slow_request() -> None:
        result["response"] = kp.request("GET", "/slow/800", key=KEYS["reader"])

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)
    kp.process.send_signal(signal.SIGTERM)
    thread.join(10)
    assert kp.process.wait(10) == 0
    status, headers, _, _ = result["response"]
    assert status == 200
    assert headers.get("connection") == "close"
    assert '"event":"stopped"' in kp.process.stderr


def test_serve_refuses_a_bad_config_with_its_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("server: {listen: nowhere}\n")
    from tests.procs import Process

    proc = Process([sys.executable, "-m", "keyproxy", "serve", "-c", str(path)])
    assert proc.wait(30) == 1
    assert "bad.yaml:1" in proc.stderr


def test_workers_share_one_port(tmp_path, upstream):
    config = base_config(upstream.url, upstream.inject())
    kp = start_keyproxy(tmp_path, config, extra_args=["--workers", "2"])
    try:
        # both workers announce themselves; the first announcement made spawn() return
        kp.process.wait_for_line(r'"event":"listening"(?:.|\n)*', stream="stderr")
        assert wait_until(lambda: kp.process.stderr.count('"event":"listening"') == 2, 10)
        pids = set(re.findall(r'"pid":(\d+)', kp.process.stderr))
        assert len(pids) == 2
        for _ in range(20):
            assert kp.request("GET", "/echo/w", key=KEYS["reader"])[0] == 200
    finally:
        assert kp.stop() == 0


def test_demo_prints_working_curl_lines(tmp_path):
    port = free_port()
    with start_demo(port) as proc:
        out = proc.stdout
        assert DEMO_KEYS["website"] in out and DEMO_KEYS["admin"] in out
        assert f"http://127.0.0.1:{port}/v1/data/posts" in out

        def call(method: str, path: str, key: str, referer: str | None = None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            headers = {"X-API-Key": key}
            if referer:
                headers["Referer"] = referer
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()

        status, body = call("GET", "/v1/data/posts", DEMO_KEYS["website"], DEMO_REFERER)
        assert status == 200 and isinstance(json.loads(body), list)
        # the browser key's answers hide author.phone; the admin's keep it
        assert b"author" in body and b"phone" not in body
        status, body = call("GET", "/v1/data/posts/1", DEMO_KEYS["website"], DEMO_REFERER)
        assert status == 200 and b"phone" not in body and json.loads(body)["id"] == 1
        status, body = call("GET", "/v1/data/posts/1", DEMO_KEYS["admin"])
        assert status == 200 and b"phone" in body
        # the printed page URL serves the browser demo, and keyproxy answers its preflight
        page = re.search(r"open (http://127\.0\.0\.1:(\d+)/)", out)
        assert page is not None, out
        with urllib.request.urlopen(page.group(1), timeout=5) as answer:
            html = answer.read().decode()
        assert DEMO_KEYS["website"] in html and f"http://127.0.0.1:{port}/v1/data/posts" in html
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        origin = f"http://127.0.0.1:{page.group(2)}"
        conn.request(
            "OPTIONS",
            "/v1/data/posts",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "x-api-key, x-demo-client",
            },
        )
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 204 and resp.getheader("Access-Control-Allow-Origin") == origin
        conn.close()
        status, body = call("DELETE", "/v1/data/posts/1", DEMO_KEYS["website"], DEMO_REFERER)
        assert status == 403 and json.loads(body)["error"] == "PERMISSION_DENIED"
        status, body = call("GET", "/v1/data/posts", DEMO_KEYS["website"])
        assert status == 403 and json.loads(body)["error"] == "REFERER_NOT_ALLOWED"
        status, _ = call("DELETE", "/v1/data/posts/1", DEMO_KEYS["admin"])
        assert status == 204
        # the logged-in user's lines: bob creates a post (owned by bob whatever the body
        # says) and is refused deleting alice's post 3
        token = re.search(r"Authorization: Bearer ([A-Za-z0-9_.-]+)'", out)
        assert token is not None, out
        user = {"X-API-Key": DEMO_KEYS["app"], "Authorization": f"Bearer {token.group(1)}"}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/data/posts", b'{"title": "t", "createdBy": "alice"}', user)
        resp = conn.getresponse()
        assert resp.status == 201 and json.loads(resp.read())["createdBy"] == "bob"
        conn.request("DELETE", "/v1/data/posts/3", headers=user)
        resp = conn.getresponse()
        assert resp.status == 403 and json.loads(resp.read())["error"] == "PERMISSION_DENIED"
        conn.close()
        # the printed explain line works as pasted (with this interpreter for "python")
        line = re.search(r"UPSTREAM_SECRET=x (.+?) \\\n\s+(.+)\n", out)
        assert line is not None, out
        argv = shlex.split(line.group(1) + " " + line.group(2))
        if argv[0] == "python":
            argv[0] = sys.executable
        explained = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "UPSTREAM_SECRET": "x"},
        )
        assert explained.returncode == 1, explained.stdout + explained.stderr
        assert "verdict: DENY 403 PERMISSION_DENIED" in explained.stdout
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


@pytest.mark.parametrize("trusted", [0, 1, "other"])
def test_x_forwarded_for_is_built_from_trust(tmp_path, upstream, trusted):
    """The chain a client sends is kept only when the peer (127.0.0.1) is a trusted proxy."""
    config = base_config(upstream.url, upstream.inject())
    config["server"]["trusted_proxies"] = {0: 0, 1: ["127.0.0.0/8"], "other": ["10.0.0.0/8"]}[
        trusted
    ]
    kp = start_keyproxy(tmp_path, config)
    try:
        upstream.reset()
        sent = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
        kp.request("GET", "/echo/xff", sent, key=KEYS["reader"])
        record = upstream.records()[-1]
        xff = [v for n, v in record["headers"] if n.lower() == "x-forwarded-for"]
        proto = [v for n, v in record["headers"] if n.lower() == "x-forwarded-proto"]
        assert xff == (["203.0.113.9, 127.0.0.1"] if trusted == 1 else ["127.0.0.1"])
        assert proto == (["https"] if trusted == 1 else ["http"])
    finally:
        kp.stop()


def test_serve_host_and_port_flags_override_the_config(tmp_path, upstream):
    config = base_config(upstream.url, upstream.inject())
    port = free_port()
    kp = start_keyproxy(tmp_path, config, extra_args=["--host", "127.0.0.2", "--port", str(port)])
    try:
        assert f'"url":"http://127.0.0.2:{port}"' in kp.process.stderr.replace(" ", "")
        kp.host, kp.port = "127.0.0.2", port
        assert kp.request("GET", "/echo/flags", key=KEYS["reader"])[0] == 200
    finally:
        kp.stop()
