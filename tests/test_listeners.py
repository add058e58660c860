"""Binding the listening sockets: exclusive, and a taken port is one clear sentence."""

from __future__ import annotations

import resource
import socket

import pytest

from keyproxy.config.model import HostPort
from keyproxy.wire.listeners import ListenError, bind, inherited, raise_fd_limit


def test_a_taken_port_names_the_port_and_the_setting() -> None:
    first = bind(HostPort("127.0.0.1", 0), "port", "server.listen or --port")
    port = first[0].getsockname()[1]
    try:
        with pytest.raises(ListenError) as caught:
            bind(HostPort("127.0.0.1", port), "port", "server.listen or --port")
        message = str(caught.value)
        assert message.startswith(f"port {port} is in use")
        assert message.endswith("set server.listen or --port") and "\n" not in message
    finally:
        for sock in first:
            sock.close()


def test_sockets_are_exclusive_even_against_so_reuseport() -> None:
    """A process that sets SO_REUSEPORT itself still cannot share keyproxy's port."""
    ours = bind(HostPort("127.0.0.1", 0), "port", "server.listen")
    port = ours[0].getsockname()[1]
    try:
        assert not ours[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError), other:
            other.bind(("127.0.0.1", port))
    finally:
        for sock in ours:
            sock.close()


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("192.0.2.1", "no such address on this machine"),
    ],
)
def test_other_bind_problems_are_one_sentence(host: str, problem: str) -> None:
    with pytest.raises(ListenError) as caught:
        bind(HostPort(host, 0), "admin port", "server.admin_listen")
    assert problem in str(caught.value) and str(caught.value).endswith("server.admin_listen")


def test_inherited_sockets_keep_their_address() -> None:
    ours = bind(HostPort("127.0.0.1", 0), "port", "server.listen")
    try:
        again = inherited([ours[0].fileno()])[0]
        assert again.family == socket.AF_INET and again.getsockname() == ours[0].getsockname()
        again.detach()  # the same descriptor: close it once
    finally:
        ours[0].close()


def test_raise_fd_limit_reaches_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_fd_limit() == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
