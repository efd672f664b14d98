"""`natfwd serve` as a real process between real clients (pymemcache, redis-py) and real memcached/redis-server."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from conftest import Node, free_port, write_config
from pymemcache.client.base import Client
from servekit import serving

_clients: list[Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def mc(port: int) -> Client:
    """A pymemcache client, closed after the test."""
    client = Client(("127.0.0.1", port), connect_timeout=5, timeout=10)
    _clients.append(client)
    return client


def forwards_for(nodes: list[Node]) -> list[tuple[int, str]]:
    return [(free_port(), node.address) for node in nodes]


def test_each_forward_reaches_its_own_node(tmp_path: Path, memcached_nodes: list[Node]) -> None:
    forwards = forwards_for(memcached_nodes)
    metrics_port = free_port()
    cfg = write_config(tmp_path / "natfwd.yaml", forwards, extra=f"metrics: {{listen: 127.0.0.1:{metrics_port}}}\n")
    for index, node in enumerate(memcached_nodes):
        mc(node.port).set("whoami", f"node{index}")
    with serving(cfg, [p for p, _ in forwards], metrics_port) as serve:
        for index, (port, _) in enumerate(forwards):
            client = mc(port)
            assert client.get("whoami") == f"node{index}".encode()
            client.close()
        time.sleep(1.2)  # byte counters are flushed once a second
        text = serve.metrics()
        for name in (
            "natfwd_connections_accepted_total",
            "natfwd_connections_rejected_total",
            "natfwd_connections_active",
            "natfwd_bytes_total",
            "natfwd_upstream_connect_seconds_bucket",
            "natfwd_config_reloads_total",
        ):
            assert f"# TYPE {name.removesuffix('_bucket').removesuffix('_total')}" in text, name
        port0 = str(forwards[0][0])
        assert serve.metric("natfwd_connections_accepted_total", forward=port0) == 2  # wait_port probe + client
        assert serve.metric("natfwd_bytes_total", forward=port0, direction="client_to_node") == len(b"get whoami\r\n")
        assert serve.metric("natfwd_bytes_total", forward=port0, direction="node_to_client") == len(
            b"VALUE whoami 0 5\r\nnode0\r\nEND\r\n"
        )
        assert serve.metric("natfwd_upstream_connect_seconds_count") >= 3


def test_large_values_many_connections_checksummed(tmp_path: Path, memcached_nodes: list[Node]) -> None:
    forwards = forwards_for(memcached_nodes)
    cfg = write_config(tmp_path / "natfwd.yaml", forwards)
    with serving(cfg, [p for p, _ in forwards]):

        def worker(i: int) -> int:
            port = forwards[i % len(forwards)][0]
            client = mc(port)
            done = 0
            for round_ in range(3):
                value = hashlib.sha512(f"{i}-{round_}".encode()).digest() * 14_000  # 896,000 bytes
                key = f"big-{i}-{round_}"
                assert client.set(key, value)
                got = client.get(key)
                assert got is not None and hashlib.sha256(got).digest() == hashlib.sha256(value).digest()
                done += 1
            client.close()
            return done

        with ThreadPoolExecutor(16) as pool:
            assert sum(pool.map(worker, range(32))) == 96


def test_pipelined_requests(tmp_path: Path, memcached_nodes: list[Node]) -> None:
    forwards = forwards_for(memcached_nodes[:1])
    cfg = write_config(tmp_path / "natfwd.yaml", forwards)
    with serving(cfg, [forwards[0][0]]), socket.create_connection(("127.0.0.1", forwards[0][0]), timeout=10) as sock:
        commands = b"".join(f"set p{i} 0 0 {len(str(i))}\r\n{i}\r\n".encode() for i in range(500))
        commands += b"".join(f"get p{i}\r\n".encode() for i in range(500))
        sock.sendall(commands)
        expected = b"STORED\r\n" * 500 + b"".join(
            f"VALUE p{i} 0 {len(str(i))}\r\n{i}\r\nEND\r\n".encode() for i in range(500)
        )
        received = b""
        while len(received) < len(expected):
            chunk = sock.recv(65536)
            assert chunk, "connection closed early"
            received += chunk
        assert received == expected


def test_redis_through_natfwd(tmp_path: Path, start_redis: Callable[..., Node]) -> None:
    node = start_redis()
    forwards = [(free_port(), node.address)]
    cfg = write_config(tmp_path / "natfwd.yaml", forwards, engine="redis")
    with serving(cfg, [forwards[0][0]]):
        client = redis.Redis(host="127.0.0.1", port=forwards[0][0], socket_timeout=10, protocol=2)
        value = os.urandom(900_000)
        assert client.set("big", value)
        assert client.get("big") == value
        pipe = client.pipeline(transaction=False)
        for _ in range(1000):
            pipe.incr("counter")
        assert pipe.execute()[-1] == 1000
        client.close()


def test_node_killed_mid_connection(tmp_path: Path, memcached_nodes: list[Node]) -> None:
    forwards = forwards_for(memcached_nodes)
    cfg = write_config(tmp_path / "natfwd.yaml", forwards)
    with serving(cfg, [p for p, _ in forwards]) as serve:
        victim = mc(forwards[0][0])
        survivor = mc(forwards[1][0])
        assert victim.set("a", "1", noreply=False) and survivor.set("b", "2", noreply=False)
        memcached_nodes[0].kill()
        with pytest.raises((ConnectionError, OSError, Exception)) as caught:  # noqa: B017 - pymemcache's own types
            victim.get("a")
        assert not isinstance(caught.value, TimeoutError), "natfwd closed the client; it did not have to time out"
        assert survivor.get("b") == b"2"
        fresh = mc(forwards[0][0])
        with pytest.raises((ConnectionError, OSError, Exception)):  # noqa: B017
            fresh.get("a")
        serve.wait_log("node connection failed")
        assert mc(forwards[2][0]).set("c", "3")


def test_untrusted_client_refused_and_counted(tmp_path: Path, memcached_nodes: list[Node]) -> None:
    forwards = forwards_for(memcached_nodes[:1])
    metrics_port = free_port()
    cfg = write_config(
        tmp_path / "natfwd.yaml",
        forwards,
        allowed="127.0.0.2/32",
        extra=f"metrics: {{listen: 127.0.0.1:{metrics_port}}}\n",
    )
    port = forwards[0][0]
    with serving(cfg, [port], metrics_port) as serve:
        # From 127.0.0.1: accepted by the kernel, then closed by natfwd before any byte reaches the node.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            try:
                sock.sendall(b"version\r\n")
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass
        # From 127.0.0.2, which is allowed.
        with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)) as sock:
            sock.sendall(b"version\r\n")
            assert sock.recv(100).startswith(b"VERSION ")
        assert (
            serve.metric("natfwd_connections_rejected_total", forward=str(port), reason="not_allowed") == 2
        )  # + wait_port probe
        assert serve.metric("natfwd_connections_accepted_total", forward=str(port)) == 1
        assert "connection refused" in serve.log() and "reason=not_allowed" in serve.log()


def test_reload_applies_changes_and_keeps_live_connections(tmp_path: Path, memcached_nodes: list[Node]) -> None:
    a, b, c = memcached_nodes
    for index, node in enumerate(memcached_nodes):
        mc(node.port).set("whoami", f"node{index}")
    port_keep, port_retarget, port_remove, port_new = (free_port() for _ in range(4))
    metrics_port = free_port()
    metrics = f"metrics: {{listen: 127.0.0.1:{metrics_port}}}\n"
    cfg = write_config(
        tmp_path / "natfwd.yaml",
        [(port_keep, a.address), (port_retarget, a.address), (port_remove, b.address)],
        extra=metrics,
    )
    with serving(cfg, [port_keep, port_retarget, port_remove], metrics_port) as serve:
        live_retarget = mc(port_retarget)
        live_removed = mc(port_remove)
        assert live_retarget.get("whoami") == b"node0"
        assert live_removed.get("whoami") == b"node1"
        write_config(cfg, [(port_keep, a.address), (port_retarget, c.address), (port_new, b.address)], extra=metrics)
        serve.signal(signal.SIGHUP)
        serve.wait_log("config reloaded")
        # Live connections keep their node, even on the removed forward.
        assert live_retarget.get("whoami") == b"node0"
        assert live_removed.get("whoami") == b"node1"
        # New connections follow the new config.
        assert mc(port_retarget).get("whoami") == b"node2"
        assert mc(port_new).get("whoami") == b"node1"
        assert mc(port_keep).get("whoami") == b"node0"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port_remove), timeout=2)
        assert serve.metric("natfwd_config_reloads_total", result="success") == 1

        # A broken config is refused; the old one keeps serving.
        cfg.write_text(cfg.read_text() + "bogus_key: 1\n")
        serve.signal(signal.SIGHUP)
        serve.wait_log("reload refused")
        assert "bogus_key: unknown key" in serve.log()
        assert mc(port_retarget).get("whoami") == b"node2"
        assert live_retarget.get("whoami") == b"node0"
        assert serve.metric("natfwd_config_reloads_total", result="failure") == 1
        assert serve.proc.poll() is None


def test_sigterm_drains_live_connections_then_exits_0(tmp_path: Path, memcached_nodes: list[Node]) -> None:
    forwards = forwards_for(memcached_nodes[:1])
    cfg = write_config(tmp_path / "natfwd.yaml", forwards, extra="drain_timeout_s: 10\n")
    port = forwards[0][0]
    with serving(cfg, [port]) as serve:
        live = mc(port)
        assert live.set("k", "before", noreply=False)  # a reply: the connection is live through natfwd
        serve.signal(signal.SIGTERM)
        serve.wait_log("draining")
        # Listeners are closed, but the live connection still works during the grace period.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        assert live.get("k") == b"before"
        live.close()
        assert serve.proc.wait(10) == 0


def test_sigterm_grace_period_cuts_stragglers(tmp_path: Path, memcached_nodes: list[Node]) -> None:
    forwards = forwards_for(memcached_nodes[:1])
    cfg = write_config(tmp_path / "natfwd.yaml", forwards, extra="drain_timeout_s: 0.5\n")
    with serving(cfg, [forwards[0][0]]) as serve:
        idle = mc(forwards[0][0])
        # With a reply, not pymemcache's default noreply: the connection must be live in natfwd before the
        # SIGTERM, or it may still sit in the accept backlog and be refused as draining instead.
        assert idle.set("k", "v", noreply=False)
        serve.signal(signal.SIGTERM)
        assert serve.proc.wait(10) == 0
        assert "aborted connections" in serve.log()


def test_two_workers_share_ports(tmp_path: Path, memcached_nodes: list[Node]) -> None:
    forwards = forwards_for(memcached_nodes[:1])
    metrics_port = free_port()
    cfg = write_config(
        tmp_path / "natfwd.yaml", forwards, extra=f"workers: 2\nmetrics: {{listen: 127.0.0.1:{metrics_port}}}\n"
    )
    port = forwards[0][0]
    tmp = tmp_path / "tmp"  # servekit's TMPDIR, where the supervisor keeps the workers' shared metrics files
    with serving(cfg, [port], metrics_port) as serve:
        serve.wait_log("forwarding", count=2)
        assert len(list(tmp.iterdir())) == 1

        def roundtrip(i: int) -> bool:
            client = mc(port)
            ok = client.set(f"w{i}", str(i)) and client.get(f"w{i}") == str(i).encode()
            client.close()
            return bool(ok)

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(roundtrip, range(200)))
        assert serve.metric("natfwd_connections_accepted_total", forward=str(port)) == 201  # + wait_port probe
        serve.signal(signal.SIGHUP)
        serve.wait_log("config reloaded", count=2)
        assert serve.metric("natfwd_config_reloads_total", result="success") == 1
        serve.signal(signal.SIGTERM)
        assert serve.proc.wait(15) == 0
    assert list(tmp.iterdir()) == []


def _server_side_owner(port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of `pids` holds the accepted end of the loopback connection from `client_port` to `port`."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == client_port:
            inodes.add(f"socket:[{inode}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    return None


def test_cpu_affinity_pins_each_worker_and_hands_it_the_connections_its_cpu_receives(
    tmp_path: Path, memcached_nodes: list[Node]
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("cpu_affinity needs two CPUs to steer between")
    forwards = forwards_for(memcached_nodes[:1])
    port = forwards[0][0]
    cfg = write_config(tmp_path / "natfwd.yaml", forwards, extra="workers: 2\ncpu_affinity: true\n")
    with serving(cfg, [port]) as serve:
        serve.wait_log("forwarding", count=2)
        workers = [int(k) for k in Path(f"/proc/{serve.proc.pid}/task/{serve.proc.pid}/children").read_text().split()]
        pinned = {pid: os.sched_getaffinity(pid) for pid in workers}
        assert sorted(pinned.values(), key=min) == [{cpus[0]}, {cpus[1]}]

        def owners_seen_from(cpu: int) -> list[int | None]:
            # Over loopback the SYN is handled on the CPU that sends it: a client thread pinned there.
            os.sched_setaffinity(0, {cpu})
            seen = []
            for _ in range(8):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(b"version\r\n")
                    assert sock.recv(100).startswith(b"VERSION ")  # accepted and relayed by now
                    seen.append(_server_side_owner(port, sock.getsockname()[1], workers))
            return seen

        for cpu in cpus[:2]:
            with ThreadPoolExecutor(1) as pool:  # the pin stays on that thread, not on the test's
                owners = pool.submit(owners_seen_from, cpu).result()
            # With plain SO_REUSEPORT hashing, 8 in a row on one worker is a 1-in-256 chance.
            assert owners == [pid for pid in workers if pinned[pid] == {cpu}] * 8
        serve.signal(signal.SIGTERM)
        assert serve.proc.wait(15) == 0


def test_port_in_use_is_a_clear_error(tmp_path: Path, memcached_nodes: list[Node]) -> None:
    node = memcached_nodes[0]
    cfg = write_config(tmp_path / "natfwd.yaml", [(node.port, node.address)])
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert (
        f"natfwd: error: port {node.port} is already in use on 127.0.0.1; is another natfwd or memcached" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
