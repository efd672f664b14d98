"""Socket helpers in one place: TCP options, duplicates of a transport's socket, and non-blocking reads and writes."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

# The would-block family: nothing to read, or no room to write, right now. Both are OSError subclasses, so they
# must be caught before OSError, which means the connection failed.
AGAIN = (BlockingIOError, InterruptedError)  # a non-blocking call found nothing to do: not an error
_read = os.read
_write = os.write


def plain_socket(transport: asyncio.BaseTransport) -> Any:
    """The transport's TCP socket, or None for TLS (bypassing the transport would bypass the encryption) and non-TCP."""
    if transport.get_extra_info("ssl_object") is not None:
        return None
    sock: Any = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return None
    return sock


def duplicate(transport: asyncio.BaseTransport) -> socket.socket:
    """A non-blocking duplicate of a plain transport's socket; raises OSError (EMFILE) when there is none to spare."""
    sock = socket.socket(fileno=os.dup(plain_socket(transport).fileno()))
    sock.setblocking(False)
    return sock


def set_nodelay(sock: socket.socket) -> None:
    """Send small writes at once: a request or reply is one write, and Nagle would hold it for the previous ACK."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_keepalive(sock: socket.socket, idle_s: int, interval_s: int = 10, probes: int = 3) -> None:
    """Probe the peer after `idle_s` of silence: a connection the peer (or a firewall on the way) dropped without a
    word is then found while idle, not by the next write."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", interval_s), ("TCP_KEEPCNT", probes)):
        if hasattr(socket, option):  # Linux; macOS has only some of them
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def read(fd: int, size: int, failed: Callable[[OSError], object]) -> bytes | None:
    """One non-blocking read of up to `size` bytes: the bytes (b"" at EOF), or None when there are none yet, or
    when the connection failed, after calling `failed(exc)`."""
    try:
        return _read(fd, size)
    except AGAIN:
        return None
    except OSError as exc:
        failed(exc)
        return None


def write(fd: int, data: bytes | bytearray | memoryview, failed: Callable[[OSError], object]) -> int:
    """One non-blocking write: how many bytes the socket took (0 when it is full), or -1 when the connection failed,
    after calling `failed(exc)`."""
    try:
        return _write(fd, data)
    except AGAIN:
        return 0
    except OSError as exc:
        failed(exc)
        return -1
