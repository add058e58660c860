"""Start-up, sockets and worker supervision, through real `keyproxy serve` processes."""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import signal
import sys
import threading
import time

import pytest
import yaml

from tests.procs import Process, free_port
from tests.proxy_process import KEYS, Keyproxy, base_config, start_keyproxy


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def second_instance(tmp_path, config: dict, extra: list[str]) -> Process:
    path = tmp_path / f"second-{free_port()}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Process([sys.executable, "-m", "keyproxy", "serve", "-c", str(path), *extra])


def worker_pids(kp: Keyproxy) -> list[int]:
    """Worker pids in the order their `listening` lines appeared."""
    return [
        json.loads(line)["pid"]
        for line in kp.process.stderr.splitlines()
        if '"event":"listening"' in line
    ]


def assert_one_line_error(proc: Process, *needles: str) -> None:
    assert proc.wait(30) == 1, proc.describe()
    assert "Traceback" not in proc.stderr, proc.describe()
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.describe()
    for needle in needles:
        assert needle in lines[0], proc.describe()


@pytest.mark.parametrize("first_workers", [1, 2])
def test_a_port_held_by_another_keyproxy_is_a_clean_start_up_error(
    tmp_path, upstream, first_workers
):
    config = base_config(upstream.url, upstream.inject())
    first = start_keyproxy(tmp_path, config, extra_args=["--workers", str(first_workers)])
    try:
        port = first.port
        for extra in ([], ["--workers", "2"]):
            proc = second_instance(tmp_path, config, extra)
            assert_one_line_error(proc, f"port {port} is in use", "server.listen or --port")
        # the admin port alone taken: the same, naming the admin setting
        other = copy.deepcopy(config)
        other["server"]["listen"] = f"127.0.0.1:{free_port()}"
        for extra in ([], ["--workers", "2"]):
            proc = second_instance(tmp_path, other, extra)
            assert_one_line_error(
                proc, f"admin port {first.admin_port} is in use", "server.admin_listen"
            )
        # the first instance is untouched and alone on its port
        for _ in range(10):
            assert first.request("GET", "/echo/one", key=KEYS["reader"])[0] == 200
    finally:
        assert first.stop() == 0


class Traffic:
    """Requests on fresh connections, one after another, until stopped."""

    def __init__(self, kp: Keyproxy) -> None:
        self.kp = kp
        self.ok = 0
        self.failed: list[str] = []
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while self.running:
            conn = http.client.HTTPConnection(self.kp.host, self.kp.port, timeout=5)
            try:
                conn.request("GET", "/echo/traffic", headers={"X-API-Key": KEYS["reader"]})
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    self.ok += 1
                else:
                    self.failed.append(str(response.status))
            except OSError as exc:
                self.failed.append(repr(exc))
            finally:
                conn.close()

    def stop(self) -> None:
        self.running = False
        self.thread.join(10)


def test_two_worker_crashes_seconds_apart_keep_the_port_serving(tmp_path, upstream):
    """kill -9 one worker, then the one that replaced it: the supervisor restarts both
    times (with back-off), the healthy worker never stops, the port answers throughout."""
    kp = start_keyproxy(
        tmp_path, base_config(upstream.url, upstream.inject()), extra_args=["--workers", "2"]
    )
    traffic = Traffic(kp)
    try:
        assert wait_until(lambda: len(worker_pids(kp)) == 2)
        healthy, victim = worker_pids(kp)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: len(worker_pids(kp)) == 3), kp.process.describe()
        replacement = worker_pids(kp)[2]
        ok_before = traffic.ok
        time.sleep(1.0)
        os.kill(replacement, signal.SIGKILL)  # the freshly restarted worker, a second later
        assert wait_until(lambda: len(worker_pids(kp)) == 4), kp.process.describe()
        assert wait_until(lambda: traffic.ok > ok_before + 20)
        time.sleep(0.5)
        assert kp.process.returncode is None, kp.process.describe()
        os.kill(healthy, 0)  # still alive: never taken down
        assert kp.process.stderr.count('"event":"worker_exited"') == 2
        assert '"event":"crash_loop"' not in kp.process.stderr
        assert kp.admin("/healthz") == (200, {"status": "ok"})
    finally:
        traffic.stop()
        code = kp.stop()
    # each kill can cut at most the one request that worker held
    assert len(traffic.failed) <= 2, traffic.failed
    assert traffic.ok > 50
    assert code == 0, kp.process.describe()


