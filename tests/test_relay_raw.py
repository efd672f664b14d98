"""Raw mode (the relay owning socket duplicates: read/write for small messages, splice through pooled pipes for bulk)
on both loops and in both implementations (the C relay thread, and PyRaw in Python), and when it must not apply.
Tests that look inside PyRaw run in Python only; tests/test_crelay.py has the thread's own.

Every test runs on both plain paths: `direct` (no transports: raw mode from the first byte, direct.DirectClient)
and `transports` (raw mode once a connection is busy, from socket duplicates)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Node, wait_for_async
from relaykit import (
    LOOPS,
    PATHS,
    RAW,
    Firehose,
    LateReply,
    check_the_node_is_held_back,
    copying,
    echo,
    held_back,
    idle_fds,
    is_raw,
    only_connection,
    ping_pong,
    run,
    set_path,
    sink,
    use_raw,
    worker_for,
)
from tlskit import CA

from forwarder import rawmode, resources


@pytest.fixture(autouse=True, params=PATHS)
def relay_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The plain path the test's connections take."""
    path: str = request.param
    set_path(path, monkeypatch)
    return path


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def transfer_both_ways(port: int, size: int, check: Callable[[], None] | None = None) -> None:
    """Send `size` random bytes through an echo node and check every byte comes back, in order, then EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await ping_pong(reader, writer)
    payload = os.urandom(size)

    async def send() -> None:
        for i in range(0, len(payload), 200_000):
            writer.write(payload[i : i + 200_000])
            await writer.drain()
            if check is not None:
                check()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await asyncio.wait_for(reader.read(-1), 60)
    await sender
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    writer.close()


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("impl", RAW)
def test_busy_connection_goes_raw_and_relays_every_byte(
    loop_name: str, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_raw(impl, monkeypatch)

    async def main() -> None:
        server, target = await sink(echo)
        fds_before = open_fds()
        async with worker_for(target) as (worker, port):
            seen: list[bool] = []

            def check() -> None:
                conn = only_connection(worker)
                seen.append(is_raw(conn) and is_raw(conn.peer))
                assert (conn.link is not None) == (impl == "c")

            await transfer_both_ways(port, 8 * 1024 * 1024, check)
            assert seen and all(seen), "both halves should be in raw mode once the ping-pong is over"
            await wait_for_async(lambda: worker.active == 0, "the connection to close")
            assert worker.pool.extra_fds == idle_fds(worker.pool)  # the duplicates are closed; pooled pipes remain
        await asyncio.sleep(0.05)
        assert open_fds() <= fds_before + 2 * resources.PIPE_POOL_LIMIT + 3  # + the thread's epoll and eventfds
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("chunk", [rawmode.SPLICE_CHUNK, 45 * 1448], ids=["loopback", "mss-1448"])
def test_a_bulk_stream_moves_several_chunks_per_wakeup(
    loop_name: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full chunk means more is queued: one readiness callback keeps splicing, up to SPLICE_BURST chunks. A chunk
    is what splice_chunk() says for the socket written (loopback's MSS gives 64 KiB, a 1500-byte MTU 45 segments)."""
    use_raw("python", monkeypatch)  # looks inside PyRaw
    monkeypatch.setattr(rawmode, "splice_chunk", lambda sock: chunk)
    chunks_per_call: list[int] = []
    reading = {"fd": -1, "chunks": 0}
    asked: set[int] = set()
    original_readable = rawmode.PyRaw.readable
    original_splice = rawmode._splice

    def counting_splice(src: int, dst: int, count: int, *args: Any) -> int:
        moved = original_splice(src, dst, count, *args)
        if src == reading["fd"]:
            reading["chunks"] += 1
            asked.add(count)
        return moved

    def readable(raw: rawmode.PyRaw) -> None:
        reading["fd"], reading["chunks"] = raw.fd, 0
        original_readable(raw)
        chunks_per_call.append(reading["chunks"])

    monkeypatch.setattr(rawmode, "_splice", counting_splice)
    monkeypatch.setattr(rawmode.PyRaw, "readable", readable)

    async def main() -> None:
        server, target = await sink(echo)
        async with worker_for(target) as (_worker, port):
            await transfer_both_ways(port, 8 * 1024 * 1024)
        server.close()

    run(loop_name, main)
    assert asked == {chunk}
    assert max(chunks_per_call) > 1, "a callback that found a full chunk should have gone on reading"
    assert max(chunks_per_call) <= rawmode.SPLICE_BURST


