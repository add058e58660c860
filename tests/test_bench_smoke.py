"""A seconds-long run of the benchmark harness, so `bench/run.py` never rots.

The harness is only run for real now and then; without this test it would
break silently as keyproxy's CLI and config grow. It checks that every target
starts, answers 200 through the full policy and carries load - never how fast:
timings on a shared CI machine are noise, and a flaky test gets deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOKE_TARGETS = ("direct", "plain", "lean-relay", "keyproxy", "keyproxy-full", "keyproxy-redis")
#: Measured once this build accepts the key's `fields:`; until then reported as unavailable.
OPTIONAL_TARGETS = ("keyproxy-fields",)

pytestmark = pytest.mark.slow


def test_bench_smoke_run_measures_every_target(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        if os.environ.get("CI"):
            pytest.fail("wrk is not installed; CI must install it (apt-get install -y wrk)")
        pytest.skip("wrk is not installed (apt-get install wrk): the benchmark smoke run needs it")
    out = tmp_path / "smoke.md"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--smoke", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,  # a bound against hangs, not a performance assertion
        check=False,
    )
    assert proc.returncode == 0, f"bench/run.py --smoke failed:\n{proc.stderr[-6000:]}"

    report = json.loads(out.with_suffix(".json").read_text())
    results = report["results"]["small"]
    for target in SMOKE_TARGETS:
        assert target in results, f"{target} missing from the report: {sorted(results)}"
        result = results[target]
        assert "error" not in result, f"{target}: {result.get('error')}"
        assert result["rps"] > 0, f"{target} reported no requests per second"
        assert result["errors"] == 0, f"{target} answered errors under load: {result}"
    for target in OPTIONAL_TARGETS:
        assert target in results, f"{target} missing from the report: {sorted(results)}"
        result = results[target]
        if "unavailable" in result:
            assert "not supported yet" in result["unavailable"], result
            continue
        assert "error" not in result, f"{target}: {result.get('error')}"
        assert result["rps"] > 0 and result["errors"] == 0, f"{target}: {result}"
    assert "small body" in out.read_text()


def test_bench_check_refuses_a_wrong_answer(tmp_path: Path) -> None:
    """A target that answers non-2xx, another body, or an unfiltered body where fields
    must be gone is refused before it is loaded: a benchmark of errors is worthless."""
    import importlib
    import json as json_module
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        run = importlib.import_module("run")
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    bodies = run.make_bodies()
    array = bodies["json64k"]
    assert len(array.data) == 64 * 1024
    records = json_module.loads(array.data)
    assert isinstance(records, list) and len(records) > 100
    filtered = run.drop_fields(records, ("author.email", "internal"))
    assert all("internal" not in r and "email" not in r["author"] for r in filtered)
    assert all("name" in r["author"] for r in filtered)

    answers = {  # path -> (status, body) the fake target answers
        bodies["small"].path: (403, b'{"error":"FORBIDDEN"}'),
        bodies["large"].path: (200, bodies["small"].data),
        array.path: (200, array.data),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, data = answers[self.path]
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        env = run.Env(
            tmp=tmp_path, proxy_cpus=None, load_cpus=None, multi_cpus=None, key="k",
            referer="r", secret="s", upstream_port=port, upstream_kind="", upstream_pid=0,
            nginx=None, policy_keys=1, startup_timeout=1.0,
        )  # fmt: skip
        plain = run.Target("t", "", port, 0, "")
        with pytest.raises(run.BenchError, match="answered 403"):
            run.check_target(env, plain, bodies["small"])
        with pytest.raises(run.BenchError, match="answered 200"):
            run.check_target(env, plain, bodies["large"])
        run.check_target(env, plain, array)  # the exact body passes
        fields = run.Target("t", "", port, 0, "", exclude=("author.email", "internal"))
        with pytest.raises(run.BenchError, match=r"not the body without author\.email"):
            run.check_target(env, fields, array)
    finally:
        server.shutdown()
        server.server_close()


def _import_run() -> Any:
    import importlib

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        return importlib.import_module("run")
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))


@pytest.mark.parametrize("prefer", ["python", "auto"])
def test_the_varied_body_differs_on_every_answer_and_the_check_insists(prefer: str) -> None:
    """json64k-varied: 64 KiB exactly, a new counter in every answer (through nginx too,
    when it is the upstream), and a check that refuses a target whose answers repeat."""
    run = _import_run()
    bodies = run.make_bodies()
    # Where bench/run.py keeps its files: nginx's workers (another user) read them there,
    # which pytest's own private directory would not let them.
    with run.scratch_dir(False) as scratch:
        _varied_body_checks(run, bodies, scratch, prefer)


def _varied_body_checks(run: Any, bodies: dict[str, Any], scratch: Path, prefer: str) -> None:
    varied, array = bodies["json64k-varied"], bodies["json64k"]
    assert varied.varies and len(varied.data) == 64 * 1024
    assert json.loads(varied.data)[:-1] == json.loads(array.data)[:-1]
    env = run.Env(
        tmp=scratch, proxy_cpus=None, load_cpus=None, multi_cpus=None, key="k",
        referer="r", secret="s", upstream_port=run.free_port(), upstream_kind="",
        upstream_pid=0, nginx=shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin:/bin"),
        policy_keys=1, startup_timeout=30.0,
    )  # fmt: skip
    # The varied body's path also serves the static bytes on a second upstream: a target
    # in front of it answers the same bytes twice.
    static = run.Body(varied.name, varied.path, varied.data)
    try:
        run.start_upstream(env, bodies, prefer)
        url = f"http://127.0.0.1:{env.upstream_port}{varied.path}"
        answers = [run.http_get(url, {})[1] for _ in range(3)]
        assert len(set(answers)) == 3
        assert all(len(a) == 64 * 1024 and run.unvary(a) == varied.data for a in answers)
        direct = run.Target("direct", "", env.upstream_port, 0, "")
        run.check_target(env, direct, varied)
        run.check_target(env, direct, array)
        fields = run.Target("f", "", env.upstream_port, 0, "", exclude=("author.email",))
        with pytest.raises(run.BenchError, match=r"not the body without author\.email"):
            run.check_target(env, fields, varied)
        other = run.Env(**{**env.__dict__, "upstream_port": run.free_port(), "managed": []})
        other.tmp = scratch / "static"
        other.tmp.mkdir()
        try:
            run.start_upstream(other, {"static": static}, "python")
            repeating = run.Target("r", "", other.upstream_port, 0, "")
            with pytest.raises(run.BenchError, match="were the same bytes"):
                run.check_target(other, repeating, varied)
        finally:
            for m in other.managed:
                m.stop()
    finally:
        for m in env.managed:
            m.stop()


@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        (
            "decision.py",
            ["--iterations", "500", "--keys", "200", "--big-keys", "500"],
            r"one path: [\d.]+ µs(?s:.*)no route shape cache: [\d.]+ µs(?s:.*)load 500 keys",
        ),
        ("limiter.py", ["--quick"], r"sequential round trips\s+[\d.]+"),
        (
            "datapath.py",
            ["--iterations", "500", "--keys", "200"],
            r"data path \+ decision, no sockets: [\d.]+ µs",
        ),
    ],
)
def test_micro_benchmarks_run(script: str, args: list[str], expect: str) -> None:
    """The CPU-only benchmarks run end to end (they assert the proxy answered, not speed)."""
    import re

    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / script), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(expect, proc.stdout), proc.stdout


@pytest.mark.parametrize("cpus", [2, 4])
def test_the_workers_goal_is_judged_only_where_it_applies(monkeypatch, cpus: int) -> None:
    """`--workers` is held to 1.6x one worker on 4+ CPUs; on fewer it is reported with the
    CPU per request, as the goal says, never as a pass or a failure."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import run as bench_run
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    result = {"rps": 1000.0, "p99_ms": 5.0, "cpu_us": 80.0}
    report = {"results": {"small": {"keyproxy": result, "keyproxy-w2": dict(result, rps=1200.0)}}}
    (line,) = [line for line in bench_run.goal_lines(report) if "w2" in line]
    if cpus < 4:
        assert line.endswith("reported") and "CPU 80.0 vs 80.0 µs/req" in line
    else:
        assert line.endswith("1.20x one worker (goal ≥ 1.6x): not met")
