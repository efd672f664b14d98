"""Shared fixtures and the one copy of the test waits: real cache servers on loopback, free ports, polling, configs, and
how pytest-xdist workers share the machine (their own ports, long tests first, exclusive tests alone)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis

if TYPE_CHECKING:
    from servekit import Serve

IN_CI = os.environ.get("CI") == "true"


# Servers the tests start get their ports from here. The range lies below the kernel's ephemeral ports (32768 and up),
# so no client socket's automatic port takes one between the test choosing it and the server binding it, and each
# pytest-xdist worker walks a slice of its own, so no two workers are handed the same port. Ports at and above the
# range's end are never handed out: a redis cluster bus port (the port + 10000) lands there.
PORT_RANGE = range(20000, 30000)
CLUSTER_BUS_OFFSET = 10000


def _worker_slice() -> range:
    """This process's share of PORT_RANGE: the whole of it without pytest-xdist, one slice per worker with it."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    size = len(PORT_RANGE) // count
    return range(PORT_RANGE.start + index * size, PORT_RANGE.start + (index + 1) * size)


class _Ports:
    """Hands out the ports of one slice in turn, from a random start (a concurrent run of the suite starts elsewhere),
    so a port comes round again only after the whole slice: long after its last server's TIME_WAIT."""

    def __init__(self, ports: range) -> None:
        self.ports = ports
        self.next = random.randrange(ports.start, ports.stop)

    def take(self, host: str, width: int, offsets: tuple[int, ...]) -> int:
        """The first of `width` consecutive ports that, like each port + an offset in `offsets`, bind on `host` now."""
        for _ in range(len(self.ports)):
            first = self.next
            if first + width > self.ports.stop:
                first = self.ports.start
            self.next = first + width if first + width < self.ports.stop else self.ports.start
            wanted = [port + offset for port in range(first, first + width) for offset in (0, *offsets)]
            if all(_binds(host, port) for port in wanted):
                return first
        raise RuntimeError(f"no {width} free consecutive TCP ports on {host} in {self.ports}")


