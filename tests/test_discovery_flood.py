"""A client-stored Auto Discovery value listing thousands of made-up nodes cannot flood natfwd's log."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Node, free_port, write_config
from servekit import serving

from forwarder.protocols.memcached import CLUSTER_KEY, render_cluster_config

GETS = 5
HANG_S = 30.0  # only stops a hang


def made_up_nodes(count: int) -> list[tuple[str, str, int]]:
    """Short entries, so that 38,000 of them fit in one memcached item of 1 MiB."""
    return [(f"m{n}", f"10.200.{n >> 8 & 255}.{n & 255}", 11211) for n in range(count)]


def get_reply(port: int, key: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_S) as sock:
        sock.sendall(b"get %s\r\n" % key)
        data = bytearray()
        while not data.endswith(b"END\r\n"):
            chunk = sock.recv(1 << 20)
            assert chunk, f"connection closed after {len(data)} bytes"
            data += chunk
        return bytes(data)


@pytest.mark.parametrize("nodes", [38_000, 1000], ids=["beyond-the-cap", "within-the-cap"])
def test_a_flood_of_made_up_nodes_logs_a_bounded_number_of_lines(
    nodes: int, start_memcached: Callable[..., Node], tmp_path: Path
) -> None:
    """Any client stores `AmazonElastiCache:cluster` listing thousands of made-up nodes, then gets it through the
    Auto Discovery port again and again: natfwd logs a bounded number of lines (not one per node per get), and
    the client gets exactly what the node holds when the list is beyond what natfwd rewrites."""
    node = start_memcached()
    payload = render_cluster_config(1, made_up_nodes(nodes))
    with socket.create_connection(("127.0.0.1", node.port), timeout=HANG_S) as sock:
        sock.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (CLUSTER_KEY, len(payload), payload))
        assert sock.recv(64) == b"STORED\r\n"
    direct = get_reply(node.port, CLUSTER_KEY)
    forward_port, discovery_port = free_port(), free_port()
    config = write_config(
        tmp_path / "natfwd.yaml",
        [(forward_port, node.address)],
        extra=f"auto_discovery:\n  port: {discovery_port}\n  target: '{node.address}'\n",
    )
    with serving(config, [forward_port, discovery_port]) as serve:
        before = serve.log().count("\n")
        replies = [get_reply(discovery_port, CLUSTER_KEY) for _ in range(GETS)]
        log = serve.log()
    lines = log.count("\n") - before
    print(f"\n{nodes} made-up nodes, {GETS} gets: {lines} log lines, {len(log.encode())} bytes of log")
    if nodes > 1024:
        assert replies == [direct] * GETS
    else:  # rewritten: none of the made-up nodes has a forward, so the list is empty
        assert replies[0].startswith(b"VALUE %s 0 " % CLUSTER_KEY) and b"|10.200." not in replies[0]
    assert "has no forward" in log or "passed unchanged" in log, log[-2000:]
    assert lines <= 12, log[-3000:]
