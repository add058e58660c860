"""Listening sockets, bound once per start and never shared with another program.

keyproxy binds its public and admin sockets itself, without SO_REUSEPORT: a
port another process holds is a start-up error, never a port silently split
with an unrelated server (which would keep a key revoked in one config working
on the other half of the traffic). With `serve --workers N` the supervisor binds
and the workers inherit the very same sockets, as gunicorn and uvicorn do; the
kernel then hands each new connection to one worker that is accepting.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import socket

from keyproxy.config.model import HostPort

#: Connections the kernel queues for an accept; a worker restart or a burst must not
#: turn into refused connections.
BACKLOG = 2048


class ListenError(Exception):
    """A socket that cannot be bound; the message is the one line to print."""


def bind(address: HostPort, what: str, setting: str) -> list[socket.socket]:
    """Listening sockets for every address `address.host` resolves to.

    `what` names the listener in messages ("port", "admin port") and `setting`
    says what to change ("server.listen or --port"). IPv6 sockets are IPv6-only,
    as asyncio makes them, so `[::]` and `0.0.0.0` can be listed side by side.
    """
    host = address.host or None
    try:
        infos = socket.getaddrinfo(
            host, address.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror:
        raise ListenError(
            f"cannot listen on {address}: the host name does not resolve; set {setting}"
        ) from None
    sockets: list[socket.socket] = []
    port = address.port
    seen: set[tuple[int, tuple]] = set()
    try:
        for family, kind, proto, _, sockaddr in infos:
            if (family, sockaddr[:2]) in seen:
                continue
            seen.add((family, sockaddr[:2]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Port 0 on a name with several addresses: one port for all of them.
            where = (sockaddr[0], port, *sockaddr[2:])
            try:
                sock.bind(where)
            except OSError as exc:
                raise ListenError(_bind_problem(exc, address, what, setting)) from None
            port = sock.getsockname()[1]
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise ListenError(f"cannot listen on {address}: no address to bind; set {setting}")
    return sockets


def _bind_problem(exc: OSError, address: HostPort, what: str, setting: str) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{what} {address.port} is in use: another process listens on {address} "
            f"(stop it, or pick another port); set {setting}"
        )
    if exc.errno == errno.EACCES:
        return (
            f"cannot listen on {address}: permission denied (ports below 1024 need root or "
            f"CAP_NET_BIND_SERVICE); set {setting}"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {address}: no such address on this machine; set {setting}"
    return f"cannot listen on {address}: {exc.strerror or exc}; set {setting}"


def inherited(fds: list[int]) -> list[socket.socket]:
    """The listening sockets a supervisor handed down (their family is read from the fd)."""
    sockets = [socket.socket(fileno=fd) for fd in fds]
    for sock in sockets:
        sock.setblocking(False)
    return sockets


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; (soft, hard) as they are afterwards.

    Every client connection and every upstream connection is a descriptor; the
    usual soft default of 1024 would refuse clients long before the machine is busy.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = 1 << 20  # Linux refuses "unlimited" for descriptors (fs.nr_open)
    if soft != resource.RLIM_INFINITY and soft < target:
        # On failure the soft limit stays; the log line says what it is.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
