"""Seeing it run: /metrics and the access log, through real keyproxy processes."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from keyproxy.observe import BUCKETS, Metrics, _query_names, _referer_origin, merge
from tests.procs import free_port, spawn
from tests.proxy_process import KEYS, Keyproxy, base_config, digest, read_log, start_keyproxy

LIMITED = "pk_" + "7" * 64
UNKNOWN = "pk_" + "9" * 64


def scrape(kp: Keyproxy) -> str:
    conn = http.client.HTTPConnection(kp.admin_host, kp.admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("content-type", "").startswith("text/plain")
        return resp.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, by name and sorted labels, read with prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def by_name(found: dict, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in found.items() if n == name}


def answer(kp: Keyproxy, method: str, path: str, key: str | None = None, **headers: str):
    status, h, body, _ = kp.request(method, path, headers=headers or None, key=key)
    error = json.loads(body)["error"] if status >= 400 and body else None
    return status, h, error


def config_for(upstream, tmp_path: Path, **extra) -> dict:
    config = base_config(upstream.url, upstream.inject())
    config["keys"].append(
        {"id": "limited", "hash": digest(LIMITED), "type": "read", "rate_limit": "2/minute"}
    )
    config["server"]["credential_sources"] = ["header", "basic", "query"]
    config["log"] = {"access": str(tmp_path / "access.log")}
    config.update(extra)
    return config


def test_metrics_count_a_mix_of_requests_exactly(upstream, tmp_path, make):
    kp = make(config_for(upstream, tmp_path))
    expected: Counter = Counter()
    denials: Counter = Counter()
    plan = [
        ("reader", KEYS["reader"], "GET", "/v1/data/posts", "GET /v1/data/{table}"),
        ("reader", KEYS["reader"], "GET", "/v1/data/posts", "GET /v1/data/{table}"),
        ("reader", KEYS["reader"], "GET", "/v1/data/posts/7", "GET /v1/data/{table}/{id}"),
        ("reader", KEYS["reader"], "DELETE", "/v1/data/posts/7", "DELETE /v1/data/{table}/{id}"),
        ("-", UNKNOWN, "GET", "/v1/data/posts", "-"),
        ("-", None, "GET", "/v1/data/posts", "-"),
        ("-", UNKNOWN, "PURGE", "/v1/data/posts", "-"),  # a method no route may name
        ("-", KEYS["revoked"], "GET", "/v1/data/posts", None),  # refused at step 1, no key id
        ("limited", LIMITED, "GET", "/echo/a", "GET|HEAD|OPTIONS /echo/**"),
        ("limited", LIMITED, "GET", "/echo/a", "GET|HEAD|OPTIONS /echo/**"),
        ("limited", LIMITED, "GET", "/echo/a", "GET|HEAD|OPTIONS /echo/**"),
    ]
    for label, key, method, path, route in plan:
        status, _, error = answer(kp, method, path, key)
        decision = "deny" if error else "allow"
        if route is None:  # refused before routing, by a known key
            route = "-"
            assert error is not None
        labelled = method if method in ("GET", "DELETE") else "OTHER"
        expected[(label, route, labelled, str(status), decision)] += 1
        if error:
            denials[error] += 1
    assert denials["RATE_LIMITED"] == 1, denials  # the third request of a 2/minute key
    found = samples(scrape(kp))
    requests = by_name(found, "keyproxy_requests_total")
    got = {
        tuple(dict(labels)[n] for n in ("key", "route", "method", "status", "decision")): v
        for labels, v in requests.items()
    }
    assert got == dict(expected)
    reasons = by_name(found, "keyproxy_denials_total")
    assert {dict(lb)["reason"]: v for lb, v in reasons.items()} == dict(denials)
    assert found[("keyproxy_rate_limited_total", ())] == 1
    assert found[("keyproxy_request_duration_seconds_count", ())] == len(plan)
    forwarded = sum(v for k, v in expected.items() if k[4] == "allow")
    assert forwarded == 5  # three reads by `reader`, two by `limited`
    assert found[("keyproxy_upstream_duration_seconds_count", ())] == forwarded
    buckets = by_name(found, "keyproxy_request_duration_seconds_bucket")
    assert {dict(lb)["le"] for lb in buckets} == {*(repr(b) for b in BUCKETS), "+Inf"}
    keys = {dict(lb)["state"]: v for lb, v in by_name(found, "keyproxy_keys").items()}
    assert keys == {"active": 5, "expired": 1, "revoked": 1, "report": 0}
    reloads = by_name(found, "keyproxy_config_reloads_total")
    assert {dict(lb)["result"]: v for lb, v in reloads.items()} == {"success": 0, "error": 0}
    # The other families are exposed before anything feeds them.
    names = {family.name for family in text_string_to_metric_families(scrape(kp))}
    assert {
        "keyproxy_cache_requests",
        "keyproxy_would_deny",
        "keyproxy_jwks_refreshes",
    } <= names


def test_a_thousand_unknown_keys_add_no_series_and_per_key_bounds_labels(upstream, tmp_path, make):
    config = config_for(upstream, tmp_path, metrics={"per_key": 1})
    kp = make(config)
    assert answer(kp, "GET", "/v1/data/posts", "pk_" + "a" * 64)[0] == 401
    assert answer(kp, "GET", "/v1/data/posts", KEYS["reader"])[0] == 200
    assert answer(kp, "GET", "/v1/data/posts", KEYS["admin"])[0] == 200  # second id: "_other"
    before = samples(scrape(kp))
    conn = http.client.HTTPConnection(kp.host, kp.port, timeout=10)
    try:
        for i in range(1000):
            conn.request("GET", "/v1/data/posts", headers={"X-API-Key": f"pk_{i:064x}"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 401
    finally:
        conn.close()
    after = samples(scrape(kp))
    assert set(after) == set(before)
    requests = by_name(after, "keyproxy_requests_total")
    assert {dict(lb)["key"] for lb in requests} == {"-", "reader", "_other"}
    unknown = [v for lb, v in requests.items() if dict(lb)["key"] == "-"]
    assert unknown == [1001]
    text = scrape(kp)
    assert "pk_" not in text and "sk_" not in text


def test_access_log_has_every_field_and_no_secret_from_any_credential_source(
    upstream, tmp_path, make
):
    kp = make(config_for(upstream, tmp_path))
    basic = base64.b64encode(f"reader:{KEYS['reader']}".encode()).decode()
    statuses = [
        answer(kp, "GET", "/echo/h?q=hidden-value&x=other-value", KEYS["reader"])[0],
        kp.request("GET", "/echo/b?token=v4lue", {"Authorization": f"Basic {basic}"})[0],
        kp.request("GET", f"/echo/q?api_key={KEYS['reader']}&page=2")[0],
        answer(
            kp,
            "GET",
            "/v1/data/posts",
            KEYS["admin"],
            Referer="https://user:pw@app.example.com/page?session=s3cret",
        )[0],
        answer(kp, "DELETE", "/v1/data/posts/1", KEYS["reader"])[0],
        answer(kp, "GET", "/v1/data/x", UNKNOWN)[0],
    ]
    assert statuses == [200, 200, 200, 200, 403, 401]
    log_path = tmp_path / "access.log"
    lines = read_log(log_path, len(statuses))
    assert len(lines) == len(statuses)
    fields = {
        "time", "request_id", "key", "user", "client_ip", "method", "path", "route",
        "decision", "reason", "status", "bytes", "upstream_ms", "total_ms",
        "referer_origin", "credential_source", "query_names", "roles", "user_roles",
        "key_hash",
    }  # fmt: skip
    for line in lines:
        assert set(line) == fields
        assert line["client_ip"] == "127.0.0.1"
        assert line["bytes"] > 0 and line["total_ms"] >= 0
        assert line["time"].endswith("Z")
    header, basic_line, query, referer, refused, unknown = lines
    assert (header["key"], header["credential_source"], header["decision"]) == (
        "reader",
        "header",
        "allow",
    )
    assert header["query_names"] == ["q", "x"] and header["path"] == "/echo/h"
    assert header["route"] == "GET|HEAD|OPTIONS /echo/**" and header["upstream_ms"] > 0
    assert basic_line["credential_source"] == "basic" and basic_line["key"] == "reader"
    assert query["credential_source"] == "query" and query["query_names"] == ["api_key", "page"]
    assert referer["referer_origin"] == "https://app.example.com" and referer["key"] == "admin"
    assert (refused["decision"], refused["status"], refused["upstream_ms"]) == ("deny", 403, None)
    assert refused["reason"] and refused["key"] == "reader"
    assert (unknown["key"], unknown["reason"], unknown["status"]) == (None, "INVALID_TOKEN", 401)
    assert len({line["request_id"] for line in lines}) == len(lines)
    raw = log_path.read_text()
    secrets = [*KEYS.values(), UNKNOWN, basic, "hidden-value", "other-value", "v4lue", "s3cret"]
    for secret in [*secrets, *upstream.secrets, "pw@", "user:"]:
        assert secret not in raw, secret


def test_durations_are_measured_below_a_millisecond(upstream, tmp_path, make):
    """A loopback answer takes a fraction of a millisecond: its durations must say how
    much, not round to whole milliseconds (the event loop's clock ticks per millisecond,
    which put 0 or 1 ms into the log and every such request into two histogram buckets)."""
    kp = make(config_for(upstream, tmp_path))
    count = 20
    for i in range(count):
        assert answer(kp, "GET", f"/echo/{i}", KEYS["reader"])[0] == 200
    lines = read_log(tmp_path / "access.log", count)
    assert len(lines) == count
    for name in ("upstream_ms", "total_ms"):
        values = [line[name] for line in lines]
        assert all(v > 0 for v in values), (name, values)
        # µs are written: twenty whole milliseconds by chance would be a one in 10^60 event.
        assert any(v != int(v) for v in values), (name, values)
    found = samples(scrape(kp))
    for family in ("keyproxy_request_duration_seconds", "keyproxy_upstream_duration_seconds"):
        total = sum(by_name(found, family + "_sum").values())
        assert total > 0 and round(total * 1000, 6) != round(total * 1000), (family, total)


def test_access_log_defaults_to_stdout_and_reopens_on_sigusr1(upstream, tmp_path, make):
    config = config_for(upstream, tmp_path)
    del config["log"]
    kp = make(config)
    answer(kp, "GET", "/echo/a", KEYS["reader"])
    kp.process.wait_for_line(r'"request_id"', stream="stdout")
    line = json.loads(kp.process.stdout.splitlines()[-1])
    assert line["key"] == "reader"

    kp2 = make(config_for(upstream, tmp_path))
    log_path = tmp_path / "access.log"
    answer(kp2, "GET", "/echo/1", KEYS["reader"])
    assert len(read_log(log_path, 1)) == 1
    rotated = tmp_path / "access.log.1"
    log_path.rename(rotated)  # what logrotate does, then it signals
    kp2.process.send_signal(signal.SIGUSR1)
    time.sleep(0.2)
    answer(kp2, "GET", "/echo/2", KEYS["reader"])
    assert [line["path"] for line in read_log(log_path, 1)] == ["/echo/2"]
    assert [line["path"] for line in read_log(rotated, 1)] == ["/echo/1"]


def test_access_log_lines_still_queued_are_written_at_shutdown(upstream, tmp_path):
    kp = start_keyproxy(tmp_path, config_for(upstream, tmp_path))
    try:
        for i in range(20):
            assert answer(kp, "GET", f"/echo/{i}", KEYS["reader"])[0] == 200
    finally:
        assert kp.stop() == 0  # at once: well within the half-second flush interval
    lines = read_log(tmp_path / "access.log", 20, timeout=0)
    assert [line["path"] for line in lines] == [f"/echo/{i}" for i in range(20)]


def test_a_reload_moves_the_access_log(upstream, tmp_path, make):
    kp = make(config_for(upstream, tmp_path))
    answer(kp, "GET", "/echo/before", KEYS["reader"])
    moved = tmp_path / "moved.log"
    kp.rewrite_config(dict(kp.config, log={"access": str(moved)}))
    deadline = time.monotonic() + 8
    while '"result":"success"' not in kp.process.stderr and time.monotonic() < deadline:
        time.sleep(0.1)
    answer(kp, "GET", "/echo/after", KEYS["reader"])
    assert [line["path"] for line in read_log(moved, 1)] == ["/echo/after"]
    assert [line["path"] for line in read_log(tmp_path / "access.log", 1)] == ["/echo/before"]


def test_two_workers_are_summed_in_one_scrape(upstream, tmp_path, make):
    config = config_for(upstream, tmp_path)
    kp = make(config, extra_args=["--workers", "2"])
    deadline = time.monotonic() + 10
    while kp.process.stderr.count('"event":"listening"') < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # the first worker's line made `make` return; wait for the second
    assert kp.process.stderr.count('"event":"listening"') == 2, kp.process.describe()
    prefixes = set()
    for _ in range(40):  # a new connection each: the kernel spreads them over both workers
        status, headers, _ = answer(kp, "GET", "/echo/w", KEYS["reader"])
        assert status == 200
        prefixes.add(headers["x-request-id"][:12])  # each process has its own id prefix
    assert len(prefixes) == 2, "both workers answered"
    deadline = time.monotonic() + 5
    while True:  # a worker's snapshot is at most a second old
        total = sum(by_name(samples(scrape(kp)), "keyproxy_requests_total").values())
        if total == 40 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert total == 40


def test_real_prometheus_scrapes_the_admin_listener(upstream, tmp_path, make):
    prometheus = shutil.which("prometheus")
    assert prometheus, "Debian's prometheus is needed (.ci/run installs it)"
    kp = make(config_for(upstream, tmp_path))
    answer(kp, "GET", "/echo/p", KEYS["reader"])
    web = free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: keyproxy\n"
        f"    static_configs: [{{targets: ['{kp.admin_host}:{kp.admin_port}']}}]\n"
    )
    argv = [
        prometheus,
        f"--config.file={conf}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{web}",
    ]
    process, _ = spawn(argv, ready="Server is ready", ready_stream="stderr", name="prometheus")
    try:

        def query(expr: str) -> list:
            conn = http.client.HTTPConnection("127.0.0.1", web, timeout=5)
            try:
                conn.request("GET", "/api/v1/query?query=" + expr)
                return json.loads(conn.getresponse().read())["data"]["result"]
            finally:
                conn.close()

        deadline = time.monotonic() + 20
        up = requests = []
        while time.monotonic() < deadline:
            up = query("up")
            requests = query("keyproxy_requests_total")
            if up and up[0]["value"][1] == "1" and requests:
                break
            time.sleep(0.5)
        assert up and up[0]["value"][1] == "1", process.describe()
        assert requests and requests[0]["metric"]["key"] == "reader"
    finally:
        process.stop()


# -- the pure parts -------------------------------------------------------------


def test_key_labels_first_n_then_other():
    m = Metrics(per_key=2)
    assert [m.key_label(k) for k in ("a", "b", "c", "a", None)] == ["a", "b", "_other", "a", "-"]


def test_referer_origin_and_query_names_hold_no_values():
    assert _referer_origin("https://u:p@Site.example:8443/x?k=v#f") == "https://site.example:8443"
    assert _referer_origin("not a url") is None
    # a value-less item ("b") is never logged: it may be a key pasted into the URL
    assert _query_names("a=1&b&&api_key=sk_x") == ["a", "api_key"]


def test_query_names_never_log_what_could_be_a_credential():
    pasted = "pk_" + "1" * 64
    assert _query_names(pasted) is None
    assert _query_names(f"{pasted}=1&page=2") == ["page"]
    assert _query_names("sk_short=1&b=") == ["b"]
    assert _query_names("x" * 64 + "=1&" + "y" * 65 + "=1") == ["x" * 64]


def test_access_log_drops_a_key_pasted_as_a_value_less_query_item(upstream, tmp_path, make):
    kp = make(config_for(upstream, tmp_path))
    pasted = "pk_" + "7" * 64
    assert answer(kp, "GET", f"/echo/p?{pasted}&page=2", KEYS["reader"])[0] == 200
    assert answer(kp, "GET", f"/echo/p?{'n' * 100}=v", KEYS["reader"])[0] == 200
    first, second = read_log(tmp_path / "access.log", 2)
    assert first["query_names"] == ["page"] and second["query_names"] is None
    text = (tmp_path / "access.log").read_text()
    assert "7" * 16 not in text and "n" * 65 not in text


def test_merge_sums_workers():
    a, b = Metrics(), Metrics()
    a.requests[("k", "r", "GET", 200, "allow")] = 2
    b.requests[("k", "r", "GET", 200, "allow")] = 3
    b.cache("hit")
    a.request_buckets[0] = 1
    total = merge([a.snapshot(), json.loads(json.dumps(b.snapshot()))])
    assert total["requests"] == {("k", "r", "GET", "200", "allow"): 5}
    assert total["cache"] == {"hit": 1}
    assert total["request_buckets"][0] == 1


def raw_exchange(kp: Keyproxy, data: bytes) -> bytes:
    """Send raw bytes, read until keyproxy closes: for heads no HTTP client would send."""
    import socket

    with socket.create_connection((kp.host, kp.port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_requests_refused_before_they_parse_are_counted_and_logged(upstream, tmp_path, make):
    config = config_for(upstream, tmp_path)
    config["server"]["max_header_size"] = "2KiB"
    kp = make(config)
    too_large = b"GET /v1/data/posts HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4096 + b"\r\n\r\n"
    assert raw_exchange(kp, too_large).startswith(b"HTTP/1.1 431 ")
    assert raw_exchange(kp, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n").startswith(
        b"HTTP/1.1 400 "
    )
    found = samples(scrape(kp))
    reasons = {dict(lb)["reason"]: v for lb, v in by_name(found, "keyproxy_denials_total").items()}
    assert reasons == {"HEADERS_TOO_LARGE": 1, "BAD_REQUEST": 1}
    assert found[("keyproxy_request_duration_seconds_count", ())] == 2
    lines = read_log(tmp_path / "access.log", 2)
    assert sorted((line["status"], line["reason"], line["decision"]) for line in lines) == [
        (400, "BAD_REQUEST", "deny"),
        (431, "HEADERS_TOO_LARGE", "deny"),
    ]
    assert {line["method"] for line in lines} == {"GET"}


def test_admin_listen_off_loopback_logs_a_warning_at_start(upstream, tmp_path, make):
    from keyproxy.observe import admin_exposure

    assert admin_exposure("127.0.0.1") is None and admin_exposure("::1") is None
    assert admin_exposure("localhost") is None
    assert "not loopback" in (admin_exposure("0.0.0.0") or "")
    assert "not loopback" in (admin_exposure("admin.internal") or "")
    config = config_for(upstream, tmp_path)
    config["server"]["admin_listen"] = f"0.0.0.0:{free_port()}"
    kp = make(config)
    kp.process.wait_for_line(r'"event":"warning".*admin_listen', stream="stderr")
    quiet = make(config_for(upstream, tmp_path))
    assert answer(quiet, "GET", "/echo/a", KEYS["reader"])[0] == 200
    assert "admin_listen" not in quiet.process.stderr


def test_a_verdict_is_serialised_by_the_writer_once_and_in_the_documented_order():
    """The loop only keeps a verdict's fields: with the access log off nothing is turned
    into JSON, and with it on the writer does it once per verdict, whatever its repeats."""
    import orjson

    from keyproxy.config.model import Key, KeyType
    from keyproxy.observe import describe_verdict, lines

    key = Key(id="reader", digest=bytes(range(32)), type=KeyType.READ, acls=frozenset())
    verdict = describe_verdict(
        "reader", key, "alice", "10.0.0.7", "PROPFIND", "/v1/é", "GET /v1/{x}", "would_deny",
        "RATE_LIMITED", "https://u:p@App.example/p?s=1", "basic", "a=1&b&page=2",
        ("editor",), ("auditor",),
    )  # fmt: skip
    assert verdict.labels == ("reader", "GET /v1/{x}", "OTHER")
    assert verdict.head is None  # nothing serialised on the loop
    records = [
        (1_800_000_000.25, "r1", 200, 12, 0.0015, 0.002, verdict),
        (1_800_000_001.5, "r2", 429, 0, None, 0.0004, verdict),
    ]
    text = lines(records)
    head = verdict.head
    assert head is not None
    expected = b"".join(
        orjson.dumps(
            {
                "time": time_text, "request_id": rid, "key": "reader", "user": "alice",
                "client_ip": "10.0.0.7", "method": "PROPFIND", "path": "/v1/é",
                "route": "GET /v1/{x}", "decision": "would_deny", "reason": "RATE_LIMITED",
                "status": status, "bytes": sent, "upstream_ms": up, "total_ms": total,
                "referer_origin": "https://app.example", "credential_source": "basic",
                "query_names": ["a", "page"], "roles": ["editor"], "user_roles": ["auditor"],
                "key_hash": "sha256:00010203",
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
        for time_text, rid, status, sent, up, total in [
            ("2027-01-15T08:00:00.250Z", "r1", 200, 12, 1.5, 2.0),
            ("2027-01-15T08:00:01.500Z", "r2", 429, 0, None, 0.4),
        ]
    )  # fmt: skip
    assert text == expected
    lines(records)
    assert verdict.head is head  # the second flush reuses the first's JSON


def test_a_large_flush_is_written_in_slices_as_one_block_in_order(tmp_path) -> None:
    """The writer pauses between slices of a big flush (so the event loop gets the CPU);
    the file still gets every line once, in order, exactly as one serialisation."""
    import orjson

    from keyproxy.config.model import Key, KeyType
    from keyproxy.observe import LINES_PER_SLICE, AccessLog, describe_verdict, lines

    key = Key(id="reader", digest=bytes(range(32)), type=KeyType.READ, acls=frozenset())
    verdict = describe_verdict(
        "reader", key, None, "10.0.0.7", "GET", "/v1/x", None, "allow", None, None,
        "header", None, (), None,
    )  # fmt: skip
    count = LINES_PER_SLICE * 3 + 5  # three whole slices and a part
    records = [
        (1_800_000_000 + i / 100, f"r{i}", 200, i, 0.001, 0.002, verdict) for i in range(count)
    ]
    log = AccessLog(str(tmp_path / "access.log"))
    log._write_records(records)
    written = (tmp_path / "access.log").read_bytes()
    assert written == lines(records)
    assert [orjson.loads(line)["request_id"] for line in written.splitlines()] == [
        f"r{i}" for i in range(count)
    ]
    log.close()


def test_repeats_of_a_remembered_verdict_each_log_their_own_client_and_referer(
    upstream, tmp_path, make
):
    """The decision memo shares a verdict's log fields between repeats: what differs
    between two requests (Referer, X-Forwarded-For behind trusted proxies, the
    credential's form) must still show in each one's line, before and after a reload."""
    config = config_for(upstream, tmp_path)
    config["server"]["trusted_proxies"] = ["127.0.0.0/8"]
    kp = make(config)
    basic = base64.b64encode(f"reader:{KEYS['reader']}".encode()).decode()
    by_header = ("X-API-Key", KEYS["reader"])
    sent = [
        (("Referer", "https://a.example/x"), "10.0.0.1", "https://a.example", "header"),
        (("Referer", "https://b.example/y"), "10.0.0.1", "https://b.example", "header"),
        (("Referer", "https://a.example/x"), "10.0.0.2", "https://a.example", "header"),
        (("Referer", "https://a.example/x"), "10.0.0.1", "https://a.example", "header"),
        (("Authorization", f"Basic {basic}"), "10.0.0.1", None, "basic"),
    ]

    def round_of(expect_forwarded: bool) -> list[tuple]:
        for header, xff, _, source in sent:
            credential = [by_header] if source == "header" else []
            headers = [*credential, header, ("X-Forwarded-For", xff)]
            assert kp.request("GET", "/echo/same", headers)[0] == 200
        return [
            (xff if expect_forwarded else "127.0.0.1", origin, source)
            for _, xff, origin, source in sent
        ]

    expected = round_of(True) + round_of(True)
    moved = dict(kp.config, server=dict(kp.config["server"]))
    del moved["server"]["trusted_proxies"]
    kp.rewrite_config(moved)
    kp.process.wait_for_line(r'"config_reload".*"success"', stream="stderr")
    expected += round_of(False) + round_of(False)
    found = read_log(tmp_path / "access.log", len(expected))
    assert [
        (line["client_ip"], line["referer_origin"], line["credential_source"]) for line in found
    ] == expected


def test_a_string_orjson_cannot_write_costs_neither_its_line_nor_the_batch():
    """Python strings may hold lone surrogates, which orjson refuses: such a verdict is
    written with them escaped, and the lines queued with it are all written."""
    import orjson

    from keyproxy.observe import describe_verdict, lines

    def verdict(user: str, roles: tuple[str, ...]):
        return describe_verdict(
            "-", None, user, "10.0.0.7", "GET", "/v1/x", None, "allow", None, None, None,
            None, roles, None,
        )  # fmt: skip

    records = [
        (1_800_000_000.0, f"r{i}", 200, 1, None, 0.001, v)
        for i, v in enumerate(
            [verdict("alice", ()), verdict("a\ud800b", ("r\udfff",)), verdict("bob", ())]
        )
    ]
    parsed = [orjson.loads(line) for line in lines(records).splitlines()]
    assert [p["request_id"] for p in parsed] == ["r0", "r1", "r2"]
    assert [p["user"] for p in parsed] == ["alice", "a\\ud800b", "bob"]
    assert parsed[1]["roles"] == ["r\\udfff"]


@settings(max_examples=300, deadline=None)
@given(
    when=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    status=st.integers(min_value=0, max_value=999),
    sent=st.integers(min_value=0, max_value=1 << 62),
    upstream_s=st.none() | st.floats(min_value=0, max_value=1e7, allow_nan=False),
    total_s=st.floats(min_value=0, max_value=1e7, allow_nan=False),
)
def test_a_line_is_byte_for_byte_what_orjson_writes_for_its_figures(
    when: float, status: int, sent: int, upstream_s: float | None, total_s: float
) -> None:
    """The figures are formatted directly; the line must be the one orjson would write."""
    import orjson

    from keyproxy.observe import describe_verdict, lines

    verdict = describe_verdict(
        "-", None, None, "10.0.0.7", "GET", "/v1/x", None, "allow", None, None, None,
        None, None, None,
    )  # fmt: skip
    line = lines([(when, "0a1b2c3d4e5f00000001", status, sent, upstream_s, total_s, verdict)])
    whole = int(when)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    expected = orjson.dumps(
        {
            "time": f"{stamp}.{int((when - whole) * 1000):03d}Z",
            "request_id": "0a1b2c3d4e5f00000001",
            "key": None, "user": None, "client_ip": "10.0.0.7", "method": "GET",
            "path": "/v1/x", "route": None, "decision": "allow", "reason": None,
            "status": status, "bytes": sent,
            "upstream_ms": None if upstream_s is None else int(upstream_s * 1e6) / 1000,
            "total_ms": int(total_s * 1e6) / 1000,
            "referer_origin": None, "credential_source": None, "query_names": None,
            "roles": None, "user_roles": None, "key_hash": None,
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )  # fmt: skip
    assert line == expected
