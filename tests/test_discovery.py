"""Live node tracking: natfwd serve follows a moto-backed cluster (replace, add, remove) without a restart."""

from __future__ import annotations

import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from awskit import ACCOUNT, REGION, REPO, Aws, build_world, memcached_cluster
from awskit import aws_account as aws_account  # fixture "aws"
from awskit import moto_server as moto_server  # fixture "moto_url"
from conftest import free_port, free_run, wait_for
from labkit import memcached_server, root
from pymemcache.client.base import Client
from servekit import serving

from forwarder import config
from forwarder.portstate import assign_ports
from forwarder.rewriting import NodeMap

REFRESH_S = 0.3
LOOPBACK_MEMCACHED = """\
engine: memcached
public_address: 127.0.0.1
listen_address: 127.0.0.1
allowed_clients: [127.0.0.0/8]
"""


@pytest.mark.parametrize(
    ("node_ids", "previous", "reserved", "expected"),
    [
        (["0001", "0002", "0003"], {}, (), {"0001": 100, "0002": 101, "0003": 102}),
        (["0001", "0002"], {}, (101,), {"0001": 100, "0002": 102}),
        # an added node takes the next port; the others keep theirs
        (["0001", "0002", "0004"], {"0001": 100, "0002": 101}, (), {"0001": 100, "0002": 101, "0004": 102}),
        # a removed node frees its port; nobody is renumbered
        (["0001", "0003"], {"0001": 100, "0002": 101, "0003": 102}, (), {"0001": 100, "0003": 102}),
        # a later addition reuses the lowest free port
        (["0001", "0003", "0005"], {"0001": 100, "0003": 102}, (), {"0001": 100, "0003": 102, "0005": 101}),
    ],
)
def test_assign_ports(
    node_ids: list[str], previous: dict[str, int], reserved: tuple[int, ...], expected: dict[str, int]
) -> None:
    assert assign_ports(node_ids, previous, 100, frozenset(reserved)) == expected


def test_assign_ports_refuses_past_65535() -> None:
    with pytest.raises(config.ConfigError, match="discovery.first_port: 65535 leaves no room for 2 nodes"):
        assign_ports(["0001", "0002"], {}, 65535)


def test_node_map_matches_names_their_ips_and_ips() -> None:
    cfg = config.loads(
        """
engine: redis-cluster
public_address: 203.0.113.73
allowed_clients: [198.51.100.27/32]
forwards:
  - {port: 6379, target: "Node-1.example.internal.:6379"}
  - {port: 6380, target: "10.0.1.231:6379"}
"""
    )
    nodes = NodeMap()
    nodes.update(cfg, {"node-1.example.internal": ["10.0.1.230"]})
    assert nodes("node-1.example.internal", 6379) == ("203.0.113.73", 6379)
    assert nodes("NODE-1.example.internal.", 6379) == ("203.0.113.73", 6379)
    assert nodes("10.0.1.230", 6379) == ("203.0.113.73", 6379)
    assert nodes("10.0.1.231", 6379) == ("203.0.113.73", 6380)
    assert nodes("10.0.1.231", 6380) is None
    assert nodes("10.0.1.232", 6379) is None


# --- natfwd serve against a moto server -----------------------------------------------------------------------


def set_endpoints(cluster_id: str, ports: dict[str, int]) -> None:
    """Make moto's cluster list exactly these nodes (id -> loopback memcached port), as ElastiCache would."""
    from moto.elasticache.models import elasticache_backends

    cluster = elasticache_backends[ACCOUNT][REGION].cache_clusters[cluster_id]
    cluster.cache_nodes = [
        {"CacheNodeId": node_id, "CacheNodeStatus": "available", "Endpoint": {"Address": "127.0.0.1", "Port": port}}
        for node_id, port in ports.items()
    ]


