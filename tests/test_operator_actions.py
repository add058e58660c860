"""An operator's ordinary actions (rotating logs, stopping, editing the file) never lose
traffic, log lines or the last good configuration: through real `keyproxy serve` processes."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from keyproxy.observe import unread_target
from tests.proxy_process import KEYS, Keyproxy, base_config, read_log


@pytest.mark.parametrize("signum", [None, signal.SIGHUP])
def test_a_renamed_access_log_is_reopened_without_sigusr1(upstream, tmp_path, make, signum):
    """logrotate renames the file and then sends nothing (no postrotate) or SIGHUP, the
    signal most daemons reopen their logs on: the next lines go to the path again, not
    into the rotated file that logrotate compresses and deletes."""
    log_path = tmp_path / "access.log"
    config = base_config(upstream.url, upstream.inject())
    config["log"] = {"access": str(log_path)}
    kp = make(config)
    assert kp.request("GET", "/echo/1", key=KEYS["reader"])[0] == 200
    assert len(read_log(log_path, 1)) == 1
    rotated = tmp_path / "access.log.1"
    log_path.rename(rotated)
    if signum is not None:
        kp.process.send_signal(signum)
        time.sleep(0.3)
    assert kp.request("GET", "/echo/2", key=KEYS["reader"])[0] == 200
    assert [line["path"] for line in read_log(log_path, 1)] == ["/echo/2"]
    assert [line["path"] for line in read_log(rotated, 1, timeout=0)] == ["/echo/1"]
    # and the path deleted outright (rotate with `create` off, or rm): back at the path too
    log_path.unlink()
    assert kp.request("GET", "/echo/3", key=KEYS["reader"])[0] == 200
    assert [line["path"] for line in read_log(log_path, 1)] == ["/echo/3"]


def test_a_refused_target_logs_no_password_and_no_key(upstream, tmp_path, make):
    """Targets refused at their path still show in the log, but without the userinfo of an
    absolute or authority form, or what follows a `;` parameter or a `#` fragment: clients
    put passwords and keys there, and the log never holds either."""
    log_path = tmp_path / "access.log"
    config = base_config(upstream.url, upstream.inject())
    config["log"] = {"access": str(log_path)}
    kp = make(config)
    key = KEYS["reader"]
    targets = [
        "http://user:PASSWORD1@127.0.0.1/echo/x",
        "http://user:PASS?WORD2@127.0.0.1/echo/x",
        f"/echo/x;api_key={key}",
        f"/echo/x#{key}",
        "//user:PASSWORD3@host/echo/x",
    ]
    for target in targets:
        answer = kp.raw(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        assert answer.startswith(b"HTTP/1.1 400 "), answer
    answer = kp.raw(b"CONNECT user:PASSWORD4@host:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    lines = read_log(log_path, len(targets) + 1)
    assert [line["path"] for line in lines] == [
        "http://***@127.0.0.1/echo/x",
        "http://***@127.0.0.1/echo/x",
        "/echo/x;",
        "/echo/x#",
        "//***@host/echo/x",
        "***@host:443",
    ]
    assert all(line["status"] == 400 for line in lines)
    text = log_path.read_text()
    for secret in ("PASSWORD", "WORD2", key, key[3:20]):
        assert secret not in text


@pytest.mark.parametrize(
    ("target", "logged"),
    [
        ("/v1/data/posts?page=2", ("/v1/data/posts", "page=2")),  # origin form: as it is
        ("/a/b@c", ("/a/b@c", "")),
        ("/x;jsessionid=pk_1?page=2", ("/x;", "page=2")),
        ("/x#sk_1", ("/x#", "")),
        ("http://u:p?w#d@h/x?q=1", ("http://***@h/x", "q=1")),
        ("http://u:p/w@h/x", ("http://***@h/x", "")),
        ("u:p@host:443", ("***@host:443", "")),
        ("*", ("*", "")),
    ],
)
def test_unread_target_keeps_what_shows_the_refusal_and_no_credential(target, logged):
    assert unread_target(target) == logged


def test_sigterm_stops_even_when_the_access_log_cannot_be_written(upstream, tmp_path, make):
    """The access log is a named pipe whose reader is gone (a log shipper that died): the
    writer blocks on it. Traffic goes on meanwhile, and SIGTERM still drains and exits
    instead of waiting for the pipe forever."""
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    config = base_config(upstream.url, upstream.inject())
    config["log"] = {"access": str(fifo)}
    config["server"]["drain_timeout"] = "1s"
    kp = make(config)
    for i in range(3):
        assert kp.request("GET", f"/echo/{i}", key=KEYS["reader"])[0] == 200
        time.sleep(0.3)  # the writer has a batch in hand, blocked on the pipe
    started = time.monotonic()
    kp.process.send_signal(signal.SIGTERM)
    try:
        code = kp.process.popen.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail("SIGTERM did not stop keyproxy: " + kp.process.describe())
    assert code == 0, kp.process.describe()
    assert time.monotonic() - started < 12
    assert '"event":"access_log_stuck"' in kp.process.stderr, kp.process.describe()


def test_sigusr1_to_the_supervisor_reopens_logs_and_stops_nothing(upstream, tmp_path, make):
    """logrotate signals the pid it knows, which with `--workers N` is the supervisor's:
    SIGUSR1 (the documented reopen signal) must reach the workers, not kill the supervisor
    and with it every worker."""
    log_path = tmp_path / "access.log"
    config = base_config(upstream.url, upstream.inject())
    config["log"] = {"access": str(log_path)}
    kp = make(config, extra_args=["--workers", "2"])
    deadline = time.monotonic() + 10
    while kp.process.stderr.count('"event":"listening"') < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    kp.process.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    assert kp.process.returncode is None, kp.process.describe()
    for i in range(4):
        assert kp.request("GET", f"/echo/{i}", key=KEYS["reader"])[0] == 200
    assert len(read_log(log_path, 4)) == 4
    assert kp.process.returncode is None, kp.process.describe()


def test_the_supervisor_passes_reload_and_reopen_only_to_workers_that_are_ready(tmp_path):
    """A worker still loading its configuration has no SIGHUP/SIGUSR1 handler yet, and
    either signal's default is to end the process: a reload sent while a worker restarts
    would kill it, and a few of those look like a crash loop. It gets them once ready.
    Real child processes (`sleep`, which a SIGHUP ends) stand in for a ready worker and
    a starting one."""
    from keyproxy.workers import Slot, Supervisor

    supervisor = Supervisor(str(tmp_path / "unused.yaml"), [], [], 2, 1.0)
    ready, starting = supervisor.slots
    ready.process = subprocess.Popen(["sleep", "30"])
    ready.ready = True
    starting.process = subprocess.Popen(["sleep", "30"])
    try:
        for signum in (signal.SIGUSR1, signal.SIGHUP):
            supervisor.forward(signum)
        assert ready.process.wait(5) == -signal.SIGUSR1
        time.sleep(0.2)
        assert starting.process.poll() is None
        # Once ready, it gets what it missed: the SIGHUP may announce an edit made after
        # it read the file.
        read_end, write_end = os.pipe()
        starting.ready_fd = read_end
        os.write(write_end, b"1")
        os.close(write_end)
        supervisor._watch_ready()
        assert starting.ready
        assert starting.process.wait(5) in (-signal.SIGHUP, -signal.SIGUSR1)
        starting.process = subprocess.Popen(["sleep", "30"])
        starting.ready = False
        supervisor.forward(signal.SIGTERM)  # a stop reaches every worker
        assert starting.process.wait(5) == -signal.SIGTERM
        assert supervisor.stopping
    finally:
        for slot in (ready, starting):
            assert isinstance(slot, Slot) and slot.process is not None
            slot.process.kill()
            slot.process.wait()


def test_a_full_disk_costs_log_lines_counted_never_traffic(upstream, tmp_path, make):
    """The access log on a device that is always full (`/dev/full`: every write fails
    with ENOSPC, as on a full disk): requests are still answered, the lost lines are
    counted in keyproxy_access_log_dropped_total, and the failure is logged."""
    config = base_config(upstream.url, upstream.inject())
    config["log"] = {"access": "/dev/full"}
    kp = make(config)
    for i in range(5):
        assert kp.request("GET", f"/echo/{i}", key=KEYS["reader"])[0] == 200
    deadline = time.monotonic() + 5
    dropped = 0.0
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(kp.admin_host, kp.admin_port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        dropped = next(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "keyproxy_access_log_dropped_total"
        )
        if dropped >= 5:
            break
        time.sleep(0.2)
    assert dropped == 5
    assert '"event":"access_log_error"' in kp.process.stderr
    assert kp.request("GET", "/echo/after", key=KEYS["reader"])[0] == 200


def _caught_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return int(line.split()[1], 16)
    return 0


def test_sighup_and_sigusr1_while_the_config_loads_kill_nothing(upstream, tmp_path):
    """logrotate's SIGUSR1 or an operator's SIGHUP can land while a large registry is
    still loading, before the loop's handlers exist; their default action is to end the
    process. They are held until the handlers are in place, and the server comes up; the
    SIGHUP then reloads, since the edit it announces may have come after the file was read."""
    import sys

    import yaml

    from tests.procs import Process

    config = base_config(upstream.url, upstream.inject())
    config["keys"] += [
        {"id": f"filler-{i}", "hash": "sha256:" + f"{i:064x}", "type": "read"} for i in range(10000)
    ]
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    process = Process([sys.executable, "-m", "keyproxy", "serve", "-c", str(path)], name="kp")
    try:
        usr1 = 1 << (signal.SIGUSR1 - 1)
        deadline = time.monotonic() + 10
        while not _caught_signals(process.pid) & usr1:  # the load has begun (about 1 s)
            assert process.returncode is None and time.monotonic() < deadline, process.describe()
            time.sleep(0.001)
        process.send_signal(signal.SIGUSR1)
        process.send_signal(signal.SIGHUP)
        process.wait_for_line(r'"event":"listening"', stream="stderr")
        kp = Keyproxy(process, path, config)
        assert kp.request("GET", "/echo/up", key=KEYS["reader"])[0] == 200
        process.wait_for_line(r'"event":"config_reload".*"result":"success"', stream="stderr")
        assert process.returncode is None
    finally:
        process.stop()


def test_a_key_pasted_into_the_path_is_not_logged(upstream, tmp_path, make):
    """The access log never holds a key: one a client puts into a path segment (of a
    request that is allowed, and of one that is refused) is cut to its prefix."""
    log_path = tmp_path / "access.log"
    config = base_config(upstream.url, upstream.inject())
    config["log"] = {"access": str(log_path)}
    kp = make(config)
    pasted = KEYS["reader"]
    assert kp.request("GET", f"/echo/{pasted}/x", key=KEYS["reader"])[0] == 200
    assert kp.request("GET", f"/nowhere/{pasted}", key=KEYS["reader"])[0] in (403, 404)
    assert kp.request("GET", f"/echo/key={pasted}", key=KEYS["reader"])[0] == 200
    lines = read_log(log_path, 3)
    assert [line["path"] for line in lines] == [
        f"/echo/{pasted[:3]}***/x",
        f"/nowhere/{pasted[:3]}***",
        f"/echo/key={pasted[:3]}***",
    ]
    assert pasted not in log_path.read_text()


def test_the_access_log_comes_back_after_its_directory_could_not_be_opened(tmp_path):
    """logrotate's directory is moved away (or the path cannot be created for a moment):
    reopening fails and those lines are lost, but once the path can be opened again the
    next write goes there, without waiting for a SIGUSR1."""
    from keyproxy.observe import AccessLog

    directory = tmp_path / "logs"
    directory.mkdir()
    log = AccessLog(str(directory / "access.log"))
    try:
        assert log._write(b"one\n")
        directory.rename(tmp_path / "logs.old")  # the path is gone, and cannot be created
        assert not log._write(b"lost\n")
        directory.mkdir()
        (directory / "access.log").touch()  # logrotate's `create`
        assert log._write(b"two\n")
        assert (directory / "access.log").read_bytes() == b"two\n"
        assert (tmp_path / "logs.old" / "access.log").read_bytes() == b"one\n"
    finally:
        log.close()


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/v1/pk_abc123/posts", "/v1/pk_***/posts"),
        ("/echo/key=sk_abc123", "/echo/key=sk_***"),
        ("/echo/apikey:pk_abc123/x", "/echo/apikey:pk_***/x"),
        ("/echo/x.pk_abc123", "/echo/x.pk_***"),
        ("/echo/pk%5Fabc123", "/echo/pk_***"),
        ("/v1/data/task_list/desk_1", "/v1/data/task_list/desk_1"),  # not a key
    ],
)
def test_a_key_anywhere_in_a_path_segment_is_cut(path, logged):
    from keyproxy.observe import _path_without_keys

    assert _path_without_keys(path) == logged
