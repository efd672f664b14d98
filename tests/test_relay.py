"""The relay in-process, on both the stdlib loop and uvloop: byte integrity, backpressure, half-close."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from forwarder import config
from forwarder.metrics import Metrics
from forwarder.server import Worker

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(loop_name: str, coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(coro())


def make_config(port: int, target_port: int, **extra: object) -> config.Config:
    data: dict[str, object] = {
        "engine": "memcached",
        "public_address": "127.0.0.1",
        "listen_address": "127.0.0.1",
        "allowed_clients": ["127.0.0.0/8"],
        "forwards": [{"port": port, "target": f"127.0.0.1:{target_port}"}],
    }
    data.update(extra)
    return config.parse(data)


async def start_sink_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]],
) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def relay_to(
    target_port: int, buffer_size: int = 64 * 1024, **extra: object
) -> AsyncIterator[tuple[Worker, int]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    worker = Worker(
        make_config(port, target_port, **extra),
        None,
        Metrics(CollectorRegistry()),
        reuse_port=False,
        buffer_size=buffer_size,
    )
    await worker.start()
    try:
        yield worker, port
    finally:
        await worker.drain()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(100_000):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_tiny_buffer_multi_megabyte_payload_both_ways(loop_name: str) -> None:
    """A 7-byte buffer against 2 MB each way: any reuse of a buffer the transport still holds corrupts the stream."""

    async def main() -> None:
        server, target = await start_sink_server(echo)
        async for worker, port in relay_to(target, buffer_size=7):
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
        server, target = await start_sink_server(echo)
        async for _worker, port in relay_to(target, buffer_size=4096):

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

    async def late_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(-1)  # wait for the client's EOF to arrive through the relay
        await asyncio.sleep(0.1)
        writer.write(b"got " + str(len(data)).encode())
        await writer.drain()
        writer.close()

    async def main() -> None:
        server, target = await start_sink_server(late_reply)
        async for worker, port in relay_to(target):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x" * 1000)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(-1), 10) == b"got 1000"
            writer.close()
            for _ in range(100):
                if worker.active == 0:
                    break
                await asyncio.sleep(0.02)
            assert worker.active == 0
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_slow_reader_pauses_the_node(loop_name: str) -> None:
    """A client that stops reading: the relay stops reading from the node instead of buffering everything."""
    sent = 0

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        chunk = b"z" * 65536
        try:
            while sent < 200 * 1024 * 1024:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        except (ConnectionError, OSError):
            pass

    async def main() -> None:
        server, target = await start_sink_server(firehose)
        async for worker, port in relay_to(target):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
            transport = writer.transport
            transport.pause_reading()
            await asyncio.sleep(1.0)
            stalled_at = sent
            await asyncio.sleep(0.5)
            # The node is stuck: only kernel socket buffers and the relay's bounded write buffer hold data.
            assert sent == stalled_at
            assert sent < 32 * 1024 * 1024
            conn = next(iter(next(iter(worker.routes.values())).connections))
            assert conn.peer is not None and conn.peer.reading_paused
            transport.resume_reading()
            got = 0
            while got < 8 * 1024 * 1024:
                got += len(await asyncio.wait_for(reader.read(1 << 20), 10))
            assert sent > stalled_at  # reading resumed on the node side
            writer.close()
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_unreachable_node_closes_client_promptly_and_counts(loop_name: str) -> None:
    async def main() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
        sock.close()  # nothing listens here: connect is refused
        async for worker, port in relay_to(dead_port):
            loop = asyncio.get_running_loop()
            started = loop.time()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"version\r\n")
            data = await asyncio.wait_for(reader.read(-1), 5)
            assert data == b""
            assert loop.time() - started < 2
            writer.close()
            metric = worker.metrics.upstream_errors.labels(str(port), "refused")
            assert metric._value.get() == 1
        await asyncio.sleep(0)

    run(loop_name, main)
