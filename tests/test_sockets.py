"""forwarder/sockets.py on real loopback TCP sockets: the options it sets, and the non-blocking read/write idiom."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from forwarder import sockets


@contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.setblocking(False)
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def test_options() -> None:
    with tcp_pair() as (sock, _):
        sockets.set_nodelay(sock)
        sockets.set_keepalive(sock, 30)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3


def test_read_and_write_tell_nothing_yet_from_data_eof_and_failure() -> None:
    failures: list[OSError] = []
    with tcp_pair() as (sock, peer):
        fd = sock.fileno()
        assert sockets.read(fd, 100, failures.append) is None  # nothing to read yet
        peer.sendall(b"hello")
        data = None
        while data is None:
            data = sockets.read(fd, 100, failures.append)
        assert data == b"hello"
        assert sockets.write(fd, b"world", failures.append) == 5
        assert peer.recv(5) == b"world"
        sent = sockets.write(fd, b"x" * (1 << 20), failures.append)
        while sent > 0:  # fill the socket and the peer's receive buffer: then it takes nothing
            sent = sockets.write(fd, b"x" * (1 << 20), failures.append)
        assert sent == 0 and not failures
        peer.shutdown(socket.SHUT_WR)
        data = None
        while data is None:
            data = sockets.read(fd, 100, failures.append)
        assert data == b""  # EOF
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()  # with unread data and linger 0: a reset
        while not failures:
            assert sockets.write(fd, b"y", failures.append) in (0, 1, -1)
        assert isinstance(failures[0], ConnectionError)
    failures.clear()
    assert sockets.read(fd, 1, failures.append) is None  # a closed descriptor: EBADF, a failure
    assert sockets.write(fd, b"z", failures.append) == -1
    assert len(failures) == 2


def test_duplicate_refuses_what_is_not_plain_tcp() -> None:
    class Transport:
        def __init__(self, extra: dict[str, object]) -> None:
            self.extra = extra

        def get_extra_info(self, name: str) -> object:
            return self.extra.get(name)

    with tcp_pair() as (sock, peer):
        plain = Transport({"socket": sock})
        assert sockets.plain_socket(plain) is sock  # type: ignore[arg-type]
        assert sockets.plain_socket(Transport({"socket": sock, "ssl_object": object()})) is None  # type: ignore[arg-type]
        dup = sockets.duplicate(plain)  # type: ignore[arg-type]
        try:
            assert dup.fileno() != sock.fileno() and not dup.getblocking()
            peer.sendall(b"via the duplicate")
            dup.settimeout(10)
            assert dup.recv(100) == b"via the duplicate"
        finally:
            dup.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        assert sockets.plain_socket(Transport({"socket": unix})) is None  # type: ignore[arg-type]