def whoami(port: int) -> str | None:
    """Which node a new connection to natfwd's `port` reaches (each node holds its name under `whoami`)."""
    client = Client(("127.0.0.1", port), connect_timeout=1, timeout=1)
    try:
        value: Any = client.get("whoami")
        return value.decode() if value is not None else None
    except (OSError, ConnectionError):
        return None
    finally:
        client.close()


def set_whoami(port: int, name: str) -> None:
    """Store `name` under `whoami` on the memcached at `port`, directly (not through natfwd)."""
    direct = Client(("127.0.0.1", port), timeout=2)
    try:
        direct.set("whoami", name)
    finally:
        direct.close()


def write_loopback_config(directory: Path, rest: str) -> Path:
    """natfwd.yaml: memcached served on 127.0.0.1 to clients from 127.0.0.0/8, then the keys in `rest`."""
    path = directory / "natfwd.yaml"
    path.write_text(LOOPBACK_MEMCACHED + rest)
    return path


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def three_node_cluster(aws: Aws, stack: ExitStack, spare: int = 0) -> dict[str, int]:
    """moto's cluster "mc" listing nodes 0001-0003 on memcached node1-node3, plus `spare` more memcached nodes for
    later; every node holds its own name under `whoami`. Returns name -> port."""
    memcached_cluster(aws, build_world(aws), "mc", nodes=3)
    node_ports = {f"node{i}": stack.enter_context(memcached_server()) for i in range(1, 4 + spare)}
    for name, port in node_ports.items():
        set_whoami(port, name)
    set_endpoints("mc", {f"000{i}": node_ports[f"node{i}"] for i in range(1, 4)})
    return node_ports


def test_serve_follows_replaced_added_and_removed_nodes(aws: Aws, tmp_path: Path) -> None:
    with ExitStack() as stack:
        node_ports = three_node_cluster(aws, stack, spare=2)
        first = free_run(4)
        metrics_port = free_port()
        path = write_loopback_config(
            tmp_path,
            f"""
metrics: {{listen: "127.0.0.1:{metrics_port}"}}
discovery:
  cluster_id: mc
  region: {REGION}
  refresh_s: {REFRESH_S}
  first_port: {first}
  endpoint_url: {aws.url}
""",
        )
        with serving(path, [first, first + 1, first + 2], metrics_port) as serve:
            assert [whoami(p) for p in range(first, first + 3)] == ["node1", "node2", "node3"]

            # A replaced node: same node id, new endpoint. Its port follows for new connections.
            set_endpoints("mc", {"0001": node_ports["node1"], "0002": node_ports["node4"], "0003": node_ports["node3"]})
            replaced_s = wait_for(lambda: whoami(first + 1) == "node4", "the replaced node", 30, detail=serve.log)
            serve.wait_log("forward retargeted")

            # An added node gets the next port.
            set_endpoints(
                "mc",
                {
                    "0001": node_ports["node1"],
                    "0002": node_ports["node4"],
                    "0003": node_ports["node3"],
                    "0004": node_ports["node5"],
                },  # fmt: skip
            )
            added_s = wait_for(lambda: whoami(first + 3) == "node5", "the added node", 30, detail=serve.log)
            serve.wait_log("forward opened")

            # A removed node's port closes; the others keep theirs.
            set_endpoints("mc", {"0001": node_ports["node1"], "0002": node_ports["node4"], "0004": node_ports["node5"]})
            removed_s = wait_for(lambda: refused(first + 2), "the removed node's port closing", 30, detail=serve.log)
            assert [whoami(p) for p in (first, first + 1, first + 3)] == ["node1", "node4", "node5"]

            assert serve.metric("natfwd_forward_changes_total", change="retargeted") == 1
            assert serve.metric("natfwd_forward_changes_total", change="opened") == 1
            assert serve.metric("natfwd_forward_changes_total", change="closed") == 1
            # At most a few refresh periods each (printed with -s for the record).
            print(f"followed: replaced {replaced_s:.2f} s, added {added_s:.2f} s, removed {removed_s:.2f} s")
            assert max(replaced_s, added_s, removed_s) < 10 * REFRESH_S + 1


