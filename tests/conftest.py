"""Shared fixtures: real memcached and redis-server processes on loopback, free ports, natfwd configs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
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


@pytest.fixture
def start_memcached() -> Iterator[Callable[..., Node]]:
    binary = require_binary("memcached")
    nodes: list[Node] = []

    def start(port: int | None = None, host: str = "127.0.0.1") -> Node:
        port = port or free_port(host)
        node = _start(
            [binary, "-u", "root", "-l", host, "-p", str(port), "-U", "0", "-m", "64", "-I", "2m"], host, port
        )
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.kill()


@pytest.fixture
def start_redis() -> Iterator[Callable[..., Node]]:
    binary = require_binary("redis-server")
    nodes: list[Node] = []

    def start(port: int | None = None, host: str = "127.0.0.1", *extra: str) -> Node:
        port = port or free_port(host)
        argv = [binary, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no", *extra]
        node = _start(argv, host, port)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.kill()


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
