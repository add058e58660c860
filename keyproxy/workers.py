"""`serve --workers N`: N processes accepting on the supervisor's sockets.

The supervisor binds the public and admin sockets once and starts N complete
keyproxy processes that inherit them (gunicorn's and uvicorn's model); the
kernel gives each new connection to one accepting worker, and connections keep
queueing on the shared socket while a worker restarts, so a crash loses only
the requests that worker had in hand. The supervisor forwards signals and
restarts workers that die.

A crash is not a reason to stop serving: a worker that dies is restarted after
a delay that doubles with each recent crash of its slot (0.25 s, 0.5 s, 1 s ...
at most 30 s), while the other workers go on. A slot whose workers die
CRASH_LOOP_LIMIT times within CRASH_LOOP_WINDOW seconds without ever becoming
ready is looping (a broken config edit, a missing file): while another worker
still serves the last good configuration, the supervisor logs `worker_failing`
and keeps retrying at the back-off, so a bad edit followed by one worker's
death never takes the whole service down, and the slot comes back once the
file is fixed. Only when no worker serves does it give up: it logs a
`crash_loop` event, stops the others and exits 1.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field

from keyproxy.observability import log_event

BACKOFF_FIRST = 0.25
BACKOFF_MAX = 30.0
#: Crashes within this many seconds count towards the back-off and the loop verdict.
CRASH_LOOP_WINDOW = 60.0
#: Workers of one slot dying this often within the window, none of them ever ready: a loop.
CRASH_LOOP_LIMIT = 5
POLL_INTERVAL = 0.1
#: After SIGTERM, how long past `server.drain_timeout` a worker may take before SIGKILL.
STOP_GRACE = 10.0


def restart_delay(recent_crashes: int) -> float:
    """How long a slot waits before its next worker: doubling per crash within the window."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, recent_crashes - 1))


def forget_before(history: deque[float], now: float) -> int:
    """Drop crashes older than the window; how many are left."""
    while history and history[0] < now - CRASH_LOOP_WINDOW:
        history.popleft()
    return len(history)


@dataclass
class Slot:
    """One worker position: the current process and its recent history."""

    index: int
    process: subprocess.Popen | None = None
    ready_fd: int | None = None  # read end of the pipe the worker writes to once listening
    ready: bool = False
    restart_at: float | None = None
    crashes: deque[float] = field(default_factory=deque)  # every exit, for the back-off
    unready_crashes: deque[float] = field(default_factory=deque)  # exits before ready
    #: SIGHUP/SIGUSR1 that arrived while the worker was starting, passed on once it is ready.
    held: set[int] = field(default_factory=set)