@pytest.mark.parametrize("workers", [1, 2])  # with 2, each worker polls and /metrics must sum both
def test_serve_keeps_serving_when_the_api_fails_and_counts_it(aws: Aws, tmp_path: Path, workers: int) -> None:
    memcached_cluster(aws, build_world(aws), "mc", nodes=1)
    with memcached_server() as node_port:
        set_whoami(node_port, "node1")
        set_endpoints("mc", {"0001": node_port})
        first, metrics_port = free_port(), free_port()
        path = write_loopback_config(
            tmp_path,
            f"""
workers: {workers}
metrics: {{listen: "127.0.0.1:{metrics_port}"}}
discovery: {{cluster_id: mc, region: {REGION}, refresh_s: {REFRESH_S}, first_port: {first}, endpoint_url: {aws.url}}}
""",
        )
        with serving(path, [first], metrics_port) as serve:
            from moto.elasticache.models import elasticache_backends

            time.sleep(3 * REFRESH_S)  # polls that succeed count nothing
            assert serve.metric("natfwd_discovery_errors_total", source="elasticache") == 0
            clusters = elasticache_backends[ACCOUNT][REGION].cache_clusters
            cluster = clusters.pop("mc")  # DescribeCacheClusters now fails
            serve.wait_log("discovery failed; keeping the current forwards", timeout_s=5, count=2 * workers)
            assert whoami(first) == "node1"
            assert serve.proc.poll() is None

            clusters["mc"] = cluster  # the API answers again: the count stops growing

            # Every worker logs each failed poll once; the counter, summed over workers, matches the log exactly
            # (read the log first: a poll in flight during the swap may still count, then log, a moment later).
            def counted_as_logged() -> bool:
                failures = serve.log().count("discovery failed")
                return serve.metric("natfwd_discovery_errors_total", source="elasticache") == failures

            wait_for(counted_as_logged, "the counter matching the logged failures", 30, detail=serve.log)
            time.sleep(3 * REFRESH_S)
            assert counted_as_logged()  # and stays so once the polls succeed again
            assert serve.metric("natfwd_discovery_errors_total", source="dns") == 0  # 127.0.0.1 is not looked up


def test_serve_start_fails_clearly_when_the_cluster_is_missing(aws: Aws, tmp_path: Path) -> None:
    path = write_loopback_config(
        tmp_path,
        f"discovery: {{cluster_id: ghost, region: {REGION}, first_port: {free_port()}, endpoint_url: {aws.url}}}\n",
    )
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=aws.cli_env(),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert "natfwd: error: discovery: cannot list the nodes of 'ghost'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("state_file", "workers", "kept"),
    [(True, 1, True), (True, 2, True), (False, 1, False)],
    ids=["state-file", "state-file-2-workers", "no-state-file-renumbers"],
)
def test_a_state_file_keeps_each_nodes_port_across_a_restart(
    aws: Aws, tmp_path: Path, state_file: bool, workers: int, kept: bool
) -> None:
    with ExitStack() as stack:
        node_ports = three_node_cluster(aws, stack)
        first = free_run(3)
        state = f"  state_file: {tmp_path / 'ports.json'}\n" if state_file else ""
        path = write_loopback_config(
            tmp_path,
            f"workers: {workers}\ndrain_timeout_s: 1\ndiscovery:\n  cluster_id: mc\n  region: {REGION}\n"
            f"  refresh_s: {REFRESH_S}\n"
            f"  first_port: {first}\n  endpoint_url: {aws.url}\n{state}",
        )
        with serving(path, [first, first + 1, first + 2]) as serve:
            # 0001 goes away: its port closes, the other two keep theirs.
            set_endpoints("mc", {"0002": node_ports["node2"], "0003": node_ports["node3"]})
            wait_for(lambda: refused(first), "the removed node's port closing", 30, detail=serve.log)
            assert [whoami(first + 1), whoami(first + 2)] == ["node2", "node3"]
        # serving() kills the supervisor; its workers drain on their own: wait until none still listens.
        wait_for(
            lambda: all(refused(p) for p in range(first, first + 3)), "the old workers stopping", 30, detail=serve.log
        )
        ports = [first + 1, first + 2] if kept else [first, first + 1]
        restarted = tmp_path / "restarted.yaml"  # the same config; its own log next to it
        restarted.write_text(path.read_text())
        with serving(restarted, ports) as serve:
            assert [whoami(port) for port in ports] == ["node2", "node3"]
            assert refused(first) is kept  # without the file the restart renumbers from first_port


