"""The C relay thread (forwarder/_crelay.c): on its own over real loopback TCP socket pairs, then inside a worker
(byte counts, idle timeout). tests/test_relay_raw.py runs raw mode's end-to-end tests against it and PyRaw alike."""

from __future__ import annotations

import asyncio
import hashlib
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for_async
from relaykit import busy_connection, echo, idle_fds, is_raw, only_connection, run, sink, use_raw, worker_for

from forwarder import rawmode, resources


@pytest.fixture
def crelay(monkeypatch: pytest.MonkeyPatch) -> Any:
    use_raw("c", monkeypatch)
    return rawmode.CRELAY


def tcp_pair(mss: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected loopback pair; `mss` clamps its segments as a 1500-byte MTU would (loopback's are 64 KiB)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.socket()
        if mss is not None:
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
            a.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        a.connect(listener.getsockname())
        b, _ = listener.accept()
    return a, b


class Relayed:
    """client <-> [relay: fd0 | fd1] <-> node, each a real TCP connection on loopback."""

    def __init__(self, thread: Any, mss: int | None = None) -> None:
        self.client, mine = tcp_pair(mss)
        theirs, self.node = tcp_pair(mss)
        mine.setblocking(False)
        theirs.setblocking(False)
        self.fds = (mine.fileno(), theirs.fileno())
        self.link = thread.add(*self.fds)
        mine.detach()
        theirs.detach()

    def close(self) -> None:
        self.link.stop()
        self.client.close()
        self.node.close()


@contextmanager
def relay_thread(crelay: Any, pipe_limit: int = 8) -> Iterator[Any]:
    thread = crelay.Relay(pipe_limit)
    try:
        yield thread
    finally:
        thread.close()


def send_all(sock: socket.socket, payload: bytes, shut: bool = True) -> threading.Thread:
    def go() -> None:
        sock.sendall(payload)
        if shut:
            sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=go)
    sender.start()
    return sender


def read_to_eof(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def wait_done(thread: Any, timeout_s: float = 10.0) -> list[tuple[int, bool]]:
    """Wait on the thread's eventfd, as the worker's loop does, and collect what finished."""
    readable, _, _ = select.select([thread.fileno()], [], [], timeout_s)
    assert readable, "the relay thread should have reported a finished connection"
    return list(thread.done())


@pytest.mark.parametrize("mss", [None, 1448], ids=["loopback", "mss-1448"])
def test_bytes_flow_both_ways_at_once_and_are_counted(crelay: Any, mss: int | None) -> None:
    up, down = os.urandom(3 * 1024 * 1024 + 7), os.urandom(5 * 1024 * 1024 + 3)
    with relay_thread(crelay) as thread:
        pair = Relayed(thread, mss)
        senders = [send_all(pair.client, up), send_all(pair.node, down)]
        got_up, got_down = read_to_eof(pair.node), read_to_eof(pair.client)
        for sender in senders:
            sender.join()
        assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
        assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
        assert wait_done(thread) == [(pair.link.id, False)]
        assert pair.link.state() == "done"
        assert pair.link.counts() == (len(up), len(down))
        assert pair.link.stop() == (len(up), len(down))
        assert pair.link.state() == "stopped"
        stats = thread.stats()
        assert stats["pipes_open"] == stats["pipes_pooled"] > 0, "bulk should have been spliced, pipes given back"
        pair.close()


def test_counts_start_from_what_python_counted_before_the_handover(crelay: Any) -> None:
    with relay_thread(crelay) as thread:
        client, mine = tcp_pair()
        theirs, node = tcp_pair()
        link = thread.add(mine.detach(), theirs.detach(), 100, 200)
        client.sendall(b"x" * 10)
        assert node.recv(10) == b"x" * 10
        assert link.counts() == (110, 200)
        link.stop()
        client.close()
        node.close()


def test_half_close_passes_the_eof_and_the_reply_still_arrives(crelay: Any) -> None:
    with relay_thread(crelay) as thread:
        pair = Relayed(thread)
        pair.client.sendall(b"request")
        pair.client.shutdown(socket.SHUT_WR)
        assert read_to_eof(pair.node) == b"request", "the client's EOF should reach the node"
        assert pair.link.state() == "running", "the other direction is still open"
        pair.node.sendall(b"late reply")
        pair.node.close()
        assert read_to_eof(pair.client) == b"late reply"
        assert wait_done(thread) == [(pair.link.id, False)]
        pair.close()


def test_a_reset_is_reported_as_failed(crelay: Any) -> None:
    with relay_thread(crelay) as thread:
        pair = Relayed(thread)
        pair.client.sendall(b"ping")
        assert pair.node.recv(4) == b"ping"
        pair.node.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        pair.node.close()  # SO_LINGER 0: RST
        assert wait_done(thread) == [(pair.link.id, True)]
        assert pair.link.state() == "failed"
        pair.link.stop()
        pair.client.settimeout(10)
        assert pair.client.recv(10) == b"", "stop closes the relay's sockets: the client sees the end"
        pair.client.close()


def test_stop_closes_both_descriptors_and_a_dropped_link_does_too(crelay: Any) -> None:
    with relay_thread(crelay) as thread:
        pair = Relayed(thread)
        pair.link.stop()
        pair.link.stop()  # twice is harmless
        for fd in pair.fds:
            with pytest.raises(OSError):
                os.fstat(fd)
        pair.client.close()
        pair.node.close()

        before = len(os.listdir("/proc/self/fd"))
        dropped = Relayed(thread)
        dropped.client.close()
        dropped.node.close()
        del dropped  # never stopped: deallocating the link closes its descriptors
        assert len(os.listdir("/proc/self/fd")) == before


def test_the_thread_holds_back_a_fast_node_for_a_reader_that_stopped(crelay: Any) -> None:
    with relay_thread(crelay) as thread:
        pair = Relayed(thread)
        pair.node.setblocking(False)
        sent, refused = 0, 0
        deadline = time.monotonic() + 10
        while refused < 5 or not pair.link.pending()[1]:  # until every buffer on the way is full
            assert time.monotonic() < deadline, "the relay should stop reading from the node at some point"
            try:
                sent += pair.node.send(b"z" * 65536)
                refused = 0
            except BlockingIOError:
                refused += 1
                time.sleep(0.05)
        read_from_node = pair.link.counts()[1]
        time.sleep(0.3)
        assert pair.link.counts()[1] == read_from_node, "the relay should not read while the client cannot take it"
        assert 0 < pair.link.pending()[1] <= rawmode.SPLICE_CHUNK
        assert pair.link.pending()[0] == 0
        pair.node.setblocking(True)
        pair.node.shutdown(socket.SHUT_WR)
        received = read_to_eof_count(pair.client)
        assert received == sent
        pair.close()


def read_to_eof_count(sock: socket.socket) -> int:
    sock.settimeout(30)
    total = 0
    while data := sock.recv(1 << 20):
        assert data.strip(b"z") == b""
        total += len(data)
    return total


def test_many_connections_at_once_under_a_tight_pipe_limit(crelay: Any) -> None:
    with relay_thread(crelay, pipe_limit=2) as thread:
        pairs = [Relayed(thread) for _ in range(24)]
        payloads = [os.urandom(64 * 1024 * (1 + i % 5) + i) for i in range(len(pairs))]
        senders = [send_all(p.client, payload) for p, payload in zip(pairs, payloads, strict=True)]
        echoes = [send_all(p.node, payload[::-1]) for p, payload in zip(pairs, payloads, strict=True)]
        for p, payload in zip(pairs, payloads, strict=True):
            assert read_to_eof(p.node) == payload
            assert read_to_eof(p.client) == payload[::-1]
        for sender in senders + echoes:
            sender.join()
        finished: set[int] = set()
        while len(finished) < len(pairs):
            finished.update(link_id for link_id, failed in wait_done(thread) if not failed)
        assert finished == {p.link.id for p in pairs}
        assert thread.stats()["pipes_open"] <= 2
        for p in pairs:
            p.close()


def test_no_pipes_means_copies(crelay: Any) -> None:
    with relay_thread(crelay, pipe_limit=0) as thread:
        pair = Relayed(thread)
        payload = os.urandom(2 * 1024 * 1024)
        sender = send_all(pair.client, payload)
        assert read_to_eof(pair.node) == payload
        sender.join()
        assert thread.stats()["pipes_open"] == 0
        pair.close()


def test_the_thread_starts_and_stops_with_the_relay(crelay: Any) -> None:
    def threads() -> int:
        names = [Path(f"/proc/self/task/{tid}/comm").read_text().strip() for tid in os.listdir("/proc/self/task")]
        return names.count("natfwd-relay")

    before = threads()
    thread = crelay.Relay(0)
    assert threads() == before + 1
    thread.close()
    thread.close()
    assert threads() == before
    client, mine = tcp_pair()
    with pytest.raises(RuntimeError, match="closed"):
        thread.add(mine.fileno(), client.fileno())
    os.fstat(mine.fileno())  # refused: the descriptors are still the caller's
    client.close()
    mine.close()


def test_bad_arguments_are_refused(crelay: Any) -> None:
    with pytest.raises(ValueError, match="pipe_limit"):
        crelay.Relay(-1)
    with relay_thread(crelay) as thread:
        with pytest.raises(ValueError, match="distinct"):
            thread.add(-1, 5)
        a, b = tcp_pair()
        with pytest.raises(ValueError, match="distinct"):
            thread.add(a.fileno(), a.fileno())
        with pytest.raises(OSError):
            thread.add(a.fileno(), 10_000)  # not open: epoll refuses it, and the first one is left as it was
        os.fstat(a.fileno())
        a.close()
        b.close()


def test_constants_match_the_python_side(crelay: Any) -> None:
    names = ("COPY_READ", "SPLICE_CHUNK", "SEGMENT_BUDGET", "SPLICE_BURST", "BULK_MIN", "COPY_AFTER_SMALL",
             "PIPE_POOL_LIMIT")  # fmt: skip
    for name in names:
        assert getattr(crelay, name) == getattr(resources if name == "PIPE_POOL_LIMIT" else rawmode, name), name


def test_splices_are_whole_packets_of_the_socket_written(crelay: Any) -> None:
    """A splice moves a whole number of the packets TCP makes on the socket it writes (at most SEGMENT_BUDGET of
    whole segments each), so no runt follows each chunk. Loopback's segments already divide 64 KiB; a UNIX socket
    has none."""
    a, b = tcp_pair(1448)
    mss = b.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    assert 1000 < mss <= 1448  # less the timestamp option
    chunk = rawmode.splice_chunk(b)
    assert chunk == crelay.splice_chunk(b.fileno())
    assert chunk % mss == 0 and rawmode.SEGMENT_BUDGET - mss < chunk <= rawmode.SEGMENT_BUDGET < rawmode.SPLICE_CHUNK
    c, d = tcp_pair()
    assert rawmode.SPLICE_CHUNK % d.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) == 0
    assert rawmode.splice_chunk(d) == crelay.splice_chunk(d) == rawmode.SPLICE_CHUNK
    e, f = socket.socketpair()
    assert rawmode.splice_chunk(f) == crelay.splice_chunk(f) == rawmode.SPLICE_CHUNK
    for sock in (a, b, c, d, e, f):
        sock.close()


# --- inside a worker -------------------------------------------------------------------------------------------


def test_a_worker_counts_the_threads_bytes(crelay: Any) -> None:
    async def main() -> None:
        server, target = await sink(echo)
        async with worker_for(target) as (worker, port):
            reader, writer = await busy_connection(port)
            conn = only_connection(worker)
            assert conn.link is not None
            payload = os.urandom(3 * 1024 * 1024)
            writer.write(payload)
            assert await reader.readexactly(len(payload)) == payload
            worker.state.account(conn)  # what the metrics sweep does while the connection lives
            ping_bytes = sum(len(f"ping {i}\n") for i in range(20))  # what ping_pong sent
            assert conn.seen_to_node == conn.seen_to_client == ping_bytes + len(payload)
            writer.write(b"bye\n")
            writer.write_eof()
            assert await reader.read() == b"bye\n"
            writer.close()
            await wait_for_async(lambda: worker.active == 0, "the connection to close")
            assert conn.seen_to_node == conn.seen_to_client == ping_bytes + len(payload) + 4
        server.close()

    run("uvloop", main)


def test_idle_timeout_sees_through_the_thread(crelay: Any) -> None:
    """A raw connection that keeps moving bytes stays; one that goes quiet is closed after idle_timeout_s."""

    async def main() -> None:
        server, target = await sink(echo)
        async with worker_for(target, idle_timeout_s=0.4) as (worker, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for i in range(40):  # 1.2 s of traffic, three times the timeout
                writer.write(b"ping %d\n" % i)
                await reader.readline()
                if i == 20:
                    assert is_raw(only_connection(worker)) and only_connection(worker).link is not None
                await asyncio.sleep(0.03)
            assert await asyncio.wait_for(reader.read(), 5) == b"", "once quiet, the connection is closed"
            writer.close()
            await wait_for_async(lambda: worker.active == 0, "the connection to close")
        server.close()

    run("uvloop", main)


def test_a_thread_that_cannot_start_leaves_raw_mode_in_python(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoThreads:
        starts = 0

        @classmethod
        def Relay(cls, pipe_limit: int, threaded: bool = True) -> Any:  # noqa: N802 (the extension's class name)
            cls.starts += 1
            raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(rawmode, "CRELAY", NoThreads)

    async def main() -> None:
        server, target = await sink(echo)
        async with worker_for(target) as (worker, port):
            for _ in range(2):
                reader, writer = await busy_connection(port)
                conn = only_connection(worker)
                assert is_raw(conn) and conn.link is None, "raw mode should fall back to Python"
                writer.close()
                await wait_for_async(lambda: worker.active == 0, "the connection to close")
            assert NoThreads.starts == 1, "a thread that failed to start is not retried for every connection"
            assert worker.pool.extra_fds == 2 * len(worker.pool.pipes)
        server.close()

    run("uvloop", main)


@pytest.mark.parametrize("off", [False, True])
def test_without_the_extension_natfwd_warns_once_unless_turned_off(
    off: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from forwarder import extensions

    monkeypatch.setattr(rawmode, "CRELAY", None)
    monkeypatch.setattr(extensions, "OFF", off)
    monkeypatch.setattr(extensions, "_warned", set())

    async def main() -> None:
        server, target = await sink(echo)
        async with worker_for(target) as (worker, port):
            for _ in range(2):
                _reader, writer = await busy_connection(port)
                assert is_raw(only_connection(worker))
                writer.close()
                await wait_for_async(lambda: worker.active == 0, "the connection to close")
        server.close()

    with caplog.at_level("WARNING", logger="natfwd.relay"):
        run("uvloop", main)
    warnings = [r.getMessage() for r in caplog.records if "raw mode in Python" in r.getMessage()]
    assert len(warnings) == (0 if off else 1), warnings
    assert off or "apt-get install gcc python3-dev" in warnings[0]


def test_aborting_connections_while_the_thread_moves_their_bytes(crelay: Any) -> None:
    """Half of 24 busy connections are aborted mid-transfer (as a drain or the idle timeout does) while the thread
    is moving their bytes; the other half still get every byte, and nothing is left behind."""

    ready: list[int] = []
    go = asyncio.Event()

    async def transfer(port: int, size: int) -> str:
        """`intact`, `cut` (a true prefix, then the end), or `corrupt`."""
        reader, writer = await busy_connection(port)
        payload = os.urandom(size)
        ready.append(1)
        await go.wait()

        async def send() -> None:
            try:
                for i in range(0, size, 256 * 1024):
                    writer.write(payload[i : i + 256 * 1024])
                    await writer.drain()
                writer.write_eof()
            # Reset: uvloop then refuses writes on the closed transport, and write_eof's shutdown() says ENOTCONN.
            except (OSError, RuntimeError):
                pass

        sender = asyncio.create_task(send())
        received = bytearray()
        try:
            while data := await asyncio.wait_for(reader.read(1 << 20), 30):
                received += data
        except TimeoutError:  # an OSError too: a connection that neither moves nor ends is a failure, not a cut
            raise
        except OSError:  # ECONNRESET, or the ENOTCONN of a shutdown() after the reset, which uvloop reports here
            pass
        await sender
        writer.close()
        if received == payload:
            return "intact"
        return "cut" if payload.startswith(received) else "corrupt"

    async def main() -> None:
        server, target = await sink(echo)
        async with worker_for(target, drain_timeout_s=1) as (worker, port):
            transfers = [asyncio.create_task(transfer(port, 4 * 1024 * 1024)) for _ in range(24)]
            await wait_for_async(lambda: len(ready) == 24, "every connection to go raw")
            conns = sorted((c for r in worker.routes.values() for c in r.connections), key=id)
            assert len(conns) == 24 and all(c.link is not None for c in conns), "all should be in the relay thread"
            go.set()

            def moving() -> bool:  # every connection well into its transfer, through the thread
                for c in conns:
                    c.sync_counts()
                return all(c.nbytes > 256 * 1024 for c in conns)

            await wait_for_async(moving, "every transfer to be under way")
            for conn in conns[::2]:
                conn.abort()
                if conn.peer is not None:
                    conn.peer.abort()
            results = await asyncio.gather(*transfers)
            assert "corrupt" not in results, "an aborted connection must end, never deliver wrong bytes"
            assert results.count("intact") >= 12, results
            assert "cut" in results, "the aborts should have come while the thread was moving bytes"
            await wait_for_async(lambda: worker.active == 0, "every connection to close")
            assert not worker.pool.links
            assert worker.pool.extra_fds == idle_fds(worker.pool)
        server.close()

    run("uvloop", main)
