"""In-process relay tests: both event loops, a worker forwarding to a local node, and node handlers to aim it at."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop
from conftest import IN_CI, free_port
from prometheus_client import CollectorRegistry

from forwarder import config, direct, rawmode
from forwarder.connection import ClientHalf
from forwarder.metrics import Metrics
from forwarder.relay import Half
from forwarder.resources import Resources
from forwarder.worker import Worker

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
RAW = ["c", "python"]  # raw mode's two implementations: the C relay thread, and PyRaw's reader callbacks


def use_raw(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw mode in Python (`python`), or the C relay thread (`c`): skipped when the extension was not built, but a
    failure in CI, which must test it."""
    if name == "python":
        monkeypatch.setattr(rawmode, "CRELAY", None)
        return
    if rawmode.CRELAY is None:
        why = "forwarder._crelay is not built (no compiler at install) or NATFWD_NO_EXTENSIONS is set"
        if IN_CI:
            pytest.fail(f"{why}: CI must test the C relay")
        pytest.skip(why)


PATHS = ["inline", "direct", "transports"]  # a plain forward's three paths (set_path)


def set_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`inline`: no transports, the inline C relay from the connect on (direct.InlineClient; skipped, or a failure
    in CI, without the extension); `direct`: no transports, in Python (direct.DirectClient); `transports`: the
    loop's transports (connection.ClientHalf)."""
    if path == "inline" and rawmode.CRELAY is None:
        use_raw("c", monkeypatch)
    monkeypatch.setattr(direct, "DIRECT", path != "transports")
    monkeypatch.setattr(direct, "INLINE", path == "inline")


def is_raw(half: Half | None) -> bool:
    """Whether the half's bytes bypass its transport: in PyRaw, in the relay thread, or in a direct connection's
    lean copy mode (direct.DirectClient), which has no transport at all."""
    return half is not None and (half.raw is not None or half.link is not None or half.transport is None)


def copying(half: Half | None) -> bool:
    """Whether the half's direction copies (read and write) rather than splices: PyRaw in copy mode, or a direct
    connection's lean copy mode."""
    if half is None or half.link is not None:
        return False
    return half.raw.copying if half.raw is not None else half.transport is None


def held_back(half: Half | None) -> bool:
    """Whether the half stopped reading because its peer's socket is full (in the relay thread: bytes wait)."""
    if half is None:
        return False
    if half.link is not None:
        return half.link.pending()[0 if half.link_first else 1] > 0
    return half.reading_paused


def idle_fds(pool: Resources) -> int:
    """The descriptors raw mode keeps with no raw connection left: pooled pipes, and the thread's and the inline
    relay's reservations."""
    return 2 * len(pool.pipes) + pool.thread_fds + pool.inline_fds


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


def run(loop_name: str, coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(coro())


@asynccontextmanager
async def worker_for(target_port: int, *, fd_budget: int | None = None, buffer_size: int = 64 * 1024,
                     **extra: object) -> AsyncIterator[tuple[Worker, int]]:  # fmt: skip
    """An in-process natfwd worker forwarding a free port to `target_port`; drained on exit."""
    port = free_port()
    data: dict[str, object] = {
        "engine": "memcached",
        "public_address": "127.0.0.1",
        "listen_address": "127.0.0.1",
        "allowed_clients": ["127.0.0.0/8"],
        "forwards": [{"port": port, "target": f"127.0.0.1:{target_port}"}],
        **extra,
    }
    worker = Worker(config.parse(data), None, Metrics(CollectorRegistry()), reuse_port=False, buffer_size=buffer_size)
    if fd_budget is not None:
        worker.pool.cap_fds(fd_budget)
    await worker.start()
    try:
        yield worker, port
    except BaseException:
        # A failed test leaves its connections open: abort them at once rather than wait out the 30 s grace.
        worker.config = dataclasses.replace(worker.config, drain_timeout_s=0.0)
        raise
    finally:
        await worker.drain()


async def sink(handler: Handler) -> tuple[asyncio.Server, int]:
    """A node on a free loopback port that runs `handler` for each connection."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(100_000):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


async def ping_pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rounds: int = 20) -> None:
    """Enough small round trips for both halves to pass RAW_AFTER_READS reads."""
    for i in range(rounds):
        line = f"ping {i}\n".encode()
        writer.write(line)
        assert await asyncio.wait_for(reader.readexactly(len(line)), 10) == line


async def busy_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection through the worker on `port` that has made enough round trips (ping_pong) to go raw."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await ping_pong(reader, writer)
    return reader, writer


def only_connection(worker: Worker) -> ClientHalf:
    (route,) = worker.routes.values()
    (conn,) = route.connections
    return conn


class Firehose:
    """A node that echoes `echo_lines` lines, then sends 64 KiB chunks of `z` as fast as it may, up to 200 MiB."""

    def __init__(self, echo_lines: int = 0) -> None:
        self.echo_lines = echo_lines
        self.sent = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(self.echo_lines):
            writer.write(await reader.readline())
        chunk = b"z" * 65536
        try:
            while self.sent < 200 * 1024 * 1024:
                writer.write(chunk)
                await writer.drain()
                self.sent += len(chunk)
        except (ConnectionError, OSError):
            pass
        finally:
            # Also when the test ends first and cancels this task: a write still pending when the loop closes makes
            # uvloop's close fail with EBUSY, and its callback then finds the loop closed (a CI failure, once).
            writer.transport.abort()


async def check_the_node_is_held_back(
    firehose: Firehose, worker: Worker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """The client stops reading: the firehose stalls with little in flight and the relay pauses the node's side;
    the client reads again: data flows on (all of it `z`) and the node sends more."""
    writer.transport.pause_reading()
    await asyncio.sleep(1.0)
    stalled_at = firehose.sent
    await asyncio.sleep(0.5)
    # The node is stuck: only kernel socket buffers and the relay's bounded buffer (or pipe) hold data.
    assert firehose.sent == stalled_at
    assert firehose.sent < 32 * 1024 * 1024
    conn = only_connection(worker)
    assert held_back(conn.peer), "the node's side should have stopped reading"
    writer.transport.resume_reading()
    got = 0
    while got < 8 * 1024 * 1024:
        data = await asyncio.wait_for(reader.read(1 << 20), 10)
        assert data.strip(b"z") == b""
        got += len(data)
    assert firehose.sent > stalled_at  # reading resumed on the node side


class LateReply:
    """A node that echoes `echo_lines` lines, then waits for the client's EOF and answers `got <bytes after the
    lines>` a moment later, and closes: the client's half-close must pass through while the other direction lives."""

    def __init__(self, echo_lines: int = 0) -> None:
        self.echo_lines = echo_lines

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(self.echo_lines):
            writer.write(await reader.readline())
        rest = await reader.read(-1)  # the client's EOF, passed on through the relay
        await asyncio.sleep(0.1)
        writer.write(b"got %d" % len(rest))
        await writer.drain()
        writer.close()