def test_a_state_file_that_cannot_be_written_stops_the_start(aws: Aws, tmp_path: Path) -> None:
    memcached_cluster(aws, build_world(aws), "mc", nodes=1)
    with memcached_server() as node_port:
        set_endpoints("mc", {"0001": node_port})
        missing = tmp_path / "missing" / "ports.json"
        path = write_loopback_config(
            tmp_path,
            f"discovery: {{cluster_id: mc, region: {REGION}, first_port: {free_run(1)}, endpoint_url: {aws.url}, "
            f"state_file: {missing}}}\n",
        )
        result = subprocess.run(
            [sys.executable, "-m", "forwarder", "serve", "--config", str(path)],
            capture_output=True, text=True, timeout=60, env=aws.cli_env(), cwd=REPO, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"natfwd: error: discovery.state_file: cannot write {missing}" in result.stderr
    assert "Traceback" not in result.stderr


# --- DNS re-resolution that fails, without a packet leaving the host ----------------------------------------------


@contextmanager
def nxdomain_server() -> Iterator[tuple[str, list[str]]]:
    """A DNS server on a loopback address of its own that answers NXDOMAIN to every query.

    Yields its address and the list of names it was asked for.
    """
    address = f"127.53.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 53))
    sock.settimeout(0.1)
    asked: list[str] = []
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            try:
                query, client = sock.recvfrom(512)
            except TimeoutError:
                continue
            labels, offset = [], 12
            while offset < len(query) and query[offset]:
                labels.append(query[offset + 1 : offset + 1 + query[offset]].decode(errors="replace"))
                offset += 1 + query[offset]
            asked.append(".".join(labels))
            (flags,) = struct.unpack("!H", query[2:4])
            header = query[:2] + struct.pack("!HHHHH", 0x8000 | (flags & 0x7900) | 0x0080 | 3, 1, 0, 0, 0)
            sock.sendto(header + query[12 : offset + 5], client)  # QR, the query's opcode and RD, RA, NXDOMAIN

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield address, asked
    finally:
        stop.set()
        thread.join(5)
        sock.close()


@root  # a mount namespace gives natfwd its own resolv.conf, pointing at the loopback server above
def test_a_node_name_that_does_not_resolve_is_counted_once_per_worker(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    path = write_loopback_config(
        tmp_path,
        f"""
workers: 2
metrics: {{listen: "127.0.0.1:{metrics_port}"}}
forwards:
  - {{port: {port}, target: "node-gone.natfwd-test.invalid:11211"}}
""",
    )
    with nxdomain_server() as (dns_address, asked):
        resolv = tmp_path / "resolv.conf"
        resolv.write_text(f"nameserver {dns_address}\noptions attempts:1 timeout:1\n")
        # unshare execs sh, which execs python: the process started is natfwd's supervisor.
        private_resolv = ("unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                          'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv))  # fmt: skip
        with serving(path, [metrics_port], metrics_port, wrapper=private_resolv) as serve:
            serve.wait_log("forwarding", count=2)
            # Each worker resolves its node names once at start (the next round is DNS_REFRESH_S = 30 s later).
            assert serve.metric("natfwd_discovery_errors_total", source="dns") == 2
            assert serve.metric("natfwd_discovery_errors_total", source="elasticache") == 0  # no discovery section
            assert "node-gone.natfwd-test.invalid" in asked  # a real lookup, answered by our server alone
            assert serve.proc.poll() is None  # an unresolvable node does not stop natfwd
