"""The deployment files, run with real processes (there is no container engine here).

docker-compose.yml's own command lines start the demo backend and two keyproxy
replicas against a real Redis; only the host names the compose network would
resolve (backend, redis) and the ports are mapped to loopback. The Dockerfile's
HEALTHCHECK command runs as written against a live admin listener.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from keyproxy.commands.demo import DEMO_KEYS, DEMO_REFERER
from tests.procs import free_port, spawn
from tests.redis_server import start_redis

ROOT = Path(__file__).resolve().parent.parent
SECRET = "compose-upstream-secret-0123456789"


def get(port: int, path: str, key: str, referer: str | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"X-API-Key": key}
        if referer:
            headers["Referer"] = referer
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_compose_replicas_share_redis_in_front_of_the_demo_backend(tmp_path):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    replicas = [s for name, s in services.items() if name.startswith("keyproxy-")]
    assert len(replicas) == 2
    mounts = {v.split(":")[1]: v.split(":")[0] for v in replicas[0]["volumes"]}
    config_text = (ROOT / mounts["/etc/keyproxy/config.yaml"]).read_text()
    backend_port, admin_ports, public_ports = free_port(), [], []
    env = {**os.environ, "UPSTREAM_SECRET": SECRET}

    redis = start_redis()
    processes = []
    try:
        backend_cmd = list(services["backend"]["command"])
        backend_cmd[backend_cmd.index("--port") + 1] = str(backend_port)
        backend_cmd[backend_cmd.index("--host") + 1] = "127.0.0.1"
        backend, _ = spawn(
            [sys.executable, "-m", "keyproxy", *backend_cmd],
            ready=r'"event":"listening"',
            ready_stream="stderr",
            env=env,
            name="demo-backend",
        )
        processes.append(backend)
        for i, replica in enumerate(replicas):
            public, admin = free_port(), free_port()
            public_ports.append(public)
            admin_ports.append(admin)
            text = (
                config_text.replace("backend:3000", f"127.0.0.1:{backend_port}")
                .replace("redis://redis:6379/0", redis.url)
                .replace("0.0.0.0:8080", f"127.0.0.1:{public}")
                .replace("0.0.0.0:9901", f"127.0.0.1:{admin}")
            )
            path = tmp_path / f"replica-{i}.yaml"
            path.write_text(text)
            command = [
                path if arg == "/etc/keyproxy/config.yaml" else arg for arg in replica["command"]
            ]
            assert replica["environment"]["UPSTREAM_SECRET"].startswith("${UPSTREAM_SECRET")
            process, _ = spawn(
                [sys.executable, "-m", "keyproxy", *map(str, command)],
                ready=r'"event":"listening"',
                ready_stream="stderr",
                env=env,
                name=f"keyproxy-{i}",
            )
            processes.append(process)

        remaining = []
        for port in (*public_ports, *public_ports):
            status, headers, body = get(port, "/v1/data/posts", DEMO_KEYS["website"], DEMO_REFERER)
            assert status == 200, body
            assert isinstance(json.loads(body), (list, dict))
            remaining.append(int(headers["x-ratelimit-remaining"]))
        # One bucket in Redis, whichever replica answered.
        assert remaining == [999, 998, 997, 996]
        refused = get(public_ports[1], "/v1/data/posts/1", DEMO_KEYS["website"])[0]
        assert refused == 403  # no referer: the browser key is refused

        # The image's HEALTHCHECK, as written, against each replica's admin listener.
        for admin in admin_ports:
            assert healthcheck(admin).returncode == 0
    finally:
        for process in processes:
            process.stop()
        redis.stop()
    assert healthcheck(admin_ports[0]).returncode == 1  # stopped: unhealthy, no traceback


def healthcheck(admin_port: int) -> subprocess.CompletedProcess:
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(r"^HEALTHCHECK .*\\\n\s+CMD (\[.*\])$", text, re.MULTILINE)
    assert match, "the Dockerfile has a HEALTHCHECK in exec form"
    argv = json.loads(match.group(1))
    assert argv[0] == "python"
    return subprocess.run(
        [sys.executable, *argv[1:]],
        env={**os.environ, "KEYPROXY_ADMIN": f"127.0.0.1:{admin_port}"},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
