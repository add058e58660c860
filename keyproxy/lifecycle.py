"""The process's lifetime: bind, serve until a signal, drain, stop.

`run` binds the listening sockets first (a taken port is one line on stderr),
then serves in this process or supervises `--workers N` processes sharing them;
`serve` runs one process's listeners, signals (SIGTERM/SIGINT drain, SIGHUP
reloads, SIGUSR1 reopens the access log) and the final drain.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import sys
from dataclasses import dataclass

from keyproxy.app import ProxyServer, freeze_long_lived
from keyproxy.config import ConfigError
from keyproxy.config.reload import ConfigHolder, record_applied, unapplied_edit
from keyproxy.observability import log_event
from keyproxy.observe import METRICS_DIR_ENV, admin_exposure
from keyproxy.wire import client as wire_client
from keyproxy.wire.client import ClientConnection

#: Whether this install is the compiled build (`KEYPROXY_COMPILE=1`, setup.py): its
#: request path is C extensions. Logged at start, so an operator can tell which runs.
COMPILED = not (wire_client.__file__ or "").endswith(".py")


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # optional: keyproxy runs on the standard loop too
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@dataclass(frozen=True, slots=True)
class WorkerLink:
    """What a `serve --workers N` supervisor hands a worker: its sockets and a ready pipe."""

    listen_fds: list[int]
    admin_fds: list[int]
    ready_fd: int | None = None
    supervisor_pid: int | None = None


#: SIGHUP/SIGUSR1 received while starting, before the loop's handlers are in place.
_held_signals: set[int] = set()


def _hold_signal(signum: int, _frame: object = None) -> None:
    _held_signals.add(signum)


async def serve(
    holder: ConfigHolder,
    host: str | None = None,
    port: int | None = None,
    ready: asyncio.Future | None = None,
    sockets: list[socket.socket] | None = None,
    admin_sockets: list[socket.socket] | None = None,
    link: WorkerLink | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain. `ready` receives the bound (host, port).

    Without `sockets` the listeners are bound here (ListenError if taken).
    """
    from keyproxy.admin import start_admin
    from keyproxy.config.model import HostPort
    from keyproxy.wire.listeners import BACKLOG, bind

    loop = asyncio.get_running_loop()
    config = holder.config
    if sockets is None:
        listen = config.server.listen
        sockets = bind(
            HostPort(host or listen.host, listen.port if port is None else port),
            "port",
            "server.listen or --port",
        )
    if admin_sockets is None:
        admin_sockets = bind(config.server.admin_listen, "admin port", "server.admin_listen")
    proxy = ProxyServer(holder, loop)
    freeze_long_lived()
    servers = [
        await loop.create_server(lambda: ClientConnection(proxy), sock=sock, backlog=BACKLOG)
        for sock in sockets
    ]
    bound = sockets[0].getsockname()
    admin_bound = admin_sockets[0].getsockname()
    admin_runner = await start_admin(proxy, admin_sockets)
    proxy.observer.start()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, holder.reload_soon)
    loop.add_signal_handler(signal.SIGUSR1, proxy.observer.reopen_access_log)
    if signal.SIGHUP in _held_signals:  # the edit it announced may postdate the file read
        holder.reload_soon()
    _held_signals.clear()
    watcher = loop.create_task(holder.watch())
    log_event(
        "listening",
        url=f"http://{_host_for_url(bound[0])}:{bound[1]}",
        admin=f"http://{_host_for_url(admin_bound[0])}:{admin_bound[1]}",
        config=config.summary(),
        pid=os.getpid(),
        compiled=COMPILED,
    )
    exposed = admin_exposure(config.server.admin_listen.host)
    if exposed is not None:
        log_event("warning", message=exposed)
    orphan_watch = None
    shared = os.environ.get(METRICS_DIR_ENV) if link is not None else None
    if shared:
        record_applied(shared, holder.applied)
        holder.subscribe(lambda _config: record_applied(shared, holder.applied))
    if link is not None:
        if config.rate_limits.store == "memory":
            log_event(
                "warning",
                message="rate limits and quotas are counted per worker with the memory store; "
                "use rate_limits.store: redis://... to share them",
            )
        if link.ready_fd is not None:
            os.write(link.ready_fd, b"1")  # the supervisor stops counting this start as a crash
            os.close(link.ready_fd)
        if link.supervisor_pid is not None:
            orphan_watch = loop.create_task(_stop_when_orphaned(link.supervisor_pid, stop))
    if ready is not None and not ready.done():
        ready.set_result((bound[0], bound[1]))
    # The startup snapshot must not outlive the first reload (100,000 keys: ~60 MB).
    del config
    await stop.wait()
    log_event("draining", connections=len(proxy.connections))
    for server in servers:
        server.close()
    watcher.cancel()
    if orphan_watch is not None:
        orphan_watch.cancel()
    await proxy.drain(holder.config.server.drain_timeout)
    await admin_runner.cleanup()
    proxy.observer.close()
    log_event("stopped")
    return 0