def _binds(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


_PORTS = _Ports(_worker_slice())


def free_port(host: str = "127.0.0.1", *, cluster_bus: bool = False) -> int:
    """A TCP port on `host` that nothing listens on right now, and that no other test in this run is handed.

    With `cluster_bus`, its redis cluster bus port (+10000) is free too.
    """
    return _PORTS.take(host, 1, (CLUSTER_BUS_OFFSET,) if cluster_bus else ())


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free TCP ports on `host` (see `free_port`)."""
    return [free_port(host) for _ in range(count)]


def free_run(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive free TCP ports on `host` (see `free_port`)."""
    return _PORTS.take(host, count, ())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[object]:
    """In a pytest-xdist worker, a test marked `exclusive` runs (setup to teardown) while no other worker runs one.

    Every test holds a shared lock on a file in the run's temporary directory (the workers' common parent); an
    exclusive one takes it exclusively. Before either, a test passes a turnstile that a waiting exclusive test holds,
    so tests that start later queue behind it instead of keeping the shared lock taken forever.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return (yield)
    shared = Path(item.config.option.basetemp).parent
    with open(shared / "exclusive.turnstile", "a") as turnstile, open(shared / "exclusive.lock", "a") as lock:
        exclusive = item.get_closest_marker("exclusive") is not None
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if not exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            return (yield)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In a pytest-xdist worker, tests marked `long` go first: workers take tests in this order, and one of these
    started near the end would leave the others idle while it finishes."""
    if os.environ.get("PYTEST_XDIST_WORKER") is not None:
        items.sort(key=lambda item: item.get_closest_marker("long") is None)


def _timed_out(what: str, timeout_s: float, detail: Callable[[], str] | None) -> AssertionError:
    more = f"\n{detail()}" if detail is not None else ""
    return AssertionError(f"timed out after {timeout_s} s waiting for {what}{more}")


def wait_for(
    predicate: Callable[[], object],
    what: str,
    timeout_s: float = 10.0,
    *,
    interval_s: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> float:
    """Poll until `predicate()` is true and return the seconds it took.

    `timeout_s` only stops a hang: it raises AssertionError naming `what` (and `detail()`, such as a log, if given).
    """
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise _timed_out(what, timeout_s, detail)
        time.sleep(interval_s)
    return time.monotonic() - started


async def wait_for_async(
    predicate: Callable[[], object], what: str, timeout_s: float = 10.0, *, interval_s: float = 0.01
) -> float:
    """`wait_for` for code on an event loop: polls without blocking the loop the predicate depends on."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not predicate():
        if loop.time() - started > timeout_s:
            raise _timed_out(what, timeout_s, None)
        await asyncio.sleep(interval_s)
    return loop.time() - started


def wait_port(host: str, port: int, timeout_s: float = 30.0, *, process: subprocess.Popen[Any] | None = None) -> None:
    """Wait until `host:port` accepts a connection (the default timeout only stops a hang: a loaded machine is slow).

    Raises TimeoutError after `timeout_s`, or RuntimeError as soon as `process` (the server, if given) has exited.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited {process.returncode} before listening") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} did not accept within {timeout_s}s") from None
            time.sleep(0.02)


def round_trip(port: int, request: bytes, reply_end: bytes, timeout_s: float = 10.0) -> bytes:
    """Send `request` to a loopback port on a new connection and read until the reply ends with `reply_end`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        reply = b""
        while not reply.endswith(reply_end):
            chunk = sock.recv(65536)
            assert chunk, f"closed early after {reply[-200:]!r}"
            reply += chunk
        return reply


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed; the README's test command installs it")
        pytest.skip(f"{name} is not installed")
    return path


class Node:
    """A real cache server process on loopback."""

    def __init__(self, proc: subprocess.Popen[bytes], host: str, port: int) -> None:
        self.proc = proc
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _start(argv: list[str], host: str, port: int) -> Node:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(host, port)
    except TimeoutError:
        proc.kill()
        raise
    return Node(proc, host, port)


def _starting(argv: Callable[[str, int], list[str]]) -> Iterator[Callable[..., Node]]:
    """The body of a `start_*` fixture: start(port=free, host=127.0.0.1, *extra args) runs `argv(host, port)` plus
    the extra args as a node; every node started is killed at teardown."""
    nodes: list[Node] = []

    def start(port: int | None = None, host: str = "127.0.0.1", *extra: str) -> Node:
        port = port or free_port(host)
        node = _start([*argv(host, port), *extra], host, port)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.kill()


@pytest.fixture
def start_memcached() -> Iterator[Callable[..., Node]]:
    binary = require_binary("memcached")
    yield from _starting(
        lambda host, port: [binary, "-u", "root", "-l", host, "-p", str(port), "-U", "0", "-m", "64", "-I", "2m"]
    )


@pytest.fixture
def start_redis() -> Iterator[Callable[..., Node]]:
    binary = require_binary("redis-server")
    yield from _starting(
        lambda host, port: [binary, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no"]
    )


@pytest.fixture
def memcached_nodes(start_memcached: Callable[..., Node]) -> list[Node]:
    return [start_memcached() for _ in range(3)]


def write_config(
    path: Path,
    forwards: list[tuple[int, str]],
    *,
    engine: str = "memcached",
    allowed: str = "127.0.0.0/8",
    extra: str = "",
) -> Path:
    lines = [
        f"engine: {engine}",
        "public_address: 127.0.0.1",
        "listen_address: 127.0.0.1",
        "allowed_clients:",
        f"  - {allowed}",
        "forwards:",
        *[f"  - {{port: {port}, target: '{target}'}}" for port, target in forwards],
    ]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


# Every test on the *_mux fixtures runs with each of natfwd's scanners: the C ones (_cframing.c, what natfwd uses when
# they were built) and the pure-Python fallback, which pins pipelining clients where the C ones share them.
SCANNERS = [pytest.param((), id="c"), pytest.param(("env", "NATFWD_NO_EXTENSIONS=1"), id="python")]


@pytest.fixture(params=SCANNERS)
def redis_mux(
    request: pytest.FixtureRequest, tmp_path: Path, start_redis: Callable[..., Node]
) -> Iterator[tuple[Node, int, Serve]]:
    """A redis-server behind a multiplexing `natfwd serve`: (the node, natfwd's port, the serve)."""
    from servekit import serving_mux  # servekit imports this module

    with serving_mux(tmp_path, start_redis(), "redis", request.param) as running:
        yield running


@pytest.fixture(params=SCANNERS)
def memcached_mux(
    request: pytest.FixtureRequest, tmp_path: Path, start_memcached: Callable[..., Node]
) -> Iterator[tuple[Node, int, Serve]]:
    """A memcached behind a multiplexing `natfwd serve`: (the node, natfwd's port, the serve)."""
    from servekit import serving_mux  # servekit imports this module

    with serving_mux(tmp_path, start_memcached(), "memcached", request.param) as running:
        yield running


def node_clients(node: Node) -> int:
    """Connections the redis node has, other than the one asking."""
    with redis.Redis(port=node.port) as direct:
        return len(direct.client_list()) - 1