def _events(kp: Keyproxy, name: str) -> list[dict]:
    events = [json.loads(line) for line in kp.process.stderr.splitlines() if line.startswith("{")]
    return [event for event in events if event["event"] == name]


def test_a_bad_edit_and_a_dead_worker_never_stop_the_workers_that_serve(tmp_path, upstream):
    """A bad edit keeps the last good config: when a worker then dies, its restarts fail
    (they read the bad file) and the slot loops, yet the healthy worker goes on serving,
    the supervisor says what is wrong and keeps retrying, and fixing the file brings the
    slot back."""
    config = base_config(upstream.url, upstream.inject())
    kp = start_keyproxy(tmp_path, config, extra_args=["--workers", "2"])
    try:
        assert wait_until(lambda: len(worker_pids(kp)) == 2)
        healthy, victim = worker_pids(kp)
        good = kp.config_path.read_text()
        kp.config_path.write_text("server: {listen: nowhere}\n# end\n")  # every new worker fails
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: _events(kp, "worker_failing"), 20), kp.process.stderr[-2000:]
        failing = _events(kp, "worker_failing")[0]
        assert "without ever becoming ready" in failing["message"]
        assert "last good configuration" in failing["message"]
        assert kp.process.returncode is None and _alive(healthy)
        assert kp.request("GET", "/echo/still", key=KEYS["reader"])[0] == 200
        assert not _events(kp, "crash_loop")
        fixed = kp.config_path.with_suffix(".fixed")
        fixed.write_text(good)
        fixed.replace(kp.config_path)  # the fix, by rename
        assert wait_until(lambda: len(worker_pids(kp)) == 3, 40), kp.process.stderr[-2000:]
        assert kp.process.returncode is None and _alive(healthy)
        assert kp.request("GET", "/echo/again", key=KEYS["reader"])[0] == 200
    finally:
        kp.stop()


def test_a_crash_loop_with_no_worker_serving_gives_up_loudly(tmp_path, upstream):
    """Workers that die before ever being ready, again and again, while no worker serves:
    the supervisor logs `crash_loop` and exits non-zero rather than pretend to run."""
    kp = start_keyproxy(
        tmp_path, base_config(upstream.url, upstream.inject()), extra_args=["--workers", "2"]
    )
    try:
        assert wait_until(lambda: len(worker_pids(kp)) == 2)
        kp.config_path.write_text("server: {listen: nowhere}\n")  # every new worker fails
        for pid in worker_pids(kp):
            os.kill(pid, signal.SIGKILL)
        assert kp.process.wait(40) == 1
        loops = _events(kp, "crash_loop")
        assert len(loops) == 1 and "without ever becoming ready" in loops[0]["message"]
    finally:
        kp.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_restarted_worker_never_serves_an_edit_the_others_refused(tmp_path, upstream):
    """The file is rewritten in place without `# end` (it may be half written): the
    running worker refuses it. A worker that dies then restarts and must not serve that
    file either; it waits until the edit is finished (or applied by the others)."""
    from tests.proxy_process import digest

    newcomer = "pk_" + "8" * 64
    config = base_config(upstream.url, upstream.inject())
    kp = start_keyproxy(tmp_path, config, extra_args=["--workers", "2"])
    try:
        assert wait_until(lambda: len(worker_pids(kp)) == 2)
        healthy, victim = worker_pids(kp)
        edited = copy.deepcopy(config)
        edited["keys"].append({"id": "newcomer", "hash": digest(newcomer), "type": "read"})
        text = yaml.safe_dump(edited, sort_keys=False)
        with open(kp.config_path, "w") as file:  # in place, no end marker
            file.write(text)
        assert wait_until(lambda: "rewritten in place" in kp.process.stderr, 10)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: _events(kp, "worker_restarted"), 10), kp.process.stderr
        deadline = time.monotonic() + 3  # restarts at 0.25 s, 0.5 s, 1 s: several chances
        while time.monotonic() < deadline:  # connections go to whichever worker accepts
            assert kp.request("GET", "/echo/x", key=newcomer)[0] == 401
            assert kp.request("GET", "/echo/x", key=KEYS["reader"])[0] == 200
        assert len(worker_pids(kp)) == 2  # the restarted worker never began to serve
        assert "not yet applied" in kp.process.stderr
        with open(kp.config_path, "a") as file:
            file.write("# end\n")  # the edit is finished: every worker takes it
        assert wait_until(lambda: len(worker_pids(kp)) == 3, 30), kp.process.stderr[-2000:]

        def reloaded() -> bool:
            return any(e["result"] == "success" for e in _events(kp, "config_reload"))

        assert wait_until(reloaded, 10), kp.process.stderr[-2000:]  # the healthy one
        for _ in range(10):
            assert kp.request("GET", "/echo/x", key=newcomer)[0] == 200
        assert _alive(healthy)
    finally:
        kp.stop()


