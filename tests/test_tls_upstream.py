"""HTTPS upstreams end to end: a real `keyproxy serve` in front of a real TLS backend.

The backend's certificate comes from a throwaway CA made at test time (trustme),
the way an internal CA signs a team's backends. What must hold: with `ca_file`
naming that CA, requests travel over verified TLS with the secret injected and
the client's key removed; without it (the system store) or with a certificate
for another host, keyproxy refuses to talk -- the secret is never sent to a peer
it cannot verify -- and answers 502 at once, never a hang or a traceback.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.procs import UpstreamServer, start_upstream
from tests.proxy_process import KEYS, Keyproxy, base_config, error_of, start_keyproxy

SECRET = "tls-upstream-secret-0123456789"


@dataclass(frozen=True)
class Pki:
    ca_file: Path  # the CA, as keyproxy's `upstream.ca_file` names it
    cert: Path  # for 127.0.0.1 and localhost
    key: Path
    other_cert: Path  # same CA, but for another hostname
    other_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))

    def issue(name: str, *hosts: str) -> tuple[Path, Path]:
        leaf = ca.issue_cert(*hosts)
        cert, key = folder / f"{name}.pem", folder / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    cert, key = issue("server", "127.0.0.1", "localhost")
    other_cert, other_key = issue("other", "backend.other.example")
    return Pki(folder / "ca.pem", cert, key, other_cert, other_key)


@pytest.fixture(scope="module")
def tls_upstream(pki: Pki) -> Iterator[UpstreamServer]:
    with start_upstream(
        header_secrets={"X-Upstream-Key": SECRET}, tls_cert=pki.cert, tls_key=pki.key
    ) as server:
        yield server


def tls_config(url: str, upstream: UpstreamServer, ca_file: Path | None) -> dict[str, Any]:
    config = base_config(url, upstream.inject())
    if ca_file is not None:
        config["upstream"]["ca_file"] = str(ca_file)
    return config


@pytest.fixture(scope="module")
def proxy(
    tls_upstream: UpstreamServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keyproxy]:
    config = tls_config(tls_upstream.url, tls_upstream, pki.ca_file)
    kp = start_keyproxy(tmp_path_factory.mktemp("proxy"), config)
    yield kp
    kp.stop()


def header_values(record: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in record["headers"] if n.lower() == name.lower()]


def assert_refused_at_once(kp: Keyproxy, upstream: UpstreamServer) -> None:
    """502 UPSTREAM_UNAVAILABLE well within the timeout, nothing sent, the reason logged."""
    upstream.reset()
    for _ in range(2):  # and the proxy keeps answering
        started = time.monotonic()
        status, headers, body, _ = kp.request("GET", "/echo/secret", key=KEYS["reader"])
        assert time.monotonic() - started < 2.0  # the configured upstream timeout
        assert status == 502, body
        assert headers["content-type"] == "application/json"
        assert error_of(body) == "UPSTREAM_UNAVAILABLE"
        assert SECRET not in body.decode()
    assert upstream.records() == []  # the handshake failed: no request, so no secret, was sent
    assert '"event":"upstream_tls_error"' in kp.process.stderr
    assert "Traceback" not in kp.process.stderr


def test_the_upstream_speaks_only_tls(tls_upstream: UpstreamServer):
    """So every 200 below went over TLS: plain HTTP gets no answer from this port."""
    assert tls_upstream.url.startswith("https://")
    conn = http.client.HTTPConnection(tls_upstream.host, tls_upstream.port, timeout=5)
    try:
        with pytest.raises((http.client.HTTPException, OSError)):
            conn.request("GET", "/echo/plain")
            conn.getresponse().read()
    finally:
        conn.close()


def test_forwarded_over_tls_with_the_secret_injected(proxy: Keyproxy, tls_upstream):
    tls_upstream.reset()
    for _ in range(3):  # the first opens a TLS connection, the others reuse it
        status, _, body, _ = proxy.request("GET", "/echo/hello?x=1", key=KEYS["reader"])
        assert status == 200, body
        assert json.loads(body)["path"] == "/echo/hello"
    records = tls_upstream.records()
    assert len(records) == 3
    for record in records:
        assert record["raw_path"] == "/echo/hello?x=1"
        assert record["authorized"]
        assert header_values(record, "X-Upstream-Key") == [SECRET]
        assert header_values(record, "X-API-Key") == []
        assert header_values(record, "Host") == [f"127.0.0.1:{tls_upstream.port}"]
    assert KEYS["reader"] not in json.dumps(records)


def test_bodies_stream_both_ways_over_tls(proxy: Keyproxy, tls_upstream):
    payload = bytes(range(256)) * 4096  # 1 MiB: many TLS records each way
    status, _, body, _ = proxy.request("POST", "/upload", body=payload, key=KEYS["writer"])
    assert status == 200, body
    assert json.loads(body)["body_sha256"] == hashlib.sha256(payload).hexdigest()
    status, headers, body, _ = proxy.request("GET", "/big/3000000", key=KEYS["reader"])
    assert status == 200 and len(body) == 3_000_000
    assert hashlib.sha256(body).hexdigest() == headers["x-body-sha256"]


def test_redirects_to_the_https_upstream_become_relative(proxy: Keyproxy, tls_upstream):
    status, headers, _, _ = proxy.request("GET", "/redirect", key=KEYS["reader"])
    assert status == 302
    assert headers["location"].startswith("/next")
    assert SECRET not in headers["location"]


def test_a_hostname_url_is_verified_against_that_name(
    tls_upstream: UpstreamServer, pki: Pki, tmp_path: Path
):
    url = f"https://localhost:{tls_upstream.port}"
    kp = start_keyproxy(tmp_path, tls_config(url, tls_upstream, pki.ca_file))
    try:
        status, _, body, _ = kp.request("GET", "/echo/by-name", key=KEYS["reader"])
        assert status == 200, body
        host = header_values(tls_upstream.records()[-1], "Host")
        assert host == [f"localhost:{tls_upstream.port}"]
    finally:
        kp.stop()


def test_the_system_trust_store_does_not_trust_a_private_ca(
    tls_upstream: UpstreamServer, tmp_path: Path
):
    kp = start_keyproxy(tmp_path, tls_config(tls_upstream.url, tls_upstream, None))
    try:
        assert_refused_at_once(kp, tls_upstream)
        assert "unable to get local issuer certificate" in kp.process.stderr
    finally:
        kp.stop()


@pytest.mark.parametrize(
    ("host", "logged"),
    [
        ("127.0.0.1", "IP address mismatch, certificate is not valid for '127.0.0.1'"),
        ("localhost", "Hostname mismatch, certificate is not valid for 'localhost'"),
    ],
)
def test_a_certificate_for_another_host_is_refused(
    pki: Pki, tmp_path: Path, host: str, logged: str
):
    """Signed by the trusted CA, but for backend.other.example: a trusted CA is not enough."""
    with start_upstream(
        header_secrets={"X-Upstream-Key": SECRET}, tls_cert=pki.other_cert, tls_key=pki.other_key
    ) as impostor:
        url = f"https://{host}:{impostor.port}"
        kp = start_keyproxy(tmp_path, tls_config(url, impostor, pki.ca_file))
        try:
            assert_refused_at_once(kp, impostor)
            assert logged in kp.process.stderr
        finally:
            kp.stop()


def test_adding_ca_file_takes_effect_on_reload(
    tls_upstream: UpstreamServer, pki: Pki, tmp_path: Path
):
    kp = start_keyproxy(tmp_path, tls_config(tls_upstream.url, tls_upstream, None))
    try:
        assert kp.request("GET", "/echo/x", key=KEYS["reader"])[0] == 502
        status, ready = kp.admin("/readyz")  # the probe does the verified handshake too
        assert (status, ready["status"]) == (503, "not ready")
        kp.rewrite_config(tls_config(tls_upstream.url, tls_upstream, pki.ca_file))
        # An edit takes effect within about a second (README, Operations); 2 s of slack.
        deadline = time.monotonic() + 2.0
        while kp.request("GET", "/echo/x", key=KEYS["reader"])[0] != 200:
            assert time.monotonic() < deadline, kp.process.stderr
            time.sleep(0.05)
        status, ready = kp.admin("/readyz")
        assert (status, ready["status"]) == (200, "ready")
    finally:
        kp.stop()
