"""Reliability test helpers: a real `natfwd serve` subprocess, big memcached nodes, and /proc and /metrics readers."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_ports, wait_port
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@contextmanager
def raised_fd_limit(wanted: int) -> Iterator[int]:
    """Raise this process's RLIMIT_NOFILE soft limit towards `wanted` (capped by the hard limit); restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, new), hard))
    try:
        yield max(soft, new)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Memcached:
    """A real memcached on 127.0.0.1:`port` that can be killed and started again on the same port."""

    def __init__(self, port: int, *extra: str) -> None:
        self.port = port
        self.argv = ["memcached", "-u", "root", "-l", "127.0.0.1", "-p", str(port), "-U", "0", *extra]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/tmp")
        try:
            wait_port("127.0.0.1", self.port, process=self.process)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self.process = None


@contextmanager
def memcached_nodes(count: int, *extra: str) -> Iterator[list[Memcached]]:
    """`count` memcached processes on free loopback ports; all killed on exit, even on failure."""
    nodes = [Memcached(port, *extra) for port in free_ports(count)]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.kill()


def config_text(
    forwards: Sequence[tuple[int, str]],
    metrics_port: int,
    *,
    listen: str = "127.0.0.1",
    allowed: str = "127.0.0.0/8",
    **options: object,
) -> str:
    """A memcached natfwd config on loopback with metrics on `metrics_port`; `options` are extra top-level keys."""
    lines = [
        "engine: memcached",
        "public_address: 127.0.0.1",
        f"listen_address: {listen}",
        f"allowed_clients: [{allowed}]",
        "forwards:",
        *[f"  - {{port: {port}, target: '{target}'}}" for port, target in forwards],
        f"metrics: {{listen: '127.0.0.1:{metrics_port}'}}",
        "drain_timeout_s: 1",
        *[f"{key}: {value}" for key, value in options.items()],
    ]
    return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return samples


@dataclass
class Serve:
    """A running `natfwd serve` subprocess and ways to look at it from outside."""

    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int
    namespace: str | None = None
    _stopped: int | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS in /proc/{self.pid}/status")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_limits(self) -> tuple[int, int]:
        """The (soft, hard) open-file limits the process runs with now."""
        for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
        raise AssertionError(f"no open-file limit in /proc/{self.pid}/limits")

    def settled_fds(self) -> int:
        """The open-fd count without the transient socket of a /metrics scrape that is still being closed."""
        readings = []
        for _ in range(5):
            readings.append(self.fds())
            time.sleep(0.05)
        return min(readings)

    def metrics(self) -> Samples:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        if self.namespace is None:
            with urllib.request.urlopen(url, timeout=5) as response:
                return parse_metrics(response.read().decode())
        from forwarder import netns

        # The socket is made on this thread while it is inside the namespace, where the exporter listens.
        with netns.entered(self.namespace), urllib.request.urlopen(url, timeout=5) as response:
            return parse_metrics(response.read().decode())

    def value(self, name: str, **labels: str) -> float:
        """One sample's value, 0 when the labelled child does not exist yet."""
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM (drain), then SIGKILL if it does not exit in time; returns the exit code."""
        if self._stopped is not None:
            return self._stopped
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stopped = self.process.returncode
        return self._stopped


def natfwd_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "forwarder", *args]


def natfwd_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@contextmanager
def natfwd_serve(
    directory: Path,
    text: str,
    metrics_port: int,
    *,
    namespace: str | None = None,
    nofile: tuple[int, int] | None = None,
    ready_timeout_s: float = 15.0,
) -> Iterator[Serve]:
    """Run `natfwd serve --config` on `text` until every forward is listening; stopped (and reaped) on exit.

    `nofile` starts it with that (soft, hard) RLIMIT_NOFILE, as a shell `ulimit -Sn/-Hn` would.
    """
    config_path = directory / "natfwd.yaml"
    config_path.write_text(text, encoding="utf-8")
    log_path = directory / "natfwd.log"
    argv = natfwd_argv("serve", "--config", str(config_path))
    if namespace is not None:
        argv = ["ip", "netns", "exec", namespace, *argv]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=natfwd_env(),
            cwd="/tmp",
            preexec_fn=None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile),
        )
    serve = Serve(process, log_path, metrics_port, namespace)
    try:
        forwards = text.split("forwards:", 1)[1].count("port:")
        deadline = time.monotonic() + ready_timeout_s
        while serve.log().count(" forwarding ") < forwards:
            if process.poll() is not None:
                raise RuntimeError(f"natfwd serve exited {process.returncode} at start:\n{serve.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"natfwd serve did not listen within {ready_timeout_s} s:\n{serve.log()}")
            time.sleep(0.02)
        yield serve
    finally:
        serve.stop()


def round_trip(
    port: int,
    request: bytes = b"version\r\n",
    *,
    until: bytes = b"\r\n",
    host: str = "127.0.0.1",
    timeout_s: float = 3.0,
) -> bytes:
    """Open a connection, send `request`, and return the reply up to and including `until` (or to EOF)."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(request)
        return read_until(sock, until)


def read_until(sock: socket.socket, until: bytes = b"\r\n") -> bytes:
    """Read one byte at a time up to and including `until`, or to EOF; never reads past it."""
    data = bytearray()
    while not data.endswith(until):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_line(sock: socket.socket) -> bytes:
    return read_until(sock, b"\r\n")


def read_exactly(sock: socket.socket, size: int) -> bytes:
    parts: list[bytes] = []
    left = size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise AssertionError(f"connection closed with {left} of {size} bytes still expected")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """True when the peer closes (EOF or reset) within `timeout_s`; False if the connection is still open then."""
    sock.settimeout(timeout_s)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