class Supervisor:
    def __init__(
        self,
        config_path: str,
        sockets: list[socket.socket],
        admin_sockets: list[socket.socket],
        workers: int,
        drain_timeout: float,
    ) -> None:
        self.config_path = config_path
        self.listen_fds = [s.fileno() for s in sockets]
        self.admin_fds = [s.fileno() for s in admin_sockets]
        self.slots = [Slot(i) for i in range(workers)]
        #: Each worker leaves a snapshot of its counts here; any worker's /metrics sums them.
        self.metrics_dir = ""
        self.drain_timeout = drain_timeout
        self.stopping = False
        self.status = 0

    def spawn(self, slot: Slot) -> None:
        read_end, write_end = os.pipe()
        cmd = [
            sys.executable,
            "-m",
            "keyproxy",
            "serve",
            "-c",
            self.config_path,
            "--listen-fds",
            ",".join(map(str, self.listen_fds)),
            "--admin-fds",
            ",".join(map(str, self.admin_fds)),
            "--ready-fd",
            str(write_end),
            "--supervisor-pid",
            str(os.getpid()),
        ]
        try:
            slot.process = subprocess.Popen(
                cmd,
                pass_fds=(*self.listen_fds, *self.admin_fds, write_end),
                env=dict(os.environ, KEYPROXY_METRICS_DIR=self.metrics_dir),
            )
        finally:
            os.close(write_end)
        slot.ready_fd = read_end
        slot.ready = False
        slot.held.clear()
        slot.restart_at = None

    def forward(self, signum: int, _frame: object = None) -> None:
        stop = signum in (signal.SIGTERM, signal.SIGINT)
        if stop:
            self.stopping = True
        for slot in self.slots:
            if slot.process is None or slot.process.poll() is not None:
                continue
            if stop or slot.ready:
                slot.process.send_signal(signum)
            else:
                # SIGHUP and SIGUSR1 end a worker that has not set up its handlers yet, and
                # it may have read the file before the edit this SIGHUP announces: held.
                slot.held.add(signum)

    def _became_ready(self, slot: Slot) -> None:
        slot.ready = True
        if slot.process is not None and slot.process.poll() is None:
            for signum in sorted(slot.held):
                slot.process.send_signal(signum)
        slot.held.clear()

    def run(self) -> int:
        # SIGUSR1 too: logrotate signals the pid it knows, this one, and by default it kills.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, self.forward)
        for slot in self.slots:
            try:
                self.spawn(slot)
            except OSError as exc:
                print(f"keyproxy: cannot start a worker: {exc.strerror}", file=sys.stderr)
                self.status = 1
                self.stopping = True
                break
        while not self.stopping:
            self._watch_ready()
            now = time.monotonic()
            for slot in self.slots:
                if self.stopping:
                    break
                if slot.process is not None:
                    code = slot.process.poll()
                    if code is not None:
                        self._exited(slot, code, now)
                elif slot.restart_at is not None and now >= slot.restart_at:
                    try:
                        self.spawn(slot)
                    except OSError as exc:  # out of processes or descriptors: try again later
                        slot.restart_at = now + BACKOFF_MAX
                        log_event("worker_spawn_failed", slot=slot.index, error=exc.strerror)
                        continue
                    log_event("worker_restarted", slot=slot.index, pid=slot.process.pid)  # type: ignore[attr-defined]  # spawned just above: mypy cannot see the assignment
        self._stop_all()
        return self.status

    def _watch_ready(self) -> None:
        fds = {slot.ready_fd: slot for slot in self.slots if slot.ready_fd is not None}
        if not fds:
            time.sleep(POLL_INTERVAL)
            return
        try:
            readable, _, _ = select.select(list(fds), [], [], POLL_INTERVAL)
        except InterruptedError:
            return
        for fd in readable:
            slot = fds[fd]
            if os.read(fd, 16):
                self._became_ready(slot)
            os.close(fd)  # a worker writes once; EOF means it died before being ready
            slot.ready_fd = None

    def _exited(self, slot: Slot, code: int, now: float) -> None:
        pid = slot.process.pid  # type: ignore[union-attr]
        slot.process = None
        if slot.ready_fd is not None:
            self._drain_ready(slot)
        forget_before(slot.crashes, now)
        forget_before(slot.unready_crashes, now)
        slot.crashes.append(now)
        if not slot.ready:
            slot.unready_crashes.append(now)
        looping = len(slot.unready_crashes) >= CRASH_LOOP_LIMIT
        serving = any(other.ready and other.process is not None for other in self.slots)
        if looping and not serving:
            log_event(
                "crash_loop",
                message=f"worker slot {slot.index} died {len(slot.unready_crashes)} times within "
                f"{CRASH_LOOP_WINDOW:g}s without ever becoming ready; stopping",
                slot=slot.index,
                pid=pid,
                exit_code=code,
            )
            self.status = 1
            self.forward(signal.SIGTERM)
            return
        delay = restart_delay(len(slot.crashes))
        slot.restart_at = now + delay
        if looping:
            log_event(
                "worker_failing",
                message=f"worker slot {slot.index} died {len(slot.unready_crashes)} times within "
                f"{CRASH_LOOP_WINDOW:g}s without ever becoming ready; the other workers serve "
                f"the last good configuration; retrying in {delay:g}s (check the file)",
                slot=slot.index,
                pid=pid,
                exit_code=code,
            )
            return
        log_event(
            "worker_exited",
            slot=slot.index,
            pid=pid,
            exit_code=code,
            was_ready=slot.ready,
            restart_in=round(delay, 3),
        )

    def _drain_ready(self, slot: Slot) -> None:
        """The worker may have written its ready byte just before dying."""
        fd = slot.ready_fd
        assert fd is not None
        readable, _, _ = select.select([fd], [], [], 0)
        if readable and os.read(fd, 16):
            slot.ready = True
        os.close(fd)
        slot.ready_fd = None

    def _stop_all(self) -> None:
        # Again: a worker started while the signal was being forwarded has not had it.
        self.forward(signal.SIGTERM)
        for slot in self.slots:
            if slot.ready_fd is not None:
                os.close(slot.ready_fd)
                slot.ready_fd = None
        deadline = time.monotonic() + self.drain_timeout + STOP_GRACE
        for slot in self.slots:
            process = slot.process
            if process is None:
                continue
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def supervise(
    config_path: str,
    sockets: list[socket.socket],
    admin_sockets: list[socket.socket],
    workers: int,
    drain_timeout: float,
) -> int:
    bound = sockets[0].getsockname()
    log_event("supervising", workers=workers, port=bound[1], supervisor_pid=os.getpid())
    supervisor = Supervisor(config_path, sockets, admin_sockets, workers, drain_timeout)
    supervisor.metrics_dir = tempfile.mkdtemp(prefix="keyproxy-metrics-")
    try:
        return supervisor.run()
    finally:
        shutil.rmtree(supervisor.metrics_dir, ignore_errors=True)