@pytest.mark.parametrize("loop_name", LOOPS)
def test_small_messages_are_copied_and_bulk_is_spliced(loop_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each direction reads small messages with os.read, switches to splice on a full read, and back after it."""
    use_raw("python", monkeypatch)  # looks inside PyRaw
    spliced: list[int] = []
    original_splice = rawmode._splice

    def counting_splice(src: int, dst: int, count: int, *args: Any) -> int:
        moved = original_splice(src, dst, count, *args)
        spliced.append(moved)
        return moved

    monkeypatch.setattr(rawmode, "_splice", counting_splice)

    async def main() -> None:
        server, target = await sink(echo)
        async with worker_for(target) as (worker, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await ping_pong(reader, writer)
            client = only_connection(worker)
            halves = [client, client.peer]
            assert all(copying(h) for h in halves)
            assert not spliced, "small messages should not go through a pipe"

            payload = os.urandom(4 * 1024 * 1024)
            writer.write(payload)
            received = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            assert sum(spliced) > len(payload), "most of the bulk should have been spliced, both ways"

            await ping_pong(reader, writer, rounds=rawmode.COPY_AFTER_SMALL)  # a run of short splices: small again
            count = len(spliced)
            await ping_pong(reader, writer, rounds=5)
            assert len(spliced) == count, "after the bulk, small messages should be copied again"
            assert all(copying(h) for h in halves)
            writer.close()
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("impl", RAW)
def test_concurrent_mixed_sizes_switching_modes_stay_intact(
    loop_name: str, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 connections at once, each echoing messages of random sizes from 1 byte to 300 KB, so every direction
    switches between copying and splicing many times while sharing one pipe pool: every echo comes back exact."""
    use_raw(impl, monkeypatch)
    switches = {"to_splice": 0}
    original_splice_chunks = rawmode.PyRaw.splice_chunks

    def splice_chunks(raw: rawmode.PyRaw) -> None:
        switches["to_splice"] += 1
        original_splice_chunks(raw)

    monkeypatch.setattr(rawmode.PyRaw, "splice_chunks", splice_chunks)
    sizes = (1, 30, 1000, 16 * 1024, 16 * 1024 + 1, 70_000, 300_000)

    async def client(port: int, seed: int) -> None:
        rng = random.Random(seed)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await ping_pong(reader, writer)
        for _ in range(40):
            message = rng.randbytes(rng.choice(sizes))
            writer.write(message)
            assert await asyncio.wait_for(reader.readexactly(len(message)), 30) == message
        writer.close()

    async def main() -> None:
        server, target = await sink(echo)
        async with worker_for(target) as (worker, port):
            await asyncio.gather(*(client(port, seed) for seed in range(20)))
            await wait_for_async(lambda: worker.active == 0, "every connection to close")
            assert worker.pool.extra_fds == idle_fds(worker.pool)
            if impl == "c":
                assert worker.pool.thread is not None
                stats = worker.pool.thread.stats()
                assert stats["pipes_open"] and stats["pipes_open"] == stats["pipes_pooled"], stats
                switches["to_splice"] = 21  # spliced: it opened pipes, and every one is back, empty
        server.close()

    run(loop_name, main)
    assert switches["to_splice"] > 20, "bulk messages should have been spliced"


def no_splice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw mode as on a system without os.splice: every chunk goes through os.read/os.write (the relay thread gets
    no pipe)."""
    monkeypatch.setattr(rawmode, "_splice", rawmode._no_splice)
    monkeypatch.setattr(resources, "CAN_SPLICE", False)
    monkeypatch.setattr(resources, "RELAY_PIPES", 0)
    monkeypatch.setattr(resources, "INLINE_PIPES", 0)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("mode", ["transport", "copy", "c-copy"])
def test_tiny_buffers_stay_intact(loop_name: str, mode: str, relay_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """7-byte buffers and reads against 1 MB each way: through the transports for the whole connection (no
    descriptors to spare for raw mode), or in raw mode without splice, partial sends and all (the relay thread
    without pipes: its reads stay 16 KiB)."""
    if mode == "transport" and relay_path != "transports":
        pytest.skip("a direct connection has no transports")
    if mode == "copy":
        use_raw("python", monkeypatch)
        no_splice(monkeypatch)
        monkeypatch.setattr(rawmode, "COPY_READ", 7)
    elif mode == "c-copy":
        use_raw("c", monkeypatch)
        monkeypatch.setattr(resources, "RELAY_PIPES", 0)
        monkeypatch.setattr(resources, "INLINE_PIPES", 0)

    async def main() -> None:
        server, target = await sink(echo)
        async with worker_for(target, fd_budget=0 if mode == "transport" else None, buffer_size=7) as (worker, port):
            modes: list[bool] = []
            await transfer_both_ways(port, 1024 * 1024, lambda: modes.append(is_raw(only_connection(worker))))
            assert modes and all(m == (mode != "transport") for m in modes)
            assert not worker.pool.pipes
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_no_pipe_to_spare_means_copies(loop_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With descriptors for the socket duplicates but none for a pipe, full reads keep asking for splice and keep
    getting copies: every byte arrives, and no callback recurses."""
    use_raw("python", monkeypatch)  # looks inside PyRaw
    asked: list[int] = []
    depth = {"now": 0, "max": 0}
    original_readable = rawmode.PyRaw.readable

    def no_pipe(pool: resources.Resources) -> None:
        asked.append(1)
        return None

    def readable(raw: rawmode.PyRaw) -> None:
        depth["now"] += 1
        depth["max"] = max(depth["max"], depth["now"])
        try:
            original_readable(raw)
        finally:
            depth["now"] -= 1

    monkeypatch.setattr(resources.Resources, "take_pipe", no_pipe)
    monkeypatch.setattr(rawmode.PyRaw, "readable", readable)

    async def main() -> None:
        server, target = await sink(echo)
        async with worker_for(target) as (worker, port):
            await transfer_both_ways(port, 8 * 1024 * 1024)
            assert asked, "full reads should have asked for a pipe"
            assert depth["max"] == 1, "a readiness callback should copy or splice, never call itself"
            assert not worker.pool.pipes
            await wait_for_async(lambda: worker.active == 0, "the connection to close")
            assert worker.pool.extra_fds == 0
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_kernel_that_refuses_splice_gets_copies(loop_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use_raw("python", monkeypatch)  # looks inside PyRaw

    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(rawmode, "_splice", refuse)

    async def main() -> None:
        server, target = await sink(echo)
        async with worker_for(target) as (worker, port):
            await transfer_both_ways(port, 2 * 1024 * 1024)
            assert not worker.pool.can_splice and not worker.pool.pipes
            await wait_for_async(lambda: worker.active == 0, "the connection to close")
            assert worker.pool.extra_fds == 0
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("mode", ["splice", "copy"])
@pytest.mark.parametrize("impl", RAW)
def test_raw_mode_holds_back_a_fast_node_for_a_slow_client(
    loop_name: str, mode: str, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_raw(impl, monkeypatch)
    if mode == "copy":
        no_splice(monkeypatch)
    firehose = Firehose(echo_lines=20)  # the ping-pong, answered by hand

    async def main() -> None:
        server, target = await sink(firehose)
        async with worker_for(target) as (worker, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
            await ping_pong(reader, writer)
            assert is_raw(only_connection(worker))
            await check_the_node_is_held_back(firehose, worker, reader, writer)
            writer.close()
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("mode", ["splice", "copy"])
@pytest.mark.parametrize("impl", RAW)
def test_a_stalled_connection_keeps_its_unsent_bytes_to_itself(
    loop_name: str, mode: str, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One connection stalls with bytes stuck in its pipe (or buffer) while another moves megabytes through the
    same pools: lending the stuck pipe or buffer to anyone else would corrupt the other stream."""
    use_raw(impl, monkeypatch)
    if mode == "copy":
        no_splice(monkeypatch)

    async def node(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.readline() == b"echo\n":
            writer.write(b"ok\n")
            await echo(reader, writer)
            return
        writer.write(b"ok\n")
        await Firehose(echo_lines=20)(reader, writer)

    async def main() -> None:
        server, target = await sink(node)
        async with worker_for(target) as (worker, port):
            stalled_reader, stalled = await asyncio.open_connection("127.0.0.1", port, limit=1024)
            stalled.write(b"firehose\n")
            assert await stalled_reader.readline() == b"ok\n"
            await ping_pong(stalled_reader, stalled)
            stalled.transport.pause_reading()
            await asyncio.sleep(0.5)  # the firehose fills every buffer up to the relay, and the relay stops reading
            conns = {c for route in worker.routes.values() for c in route.connections}
            stuck = [c.peer for c in conns if held_back(c.peer)]
            assert stuck, "the stalled connection should be waiting for its client's socket, bytes in hand"
            for half in stuck:  # the pipe holding the unsent bytes (splice mode) is not lendable
                if impl == "c":
                    assert worker.pool.thread is not None
                    stats = worker.pool.thread.stats()
                    assert (stats["pipes_open"] > stats["pipes_pooled"]) == (mode == "splice"), stats
                    continue
                assert half.raw is not None
                if mode == "copy":
                    assert half.raw.tail is not None and half.raw.pipe is None
                else:
                    assert half.raw.pipe is not None and half.raw.pipe not in worker.pool.pipes

            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"echo\n")
            assert await reader.readline() == b"ok\n"
            await ping_pong(reader, writer)
            payload = os.urandom(4 * 1024 * 1024)
            writer.write(payload)
            writer.write_eof()
            received = await asyncio.wait_for(reader.read(-1), 30)
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            writer.close()
            stalled.transport.resume_reading()
            data = await asyncio.wait_for(stalled_reader.read(1 << 20), 10)
            assert data and data.strip(b"z") == b""
            stalled.close()
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("impl", RAW)
def test_half_close_in_raw_mode(loop_name: str, impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client shuts its write side after going raw; the node still answers, then closes."""
    use_raw(impl, monkeypatch)

    async def main() -> None:
        server, target = await sink(LateReply(echo_lines=20))  # the client's EOF passes by shutdown(SHUT_WR)
        async with worker_for(target) as (worker, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await ping_pong(reader, writer)
            assert is_raw(only_connection(worker))
            writer.write(b"x" * 100_000)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(-1), 10) == b"got 100000"
            writer.close()
            await wait_for_async(lambda: worker.active == 0, "both directions to finish")
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("impl", RAW)
def test_node_reset_in_raw_mode_closes_the_client(loop_name: str, impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use_raw(impl, monkeypatch)

    async def reset_after_ping_pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(20):
            writer.write(await reader.readline())
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # SO_LINGER 0: RST

    async def main() -> None:
        server, target = await sink(reset_after_ping_pong)
        async with worker_for(target) as (worker, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await ping_pong(reader, writer)
            try:
                assert await asyncio.wait_for(reader.read(-1), 10) == b""
            except ConnectionResetError:
                pass
            writer.close()
            await wait_for_async(lambda: worker.active == 0, "the connection to be dropped")
            assert worker.pool.extra_fds == idle_fds(worker.pool)
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("impl", RAW)
def test_drain_aborts_raw_connections_for_real(loop_name: str, impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """abort() must close our socket duplicates first, or the client would never see the connection end."""
    use_raw(impl, monkeypatch)

    async def main() -> None:
        server, target = await sink(echo)
        async with worker_for(target, drain_timeout_s=0.2) as (worker, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await ping_pong(reader, writer)
            assert is_raw(only_connection(worker))
            await worker.drain()
            try:
                assert await asyncio.wait_for(reader.read(-1), 5) == b""
            except ConnectionResetError:
                pass
            writer.close()
            assert worker.pool.extra_fds == idle_fds(worker.pool)
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_tls_front_never_goes_raw(loop_name: str, tmp_path: Path) -> None:
    ca = CA(tmp_path, "raw")
    leaf = ca.issue("front", ips=("127.0.0.1",))

    async def main() -> None:
        server, target = await sink(echo)
        tls = {"cert": str(leaf.cert), "key": str(leaf.key)}
        async with worker_for(target, tls=tls) as (worker, port):
            context = ssl.create_default_context(cafile=str(ca.path))
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            await ping_pong(reader, writer, rounds=40)
            conn = only_connection(worker)
            assert not is_raw(conn) and conn.peer is not None and not is_raw(conn.peer)
            assert worker.pool.extra_fds == 0
            writer.close()
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_rewriting_connections_never_go_raw(loop_name: str, start_redis: Callable[..., Node]) -> None:
    """redis-cluster forwards rewrite replies, so every byte must keep passing through Python."""
    node = start_redis()

    async def main() -> None:
        async with worker_for(node.port, engine="redis-cluster") as (worker, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for i in range(40):
                writer.write(b"PING\r\n")
                assert await asyncio.wait_for(reader.readline(), 10) == b"+PONG\r\n", i
            conn = only_connection(worker)
            assert not is_raw(conn) and conn.peer is not None and not is_raw(conn.peer)
            assert worker.pool.extra_fds == idle_fds(worker.pool)  # (the inline relay, made for the plain listener)
            writer.close()

    run(loop_name, main)
