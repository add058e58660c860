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

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOKE_TARGETS = ("direct", "plain", "keyproxy")

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
    assert "small body" in out.read_text()


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