def test_workers_can_share_port_zero(tmp_path, upstream):
    """The supervisor binds, so even `--port 0` gives every worker the same port."""
    kp = start_keyproxy(
        tmp_path,
        base_config(upstream.url, upstream.inject()),
        extra_args=["--workers", "2", "--port", "0"],
    )
    try:
        assert wait_until(lambda: len(worker_pids(kp)) == 2)
        urls = set(re.findall(r'"url":"(http://[^"]+)"', kp.process.stderr))
        assert len(urls) == 1, kp.process.stderr
        kp.host, port = urls.pop().removeprefix("http://").rsplit(":", 1)
        kp.port = int(port)
        assert kp.port != 0
        for _ in range(10):
            assert kp.request("GET", "/echo/zero", key=KEYS["reader"])[0] == 200
    finally:
        assert kp.stop() == 0


def test_the_soft_fd_limit_is_raised_to_the_hard_limit(tmp_path, upstream):
    config = base_config(upstream.url, upstream.inject())
    path = tmp_path / "limits.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        hard_text = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        pytest.fail(f"this test needs a finite hard fd limit above 256, found {hard_text}")
    script = f"ulimit -Sn 256 && exec {sys.executable} -m keyproxy serve -c {path}"
    proc = Process(["bash", "-c", script])
    try:
        line = proc.wait_for_line(r'"event":"fd_limit"', stream="stderr")
        event = json.loads(line.string)
        assert (event["soft"], event["hard"]) == (hard, hard)
        proc.wait_for_line(r'"event":"listening"', stream="stderr")
        with open(f"/proc/{proc.pid}/limits") as limits:
            row = next(r for r in limits if r.startswith("Max open files"))
        assert row.split()[3:5] == [str(hard), str(hard)]
    finally:
        assert proc.stop() == 0


def test_restart_delay_doubles_and_is_capped() -> None:
    from keyproxy.workers import BACKOFF_MAX, restart_delay

    assert [restart_delay(n) for n in (1, 2, 3, 4)] == [0.25, 0.5, 1.0, 2.0]
    assert restart_delay(40) == BACKOFF_MAX


def test_only_crashes_within_the_window_count() -> None:
    from collections import deque

    from keyproxy.workers import CRASH_LOOP_WINDOW, forget_before

    history = deque([0.0, 10.0, 50.0])
    assert forget_before(history, 10.0 + CRASH_LOOP_WINDOW) == 2
    assert forget_before(history, 1000.0) == 0
