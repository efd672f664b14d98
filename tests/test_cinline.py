"""The inline C relay (`_crelay.Relay(threaded=False)`, direct.InlineClient's) and the extension's accept, on their
own over real loopback TCP sockets: what each report says, and when. tests/test_relay.py and test_relay_raw.py run
the end-to-end tests on the `inline` path."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from relaykit import use_raw

from forwarder import rawmode, resources

DONE, FAILED, CONNECTED, CONNECT_FAILED, BUSY = (
    resources.REPORT_DONE,
    resources.REPORT_FAILED,
    resources.REPORT_CONNECTED,
    resources.REPORT_CONNECT_FAILED,
    resources.REPORT_BUSY,
)


@pytest.fixture
def crelay(monkeypatch: pytest.MonkeyPatch) -> Any:
    use_raw("c", monkeypatch)
    return rawmode.CRELAY


@contextmanager
def inline_relay(crelay: Any) -> Iterator[Any]:
    relay = crelay.Relay(8, threaded=False)
    try:
        yield relay
    finally:
        relay.close()


def client_pair() -> tuple[socket.socket, int]:
    """A loopback connection: the client's end, and the accepted end's descriptor (non-blocking, for the relay)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        mine, _ = listener.accept()
    mine.setblocking(False)
    return client, mine.detach()


def reports(relay: Any, want: int, timeout_s: float = 10.0) -> list[tuple[int, int, int]]:
    """Run the relay as the worker's loop does (when its epoll set is readable) until a report of kind `want`."""
    seen: list[tuple[int, int, int]] = []
    deadline = os.times().elapsed + timeout_s
    while not any(kind == want for _, kind, _ in seen):
        left = deadline - os.times().elapsed
        assert left > 0, f"no report of kind {want}: {seen}"
        select.select([relay.fileno()], [], [], left)
        seen += relay.run()
    return seen


def connect_one(
    relay: Any, node_listener: socket.socket, handoff: int = 0
) -> tuple[socket.socket, socket.socket, Any, list[tuple[int, int, int]]]:
    """A client relayed to a node that accepted it: (client, node, link, the reports until CONNECTED)."""
    client, fd = client_pair()
    link = relay.connect(fd, socket.AF_INET, "127.0.0.1", node_listener.getsockname()[1], handoff)
    node, _ = node_listener.accept()
    return client, node, link, reports(relay, CONNECTED)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(10)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return data


