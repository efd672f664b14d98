"""Shared fixtures: real memcached and redis-server processes on loopback, free ports, natfwd configs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI") == "true"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout_s: float = 10.0, *, process: subprocess.Popen[Any] | None = None) -> None:
    """Wait until `host:port` accepts a connection.

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
