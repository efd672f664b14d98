"""The relay in-process, on both the stdlib loop and uvloop and on both plain paths (direct: no transports; and the
transports): byte integrity, backpressure, half-close."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import socket
import struct
from typing import Any

import pytest
from conftest import free_port, wait_for_async
from relaykit import (
    LOOPS,
    PATHS,
    Firehose,
    LateReply,
    check_the_node_is_held_back,
    echo,
    run,
    set_path,
    sink,
    worker_for,
)

from forwarder import connection, direct, relay


@pytest.fixture(autouse=True, params=PATHS)
def relay_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The plain path the test's connections take."""
    path: str = request.param
    set_path(path, monkeypatch)
    return path


@pytest.mark.parametrize("loop_name", LOOPS)
def test_tiny_buffer_multi_megabyte_payload_both_ways(loop_name: str) -> None:
    """A 7-byte buffer against 2 MB each way: any reuse of a buffer the transport still holds corrupts the stream."""

    async def main() -> None:
        server, target = await sink(echo)
        async with worker_for(target, buffer_size=7) as (worker, port):
            payload = os.urandom(2 * 1024 * 1024)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)

            async def send(writer: asyncio.StreamWriter = writer, payload: bytes = payload) -> None:
                for i in range(0, len(payload), 300_000):
                    writer.write(payload[i : i + 300_000])
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            received = await asyncio.wait_for(reader.read(-1), 60)  # until EOF: half-close passed through
            await sender
            assert len(received) == len(payload)
            assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
            writer.close()
            assert worker.pool.size == 7
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_many_connections_large_payloads_intact(loop_name: str) -> None:
    async def main() -> None:
        server, target = await sink(echo)
        async with worker_for(target, buffer_size=4096) as (_worker, port):

            async def one(seed: int, port: int = port) -> None:
                payload = hashlib.sha256(str(seed).encode()).digest() * 30_000  # ~960 KB, distinct per client
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(payload)
                writer.write_eof()
                got = await reader.read(-1)
                writer.close()
                assert got == payload

            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(24))), 60)
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_half_close_client_eof_then_node_replies(loop_name: str) -> None:
    """The client shuts its write side; the node still answers, then closes: both directions finish cleanly."""

    async def main() -> None:
        server, target = await sink(LateReply())
        async with worker_for(target) as (worker, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x" * 1000)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(-1), 10) == b"got 1000"
            writer.close()
            await wait_for_async(lambda: worker.active == 0, "the connection to close", timeout_s=2.0)
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_slow_reader_pauses_the_node(loop_name: str) -> None:
    """A client that stops reading: the relay stops reading from the node instead of buffering everything."""
    firehose = Firehose()

    async def main() -> None:
        server, target = await sink(firehose)
        async with worker_for(target) as (worker, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
            await check_the_node_is_held_back(firehose, worker, reader, writer)
            writer.close()
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_unreachable_node_closes_client_promptly_and_counts(loop_name: str) -> None:
    async def main() -> None:
        dead_port = free_port()  # nothing listens here: connect is refused
        async with worker_for(dead_port) as (worker, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"version\r\n")
            data = await asyncio.wait_for(reader.read(-1), 60)  # only stops a hang
            assert data == b""
            writer.close()
            # Closed because the connect was refused, not by the connect timer running out.
            assert worker.metrics.upstream_errors.labels(str(port), "refused")._value.get() == 1
            assert worker.metrics.upstream_errors.labels(str(port), "timeout")._value.get() == 0
        await asyncio.sleep(0)

    run(loop_name, main)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Leave with a reset (SO_LINGER 0), not a FIN: a FIN is only a half-close, which still waits for the reply."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _never_accepting_listener() -> tuple[socket.socket, socket.socket]:
    """A port whose SYNs go unanswered: listen(0) with its one queue slot taken, so further connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())
    return listener, filler


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("client_leaves", [False, True])
def test_a_node_that_never_answers_times_out_unless_the_client_leaves_first(
    loop_name: str, client_leaves: bool
) -> None:
    """The connect timer closes the client and counts a timeout; a client that resets first cancels the connect
    quietly, and nothing is counted."""
    listener, filler = _never_accepting_listener()

    async def main() -> None:
        async with worker_for(listener.getsockname()[1], connect_timeout_s=0.5) as (worker, port):
            loop = asyncio.get_running_loop()
            started = loop.time()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"version\r\n")
            if client_leaves:
                await asyncio.sleep(0.1)
                _reset(writer)
            else:
                assert await asyncio.wait_for(reader.read(-1), 60) == b""  # the timeout only stops a hang
                assert loop.time() - started >= 0.4  # not before connect_timeout_s
                writer.close()
            await wait_for_async(lambda: worker.active == 0, "the connection to be gone")
            await asyncio.sleep(0.6)  # past the connect timeout: a timer left behind would fire now
            metric = worker.metrics.upstream_errors.labels(str(port), "timeout")
            assert metric._value.get() == (0 if client_leaves else 1)

    try:
        run(loop_name, main)
    finally:
        filler.close()
        listener.close()


async def counting_echo(reached: list[int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """echo, noting in `reached` each connection the node accepted."""
    reached.append(1)
    await echo(reader, writer)


def _slow_connects(monkeypatch: pytest.MonkeyPatch, delay_s: float) -> None:
    """Every node connection starts `delay_s` late: a slow network path, so clients act while it is being made."""
    original = connection.ClientHalf._connect

    async def slow(self: connection.ClientHalf, *args: Any) -> None:
        await asyncio.sleep(delay_s)
        await original(self, *args)

    monkeypatch.setattr(connection.ClientHalf, "_connect", slow)
    direct_connect = direct.DirectClient.connect

    def slow_direct(self: direct.DirectClient, *args: Any) -> None:
        # As connect does while the node connection is pending: the client watched, the timer as `expiry`.
        loop = self.state.loop
        self.state.poller.add_reader(self.sock.fileno(), self._read_early)
        self.watching = True

        def late() -> None:
            self.expiry = None
            direct_connect(self, *args)

        self.expiry = self.state.deadlines.add(loop.time(), delay_s, late)

    monkeypatch.setattr(direct.DirectClient, "connect", slow_direct)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("size", [0, 8 * relay.EARLY_LIMIT])
def test_bytes_and_eof_before_the_node_is_connected_all_arrive_in_order(
    loop_name: str, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request and EOF at once, as `printf 'version\r\n' | socat - TCP:...` sends them; and more than
    EARLY_LIMIT, where reading pauses until the node is connected."""
    _slow_connects(monkeypatch, 0.3)
    payload = b"version\r\n" + os.urandom(size)

    async def main() -> None:
        server_, target = await sink(echo)
        async with worker_for(target) as (_worker, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            writer.write_eof()
            received = await asyncio.wait_for(reader.read(-1), 10)
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            writer.close()
        server_.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_client_that_resets_while_the_node_connect_is_pending_is_dropped_at_once(
    loop_name: str, relay_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if relay_path == "inline":
        pytest.skip(
            "the inline relay does not watch the client while it connects (direct.InlineClient): such a client is "
            "dropped once connected, or at the connect timeout (test_a_node_that_never_answers_times_out...)"
        )
    _slow_connects(monkeypatch, 2.0)
    reached: list[int] = []

    async def main() -> None:
        server_, target = await sink(functools.partial(counting_echo, reached))
        async with worker_for(target) as (worker, port):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"version\r\n")
            await wait_for_async(lambda: worker.active == 1, "the connection to be accepted")
            await asyncio.sleep(0.05)
            _reset(writer)
            await wait_for_async(lambda: worker.active == 0, "the reset client to be dropped", timeout_s=1.0)
            await asyncio.sleep(2.2)  # past the slow connect: it was cancelled, so the node never sees it
            assert not reached
        server_.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_client_that_resets_as_its_node_connection_is_made_is_not_left_live(
    loop_name: str, relay_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client resets right after the node connection's connection_made, before the connect task resumes: the
    task is cancelled inside create_connection, and uvloop then closes the node's transport without ever calling its
    connection_lost. The client waited for that call, so it stayed counted as live, and a drain waited for it until
    drain_timeout_s."""
    if relay_path != "transports":
        pytest.skip("only the transports open the node connection with create_connection")

    def then_the_client_resets(self: relay.Half, transport: asyncio.BaseTransport) -> None:
        relay.Half.connection_made(self, transport)
        client = self.peer
        if client is not None and client.transport is not None:
            client.transport.abort()

    monkeypatch.setattr(connection.NodeHalf, "connection_made", then_the_client_resets)

    reached: list[int] = []

    async def main() -> None:
        server_, target = await sink(functools.partial(counting_echo, reached))
        async with worker_for(target, drain_timeout_s=1) as (worker, port):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"version\r\n")
            await wait_for_async(lambda: bool(reached), "the node connection")
            await wait_for_async(lambda: worker.active == 0, "the connection to be gone", timeout_s=2.0)
            writer.close()
        server_.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_target_named_by_dns_is_relayed_through_the_transports(loop_name: str) -> None:
    """Only the loop resolves a name without blocking: such a forward keeps the transports (ClientHalf), and relays
    as a direct one does."""

    async def main() -> None:
        server_, target = await sink(echo)
        port = free_port()
        forwards = [{"port": port, "target": f"localhost:{target}"}]
        async with worker_for(target, forwards=forwards) as (worker, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"version\r\n")
            assert await asyncio.wait_for(reader.readexactly(9), 10) == b"version\r\n"
            (conn,) = worker.routes[port].connections
            assert type(conn) is connection.ClientHalf
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(-1), 10) == b""
            writer.close()
            await wait_for_async(lambda: worker.active == 0, "the connection to be gone")
        server_.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_plain_forward_to_an_ip_has_no_transports(loop_name: str, relay_path: str) -> None:
    """The default plain path: a DirectClient (an InlineClient with the C extension), its bytes counted as the
    transports' would be."""

    async def main() -> None:
        server_, target = await sink(echo)
        async with worker_for(target) as (worker, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"version\r\n")
            assert await asyncio.wait_for(reader.readexactly(9), 10) == b"version\r\n"
            (conn,) = worker.routes[port].connections
            assert isinstance(conn, direct.DirectClient) == (relay_path != "transports")
            assert isinstance(conn, direct.InlineClient) == (relay_path == "inline")
            assert conn.transport is None or relay_path == "transports"
            for half in (conn, conn.peer):  # the direct halves set every slot in __init__ without super(): all of them
                slots = {name for cls in type(half).__mro__ for name in getattr(cls, "__slots__", ())}
                assert [name for name in slots if not hasattr(half, name)] == []
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(-1), 10) == b""
            writer.close()
            await wait_for_async(lambda: worker.active == 0, "the connection to be gone")
            assert (conn.seen_to_node, conn.seen_to_client) == (9, 9)  # what the byte counters were given
        server_.close()

    run(loop_name, main)