async def _stop_when_orphaned(supervisor_pid: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (SIGKILL) drains and exits instead of holding the port."""
    while os.getppid() == supervisor_pid:
        await asyncio.sleep(1.0)
    log_event("supervisor_gone", supervisor_pid=supervisor_pid)
    stop.set()


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run(
    config_path: str,
    host: str | None,
    port: int | None,
    workers: int = 1,
    link: WorkerLink | None = None,
) -> int:
    """Run in this process, or supervise `workers` processes sharing the listening sockets.

    The sockets are bound here, before anything else starts, so a taken port is
    one line on stderr and a non-zero exit in both modes.
    """
    from keyproxy.config.model import HostPort
    from keyproxy.wire.listeners import ListenError, bind, inherited, raise_fd_limit

    # Until the loop's handlers are in place, SIGHUP and SIGUSR1 would kill the process
    # (their default), and a large registry takes seconds to load: logrotate's SIGUSR1
    # then took the server down. Held meanwhile, not ignored: a SIGHUP for an edit made
    # after the file was read reloads it once the server is up (the log is opened after
    # any rotation anyway).
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, _hold_signal)
    shared = os.environ.get(METRICS_DIR_ENV) if link is not None else None
    if shared:
        refused = unapplied_edit(shared, config_path)
        if refused is not None:
            print(f"keyproxy: {refused}", file=sys.stderr)
            return 1
    try:
        holder = ConfigHolder.load(config_path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    # Before binding, so the listeners' own descriptors count against the raised limit;
    # a worker inherits the supervisor's.
    fd_limits = raise_fd_limit() if link is None else None
    server = holder.config.server
    try:
        if link is not None:
            sockets, admin_sockets = inherited(link.listen_fds), inherited(link.admin_fds)
        else:
            listen = HostPort(
                host or server.listen.host, server.listen.port if port is None else port
            )
            sockets = bind(listen, "port", "server.listen or --port")
            try:
                admin_sockets = bind(
                    server.admin_listen,
                    "admin port",
                    f"server.admin_listen in {config_path} to a free port "
                    '(e.g. admin_listen: "127.0.0.1:9902")',
                )
            except ListenError:
                for sock in sockets:
                    sock.close()
                raise
    except ListenError as exc:
        print(f"keyproxy: {exc}", file=sys.stderr)
        return 1
    if fd_limits is not None:
        log_event("fd_limit", soft=fd_limits[0], hard=fd_limits[1])
    if workers > 1:
        from keyproxy.workers import supervise

        drain_timeout = server.drain_timeout
        # The supervisor only checked the file: the workers load their own copy, so a
        # large key list is not kept in memory once more for the supervisor's lifetime.
        del holder, server
        gc.collect()
        return supervise(config_path, sockets, admin_sockets, workers, drain_timeout)
    install_uvloop()
    return asyncio.run(serve(holder, sockets=sockets, admin_sockets=admin_sockets, link=link))
