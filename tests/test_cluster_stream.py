"""A redis-cluster forward rewrites huge replies as they stream: bytes exact, memory flat, other forwards answered."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Node, free_port, write_config
from servekit import serving

from forwarder.protocols import framing

ITEMS = 1_500_000  # as in the report that found the EXEC reply held whole
HANG_S = 30.0  # far above any expected wait: only stops a hang
READER = """
import socket, sys
port, size, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
    sock.sendall(sys.stdin.buffer.read())
    data = bytearray()
    while len(data) < size and (chunk := sock.recv(1 << 20)):
        data += chunk
open(path, "wb").write(data)
"""


def command(*words: str) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w.encode()), w.encode()) for w in words)


def read_replies(sock: socket.socket, count: int) -> bytes:
    """Exactly `count` complete RESP replies from `sock`."""
    data = bytearray()
    while framing.REDIS.replies(data, 0, count)[1] < count:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} bytes, before {count} replies")
        data += chunk
    return bytes(data)


def read_all(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def peak_rss_kib(pid: int) -> int:
    """VmHWM of natfwd's process and its workers (a worker is a child of the supervisor)."""
    total = 0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for each in [pid, *map(int, children)]:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total = max(total, int(line.split()[1]))
    return total


def cluster_node(start_redis: Callable[..., Node], tmp_path: Path) -> Node:
    """One redis-server in cluster mode holding every slot: the smallest real cluster."""
    # Its bus port is its port + 10000 unless set, and no port is above 65535: a free port above 55535 would not start.
    node = start_redis(None, "127.0.0.1", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-announce-ip", "127.0.0.1",
                       "--cluster-port", str(free_port()), "--dir", str(tmp_path))  # fmt: skip
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(command("CLUSTER", "ADDSLOTSRANGE", "0", "16383"))
        assert read_all(sock, 5) == b"+OK\r\n"
        deadline = time.monotonic() + HANG_S
        while True:
            sock.sendall(command("CLUSTER", "INFO"))
            if b"cluster_state:ok" in read_replies(sock, 1):
                break
            assert time.monotonic() < deadline, "cluster_state:ok not reached"
            time.sleep(0.05)
        # {k} keeps every key in one slot; the list is filled in batches.
        batch = 10_000
        for start in range(0, ITEMS, batch):
            sock.sendall(command("RPUSH", "{k}big", *(f"v{n:07d}" for n in range(start, start + batch))))
        read_replies(sock, ITEMS // batch)
    return node


def test_a_huge_exec_reply_with_cluster_slots_streams_and_other_forwards_keep_answering(
    start_redis: Callable[..., Node], tmp_path: Path
) -> None:
    """MULTI, CLUSTER SLOTS, LRANGE of 1.5M items, EXEC through a rewriting forward: the EXEC reply is the node's
    with CLUSTER SLOTS made public, natfwd never holds it whole (its peak RSS grows by far less than the reply),
    and PINGs through another forward are answered while it streams."""
    node = cluster_node(start_redis, tmp_path)
    big_port, ping_port, metrics_port = free_port(), free_port(), free_port()
    config = write_config(
        tmp_path / "natfwd.yaml",
        [(big_port, node.address), (ping_port, node.address)],
        engine="redis-cluster",
        extra=f"metrics:\n  listen: 127.0.0.1:{metrics_port}\n",
    )
    transaction = command("MULTI") + command("CLUSTER", "SLOTS") + command("LRANGE", "{k}big", "0", "-1")
    transaction += command("EXEC")
    with socket.create_connection(("127.0.0.1", node.port), timeout=HANG_S) as direct:
        direct.sendall(transaction)
        expected = read_replies(direct, 4)
    # What natfwd must change: the node's own address in CLUSTER SLOTS becomes the public address and the port of
    # the first forward listing it. Everything else is the node's bytes.
    private = b"$9\r\n127.0.0.1\r\n:%d\r\n" % node.port
    assert expected.count(private) == 1
    expected = expected.replace(private, b"$9\r\n127.0.0.1\r\n:%d\r\n" % big_port)
    assert len(expected) > 20 << 20

    with serving(config, [big_port, ping_port, metrics_port], metrics_port) as serve:
        latencies: list[float] = []
        streaming = threading.Event()
        done = threading.Event()

        def ping() -> None:
            with socket.create_connection(("127.0.0.1", ping_port), timeout=HANG_S) as sock:
                streaming.wait(HANG_S)
                while not done.is_set():
                    started = time.perf_counter()
                    sock.sendall(command("PING"))
                    assert read_all(sock, 7) == b"+PONG\r\n"
                    latencies.append(time.perf_counter() - started)
                    time.sleep(0.002)

        pinger = threading.Thread(target=ping, daemon=True)
        pinger.start()
        before = peak_rss_kib(serve.proc.pid)
        # The big reply is read by a process of its own, so that the PINGs here never wait for this one's GIL.
        got_path = tmp_path / "got"
        reader = subprocess.Popen([sys.executable, "-c", READER, str(big_port), str(len(expected)), str(got_path)],
                                  stdin=subprocess.PIPE)  # fmt: skip
        assert reader.stdin is not None
        reader.stdin.write(transaction)
        reader.stdin.close()
        streaming.set()
        assert reader.wait(HANG_S) == 0
        done.set()
        pinger.join(HANG_S)
        grown_kib = peak_rss_kib(serve.proc.pid) - before

    assert latencies, "no PING through the other forward was answered while the reply streamed"
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    print(f"\n{len(expected)} bytes; PING through the other forward: {len(latencies)} answered, "
          f"median {latencies[len(latencies) // 2] * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
          f"max {latencies[-1] * 1e3:.1f} ms; peak RSS grew {grown_kib} KiB")  # fmt: skip
    assert got_path.read_bytes() == expected
    assert max(latencies) < HANG_S
    # Holding the reply whole (and copying it to rewrite) costs two or three times its size.
    assert grown_kib * 1024 < len(expected) // 2, f"natfwd grew by {grown_kib} KiB for a {len(expected)}-byte reply"