def test_a_connect_is_reported_then_bytes_flow_and_the_first_eof_is_named(crelay: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as node_listener, inline_relay(crelay) as relay:
        client, node, link, got = connect_one(relay, node_listener)
        assert [(i, k) for i, k, _ in got] == [(link.id, CONNECTED)]
        assert 0 <= got[0][2] < 10 * 10**9, "the connect's duration, in nanoseconds"
        assert not link.connecting and link.state() == "running"

        client.sendall(b"get k\r\n")
        select.select([relay.fileno()], [], [], 5)
        assert relay.run() == [], "nothing to report until the end"
        assert recv_exactly(node, 7) == b"get k\r\n"
        node.sendall(b"END\r\n")
        select.select([relay.fileno()], [], [], 5)
        relay.run()
        assert recv_exactly(client, 5) == b"END\r\n"

        client.shutdown(socket.SHUT_WR)  # the client's EOF first: passed on as a half-close
        select.select([relay.fileno()], [], [], 5)
        assert relay.run() == []
        node.settimeout(10)
        assert node.recv(10) == b""
        node.close()
        assert reports(relay, DONE) == [(link.id, DONE, 0)]
        assert link.stop() == (7, 5)
        client.settimeout(10)
        assert client.recv(10) == b""
        client.close()


def test_the_node_closing_first_is_named(crelay: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as node_listener, inline_relay(crelay) as relay:
        client, node, link, _ = connect_one(relay, node_listener)
        node.close()
        select.select([relay.fileno()], [], [], 5)
        assert relay.run() == []
        client.settimeout(10)
        assert client.recv(10) == b""
        client.close()
        assert reports(relay, DONE) == [(link.id, DONE, 1)]
        link.stop()


def test_a_refused_connect_is_reported_with_its_errno_and_the_client_stays_open_until_stopped(crelay: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    with inline_relay(crelay) as relay:
        client, fd = client_pair()
        link = relay.connect(fd, socket.AF_INET, "127.0.0.1", port)
        assert link.connecting
        assert reports(relay, CONNECT_FAILED) == [(link.id, CONNECT_FAILED, errno.ECONNREFUSED)]
        os.fstat(fd)  # still open: the owner reads what the client sent before it closes
        link.stop()
        with pytest.raises(OSError):
            os.fstat(fd)
        client.close()


def test_a_node_reset_fails_the_link_on_the_node_side(crelay: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as node_listener, inline_relay(crelay) as relay:
        client, node, link, _ = connect_one(relay, node_listener)
        node.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        node.close()  # a reset
        assert reports(relay, FAILED) == [(link.id, FAILED, 1)]
        link.stop()
        client.close()


def test_a_busy_link_is_reported_once_and_moves_to_the_thread_with_its_id(crelay: Any) -> None:
    thread = crelay.Relay(8)
    with socket.create_server(("127.0.0.1", 0)) as node_listener, inline_relay(crelay) as relay:
        client, node, link, _ = connect_one(relay, node_listener, handoff=3)
        seen: list[tuple[int, int, int]] = []
        for n in range(3):
            client.sendall(b"ping %d\r\n" % n)
            select.select([relay.fileno()], [], [], 5)
            seen += relay.run()
            assert recv_exactly(node, 8) == b"ping %d\r\n" % n
        assert seen == [(link.id, BUSY, 0)]
        assert thread.adopt(link)
        assert not thread.adopt(link), "a link already in the thread stays there"
        client.sendall(b"more\r\n")
        assert recv_exactly(node, 6) == b"more\r\n"
        assert relay.run() == [], "the inline relay no longer watches it"
        client.close()
        node.close()
        select.select([thread.fileno()], [], [], 10)
        assert thread.done() == [(link.id, False)]
        assert link.stop() == (3 * 8 + 6, 0)
    thread.close()


def test_connect_refuses_what_is_not_an_ip_address(crelay: Any) -> None:
    with inline_relay(crelay) as relay:
        client, fd = client_pair()
        with pytest.raises(ValueError, match="not an IP address"):
            relay.connect(fd, socket.AF_INET, "cache.example", 11211)
        os.close(fd)  # not taken
        client.close()


def test_a_threaded_relay_does_not_connect_or_run(crelay: Any) -> None:
    thread = crelay.Relay(0)
    try:
        with pytest.raises(RuntimeError, match="inline"):
            thread.run()
        with pytest.raises(RuntimeError, match="inline"):
            thread.connect(0, socket.AF_INET, "127.0.0.1", 1)
    finally:
        thread.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_accept_gives_a_non_blocking_socket_the_clients_ip_and_its_pending_error(crelay: Any, host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family) as listener:
        listener.setblocking(False)
        assert crelay.accept(listener) is None, "nothing queued"
        with socket.create_connection(listener.getsockname()[:2]) as client:
            select.select([listener], [], [], 5)
            accepted = crelay.accept(listener.fileno())
            assert accepted is not None
            fd, ip, error = accepted
            try:
                assert (ip, error) == (host, 0)
                assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
                assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
                client.sendall(b"x")
                select.select([fd], [], [], 5)
                assert os.read(fd, 10) == b"x"
            finally:
                os.close(fd)

        reset = socket.create_connection(listener.getsockname()[:2])
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()  # a reset while queued for accept
        select.select([listener], [], [], 5)
        accepted = crelay.accept(listener)
        assert accepted is not None
        os.close(accepted[0])
        assert accepted[2] == errno.ECONNRESET
