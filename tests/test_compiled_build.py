"""The compiled build (`KEYPROXY_COMPILE=1`, setup.py) as the Dockerfile makes it: a wheel
whose request path is C extensions, serving real traffic.

The wheel is built once for this module, as `pip wheel` builds it in the image (in an
isolated build environment, mypy fetched into it): ~100 s on two CPUs, most of it the C
compiler. The end-to-end tests of the request path then run against it: their keyproxy
processes start from the unpacked wheel, while the tests themselves import the source.
Compiled, annotations are enforced at run time, so a value of the wrong type on the
request path fails here and not in the Python build.
"""

from __future__ import annotations

import ast
import atexit
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import UPSTREAM_SECRET
from tests.procs import UpstreamServer, start_upstream
from tests.proxy_process import EXPECT_COMPILED, KEYS, base_config, start_keyproxy

ROOT = Path(__file__).resolve().parent.parent

#: The end-to-end tests run again with the compiled server: the core's answers, users
#: and roles, limits and quotas, body work, the access log and metrics.
END_TO_END = (
    "tests/test_proxy.py",
    "tests/test_users_e2e.py",
    "tests/test_limits_e2e.py",
    "tests/test_body_work_e2e.py",
)


def listed_modules() -> list[str]:
    """setup.py's `COMPILED` patterns, expanded as setup.py does (read, not imported:
    importing setup.py would run a build)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            if isinstance(target, ast.Name) and target.id == "COMPILED":
                assert node.value is not None
                patterns = ast.literal_eval(node.value)
                break
    else:
        raise AssertionError("setup.py defines no COMPILED")
    return sorted(
        str(path.relative_to(ROOT).with_suffix("")).replace(os.sep, ".")
        for pattern in patterns
        for path in ROOT.glob(pattern)
        if path.name != "__init__.py"
    )


def dockerfile_build_copies() -> list[str]:
    """What the Dockerfile's build stage copies before it builds the wheel, which it must
    build compiled: the wheel here is built from the same files, the same way."""
    build_stage = (ROOT / "Dockerfile").read_text().split("\nFROM ")[1]
    assert "RUN KEYPROXY_COMPILE=1 pip wheel " in build_stage
    names = []
    for line in build_stage.splitlines():
        if line.startswith("COPY "):
            *sources, _destination = line.split()[1:]
            names += sources
    return names


class WheelBuild:
    """`KEYPROXY_COMPILE=1 pip wheel` of the files the Dockerfile copies, in a process, by a
    Python that holds pip and nothing else (a new virtual environment), as
    `python:3.12-slim` does: the build must bring everything it needs itself."""

    def __init__(self, nice: int) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="keyproxy-compiled-"))
        atexit.register(shutil.rmtree, self.base, ignore_errors=True)
        source = self.base / "src"
        source.mkdir()
        for name in dockerfile_build_copies():
            if (ROOT / name).is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.so")
                shutil.copytree(ROOT / name, source / name, ignore=ignore)
            else:
                shutil.copy2(ROOT / name, source / name)
        self.log = self.base / "build.log"
        builder = shlex.quote(str(self.base / "builder"))
        # Unlike the Dockerfile, only keyproxy's wheel is built (`--no-deps`): the
        # dependencies' wheels are the registry's, and not under test.
        pip_wheel = f"{builder}/bin/pip wheel -q --no-deps -w ../dist ."
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["sh", "-c", f'"$0" -m venv {builder} && {pip_wheel}', sys.executable],
                cwd=source,
                env={**os.environ, "KEYPROXY_COMPILE": "1"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=(lambda: os.nice(nice)) if nice else None,
            )

    def unpacked(self) -> Path:
        """Wait for the wheel (bounded) and unpack it: a directory to put first on sys.path."""
        try:
            self.process.wait(timeout=900)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        output = self.log.read_text(errors="replace")
        assert self.process.returncode == 0, output[-3000:]
        (wheel,) = (self.base / "dist").glob("keyproxy-*.whl")
        site = self.base / "site"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
        return site


#: Started by `tests/conftest.py` as the suite begins, when these tests are among many.
early_build: WheelBuild | None = None


def start_early() -> None:
    """Build while the rest of the suite runs, at the lowest priority: the compiler then
    takes the CPU time the other tests leave idle (most of them wait on processes and
    sockets) instead of adding ~90 s to the run, without slowing the tests it shares with."""
    global early_build
    if early_build is None and missing_compiler() is None:
        early_build = WheelBuild(nice=19)


def missing_compiler() -> str | None:
    """Why the compiled build cannot be made on this machine, or None."""
    if shutil.which("cc") is None:
        return "no C compiler (cc); apt-get install gcc"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python headers (Python.h); apt-get install python3-dev"
    return None


@pytest.fixture(scope="module")
def compiled_site() -> Path:
    reason = missing_compiler()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the compiled build test (.ci/run installs it)")
        pytest.skip(reason)
    build = early_build or WheelBuild(nice=0)
    return build.unpacked()


@pytest.fixture(scope="module")
def upstream_for_compiled() -> Iterator[UpstreamServer]:
    with start_upstream(header_secrets={"X-Upstream-Key": UPSTREAM_SECRET}) as server:
        yield server


def test_the_wheel_holds_every_listed_module_compiled(compiled_site: Path) -> None:
    extensions = sorted(
        str(path.relative_to(compiled_site)).split(".")[0].replace(os.sep, ".")
        for path in (compiled_site / "keyproxy").rglob("*.so")
    )
    assert extensions == listed_modules()
    assert "keyproxy.wire.client" in extensions


def test_an_editable_compiled_install_is_refused_with_one_line(tmp_path: Path) -> None:
    """Compiled modules next to their source would hide every later edit to it."""
    done = subprocess.run(
        [sys.executable, "setup.py", "editable_wheel"],
        cwd=ROOT,
        env={**os.environ, "KEYPROXY_COMPILE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "KEYPROXY_COMPILE=1 needs a regular install (pip install .): in an editable one "
        "the compiled modules would hide later edits to their source"
    ]


def _listening(stderr: str) -> dict[str, object]:
    for line in stderr.splitlines():
        if '"event":"listening"' in line:
            return json.loads(line)
    raise AssertionError(f"no listening event in {stderr[-500:]!r}")


def test_the_compiled_server_says_so_and_answers(
    compiled_site: Path, upstream_for_compiled: UpstreamServer, tmp_path: Path
) -> None:
    inject = upstream_for_compiled.inject()
    env = {**os.environ, "PYTHONPATH": str(compiled_site)}
    config = base_config(upstream_for_compiled.url, inject)
    compiled = start_keyproxy(tmp_path, config, env=env, cwd=compiled_site)
    python = start_keyproxy(tmp_path, base_config(upstream_for_compiled.url, inject))
    try:
        assert _listening(compiled.process.stderr)["compiled"] is True
        assert _listening(python.process.stderr)["compiled"] is False
        for proxy in (compiled, python):
            status, _, body, _ = proxy.request("GET", "/v1/data/posts", key=KEYS["reader"])
            assert status == 200, body[:200]
            status, _, body, _ = proxy.request("GET", "/v1/data/posts")
            assert status == 401 and json.loads(body)["error"] == "UNAUTHORIZED"
    finally:
        compiled.stop()
        python.stop()


def test_the_end_to_end_tests_pass_with_the_compiled_server(compiled_site: Path) -> None:
    """Run from the unpacked wheel, the keyproxy processes these tests start (with
    `python -m keyproxy`) import it: the working directory, then PYTHONPATH, come before
    the source tree on their `sys.path`; each must say it is compiled (`start_keyproxy`).
    The tests' own imports still find the source first (pyproject's `pythonpath`)."""
    done = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"),
            *(str(ROOT / name) for name in END_TO_END),
        ],
        cwd=compiled_site,
        env={**os.environ, "PYTHONPATH": str(compiled_site), EXPECT_COMPILED: "1"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
