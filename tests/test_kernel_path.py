"""`natfwd serve` with data_path kernel/auto: the config key, the nft table it renders, the counters and conntrack
it reads, and the whole thing in the lab with real nft in the NAT namespace."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from awskit import ACCOUNT, REGION, Aws
from awskit import aws_account as aws_account  # fixture "aws"
from awskit import moto_server as moto_server  # fixture "moto_url"
from conftest import wait_for
from labkit import REPO, root, running_lab, sysctl
from prometheus_client import CollectorRegistry
from reliakit import parse_metrics

from forwarder import config, iptables, kernelpath, metrics, netns, supervisor
from forwarder.errors import NatfwdError
from forwarder.lab import CLIENT_ADDRESS, PUBLIC_ADDRESS, Lab

BASE = (
    "engine: memcached\npublic_address: 203.0.113.73\nallowed_clients: [198.51.100.27/32]\n"
    "forwards:\n  - {port: 11211, target: '10.0.1.230:11211'}\n"
)


# --- the config key ------------------------------------------------------------------------------------------


def test_data_path_defaults_to_userspace_and_kernel_takes_every_forward() -> None:
    assert config.loads(BASE).data_path == "userspace"
    assert config.loads(BASE).kernel_forwards == ()
    kernel = config.loads(BASE + "data_path: kernel\n")
    assert kernel.kernel_forwards == kernel.forwards


@pytest.mark.parametrize(
    ("extra", "on_kernel"),
    [
        ("", True),
        ("multiplex: true\n", False),
        ("upstream_tls: {}\n", False),
        ("auto_discovery: {port: 11210, target: 'cfg.example:11211'}\n", True),  # its own port stays relayed
    ],
)
def test_auto_puts_forwards_on_the_kernel_unless_they_need_the_relay(extra: str, on_kernel: bool) -> None:
    cfg = config.loads(BASE + "data_path: auto\n" + extra)
    assert cfg.kernel_forwards == (cfg.forwards if on_kernel else ())


def test_auto_keeps_redis_cluster_on_the_relay() -> None:
    cfg = config.loads(BASE.replace("memcached", "redis-cluster") + "data_path: auto\n")
    assert cfg.kernel_forwards == ()


@pytest.mark.parametrize(
    ("started_with", "wanted", "applied"),
    [("userspace", "kernel", "userspace"), ("userspace", "auto", "userspace"), ("auto", "kernel", "kernel"),
     ("kernel", "userspace", "userspace"), ("kernel", "auto", "auto")],
)  # fmt: skip
def test_a_reload_turns_the_kernel_path_on_only_in_a_serve_started_with_it(
    started_with: config.DataPath, wanted: str, applied: str
) -> None:
    new = config.loads(BASE + f"data_path: {wanted}\n")
    assert config.reloadable(started_with, new).data_path == applied
    assert config.reloadable(started_with, new).forwards == new.forwards


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("data_path: fast\n", "x.yaml:6: data_path: 'fast' is not valid; expected one of userspace, kernel, auto"),
        (
            "data_path: kernel\nmultiplex: true\n",
            "x.yaml:6: data_path: kernel cannot serve these forwards (multiplex: only the relay shares node "
            "connections); use data_path: auto, which keeps them on the relay, or userspace",
        ),
        (
            "data_path: kernel\nupstream_tls: {}\n",
            "x.yaml:6: data_path: kernel cannot serve these forwards (upstream_tls: the kernel cannot open TLS to "
            "the nodes); use data_path: auto, which keeps them on the relay, or userspace",
        ),
        (
            "data_path: kernel\nauto_discovery: {port: 11210, target: 'cfg.example:11211'}\n",
            "x.yaml:6: data_path: kernel cannot serve auto_discovery (its answers need node addresses rewritten); "
            "use data_path: auto, which keeps that port on the relay and the forwards on the kernel",
        ),
    ],
)
def test_data_path_errors_name_the_key_and_the_way_out(extra: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.loads(BASE + extra, source="x.yaml")
    assert str(caught.value) == message


def test_kernel_with_redis_cluster_is_refused() -> None:
    with pytest.raises(config.ConfigError, match=r"data_path: kernel cannot serve these forwards \(engine redis-"):
        config.loads(BASE.replace("memcached", "redis-cluster") + "data_path: kernel\n")


# --- rendering (pure) ----------------------------------------------------------------------------------------

TABLE = """\
table inet natfwd_serve {
\tcounter f11211_accepted {}
\tcounter f11211_to_node {}
\tcounter f11211_to_client {}
\tcounter f11211_refused {}
\tcounter f11212_accepted {}
\tcounter f11212_to_node {}
\tcounter f11212_to_client {}
\tcounter f11212_refused {}
\tset allowed4 { type ipv4_addr; flags interval; elements = { 10.0.0.0/8, 198.51.100.27/32 }; }
\tset allowed6 { type ipv6_addr; flags interval; elements = { fd00::/64 }; }
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\t# 11211 -> 10.0.1.230:11211
\t\tfib daddr type local ip saddr @allowed4 tcp dport 11211 counter name "f11211_accepted" dnat ip to 10.0.1.230:11211
\t\t# 11212 -> node.example:6379
\t\tfib daddr type local ip saddr @allowed4 tcp dport 11212 counter name "f11212_accepted" dnat ip to 10.0.1.9:6379
\t\tfib daddr type local ip6 saddr @allowed6 tcp dport 11212 counter name "f11212_accepted" dnat ip6 to [fd00::5]:6379
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tct status dnat meta l4proto tcp ct original proto-dst { 11211, 11212 } masquerade
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tct status dnat meta l4proto tcp counter name ct direction . ct original proto-dst map { original . 11211 : "f11211_to_node", reply . 11211 : "f11211_to_client", original . 11212 : "f11212_to_node", reply . 11212 : "f11212_to_client" }
\t}
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tmeta nfproto ipv4 iifname != "lo" ip saddr != @allowed4 tcp dport 11211 tcp flags syn / syn,ack counter name "f11211_refused" reject with tcp reset
\t\tmeta nfproto ipv6 iifname != "lo" ip6 saddr != @allowed6 tcp dport 11211 tcp flags syn / syn,ack counter name "f11211_refused" reject with tcp reset
\t\tmeta nfproto ipv4 iifname != "lo" ip saddr != @allowed4 tcp dport 11212 tcp flags syn / syn,ack counter name "f11212_refused" reject with tcp reset
\t\tmeta nfproto ipv6 iifname != "lo" ip6 saddr != @allowed6 tcp dport 11212 tcp flags syn / syn,ack counter name "f11212_refused" reject with tcp reset
\t}
}
"""  # noqa: E501 - nft rules are one line each

TWO_FORWARDS = (
    "engine: memcached\npublic_address: 203.0.113.73\nlisten_address: '::'\ndata_path: kernel\n"
    "allowed_clients: [10.1.0.0/16, 10.0.0.0/8, 198.51.100.27/32, fd00::/64]\n"
    "forwards:\n  - {port: 11211, target: '10.0.1.230:11211'}\n  - {port: 11212, target: 'node.example:6379'}\n"
)


def test_the_table_is_replaced_whole_at_start() -> None:
    table = iptables.serve_table(config.loads(TWO_FORWARDS), {"node.example": ["fd00::5", "10.0.1.9", "10.0.1.8"]})
    assert iptables.render_serve(table, replace=True) == (
        "# natfwd serve, data_path kernel: 2 forward(s); table inet natfwd_serve is natfwd's own\n"
        "table inet natfwd_serve\ndelete table inet natfwd_serve\n" + TABLE
    )


def test_an_update_keeps_the_counters_of_the_forwards_that_stay() -> None:
    table = iptables.serve_table(config.loads(TWO_FORWARDS), {"node.example": ["fd00::5", "10.0.1.9"]})
    assert iptables.render_serve(table, replace=False, dropped=[11213]) == (
        "# natfwd serve, data_path kernel: 2 forward(s); table inet natfwd_serve is natfwd's own\n"
        + "".join(f"flush chain inet natfwd_serve {chain}\n" for chain in ("prerouting", "postrouting", "forward"))
        + "flush chain inet natfwd_serve input\n"
        + "flush set inet natfwd_serve allowed4\nflush set inet natfwd_serve allowed6\n"
        + "".join(
            f"delete counter inet natfwd_serve f11213_{kind}\n"
            for kind in ("accepted", "to_node", "to_client", "refused")
        )
        + TABLE
    )


def test_a_specific_listen_address_and_an_unresolved_name() -> None:
    text = TWO_FORWARDS.replace("'::'", "203.0.113.73")
    table = iptables.serve_table(config.loads(text), {})
    assert table.forwards[1] == iptables.KernelForward(11212, "node.example:6379", None, None, 6379)
    rendered = iptables.render_serve(table, replace=True)
    dnat = [line.strip() for line in rendered.splitlines() if "dnat ip" in line]
    assert dnat == [
        'ip daddr 203.0.113.73 ip saddr @allowed4 tcp dport 11211 counter name "f11211_accepted" dnat ip to '
        "10.0.1.230:11211"
    ]  # the name without an address has no rule yet; its refusal rule stays
    refusals = [line.strip() for line in rendered.splitlines() if "reject" in line]
    assert len(refusals) == 2 and all(
        line.startswith('meta nfproto ipv4 iifname != "lo" ip daddr 203.0.113.73 ') for line in refusals
    )


def test_draining_keeps_the_nat_chains_empty_and_the_byte_counters() -> None:
    table = iptables.serve_table(config.loads(BASE + "data_path: kernel\n"), accepting=False)
    rendered = iptables.render_serve(table, replace=False)
    assert "dnat" not in rendered.replace("ct status dnat", "") and "masquerade" not in rendered
    assert "reject" not in rendered
    assert "type nat hook prerouting" in rendered and "type nat hook postrouting" in rendered
    assert rendered.count("counter name ct direction . ct original proto-dst map") == 1
    # With no forward left (a reload to userspace), a rule still needs conntrack, so translated flows keep going.
    empty = iptables.render_serve(iptables.serve_table(config.loads(BASE)), replace=False)
    assert '\t\tct status dnat comment "keeps conntrack on for the flows natfwd translated"\n' in empty


# --- reading the kernel back (pure) --------------------------------------------------------------------------


def test_counters_are_parsed_from_nft_json() -> None:
    text = (
        '{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"counter": {"family": "inet", "name": "f11211_accepted",'
        ' "table": "natfwd_serve", "handle": 3, "packets": 2, "bytes": 120}}, {"counter": {"family": "inet", '
        '"name": "f11211_to_node", "table": "natfwd_serve", "handle": 4, "packets": 9, "bytes": 700}}]}'
    )
    assert kernelpath.parse_counters(text) == {"f11211_accepted": (2, 120), "f11211_to_node": (9, 700)}
    with pytest.raises(ValueError):
        kernelpath.parse_counters("Error: something")


CONNTRACK = """\
ipv4     2 tcp      6 431999 ESTABLISHED src=198.51.100.27 dst=203.0.113.73 sport=44550 dport=11211 \
src=10.0.1.231 dst=10.0.1.1 sport=11211 dport=44550 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 119 TIME_WAIT src=198.51.100.27 dst=203.0.113.73 sport=44551 dport=11211 \
src=10.0.1.231 dst=10.0.1.1 sport=11211 dport=44551 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 60 SYN_SENT src=198.51.100.27 dst=203.0.113.73 sport=44552 dport=11212 \
src=10.0.1.232 dst=10.0.1.1 sport=11211 dport=44552 [UNREPLIED] mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=40000 dport=11211 \
src=127.0.0.1 dst=127.0.0.1 sport=11211 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=10.0.1.1 dst=10.0.1.2 sport=53 dport=11211 src=10.0.1.2 dst=10.0.1.1 sport=11211 \
dport=53 mark=0 zone=0 use=2
ipv4     2 tcp      6 9 CLOSE src=198.51.100.27 dst=203.0.113.73 sport=44553 dport=11212 \
src=10.0.1.232 dst=10.0.1.1 sport=11211 dport=44553 [ASSURED] mark=0 zone=0 use=2
ipv6     10 tcp      6 431999 CLOSE_WAIT src=fd00::1 dst=fd00::2 sport=5000 dport=11211 src=fd00::9 dst=fd00::2 \
sport=11211 dport=5000 [ASSURED] mark=0 zone=0 use=2
"""
# `conntrack -L` prints the same flows without the leading family fields.
CONNTRACK_TOOL = "\n".join(line.split(None, 2)[2] for line in CONNTRACK.splitlines())


@pytest.mark.parametrize("text", [CONNTRACK, CONNTRACK_TOOL], ids=["proc", "conntrack-tool"])
def test_live_flows_are_the_translated_ones_tcp_has_not_finished(text: str) -> None:
    # 11211: one ESTABLISHED and one CLOSE_WAIT (IPv6) translated flow; TIME_WAIT, an untranslated local one and
    # UDP do not count. 11212: a connection still being made (and one closed). 11213: nothing.
    assert kernelpath.count_live(text, [11211, 11212, 11213]) == {11211: 2, 11212: 1, 11213: 0}


def test_conntrack_is_read_again_once_the_last_read_is_a_small_share_of_the_time_since() -> None:
    assert kernelpath.next_conntrack_read(100.0, 100.2) == pytest.approx(100.0 + 0.2 / kernelpath.CONNTRACK_SHARE)
    assert kernelpath.next_conntrack_read(100.0, 100.0) == 100.0  # a quick read: every tick
    assert kernelpath.CONNTRACK_SHARE <= 0.05


def test_direction_labels_are_those_of_the_relay() -> None:
    assert (kernelpath.DIRECTION_TO_NODE, kernelpath.DIRECTION_TO_CLIENT) == (
        metrics.DIRECTION_TO_NODE,
        metrics.DIRECTION_TO_CLIENT,
    )


def test_missing_nft_and_missing_capability_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(NatfwdError, match=r"needs the nft command, which is not installed; install nftables"):
        kernelpath.find_nft(str(tmp_path))
    error = kernelpath.nft_failure("netlink: Error: cache initialization failed: Operation not permitted\n", "x")
    assert "CAP_NET_ADMIN" in str(error) and str(error).startswith("x: nft was refused (Operation not permitted)")


# --- in the lab: real nft in the NAT namespace ---------------------------------------------------------------

UNTRUSTED_ADDRESS = "198.51.100.99"  # a second address on the client's side, outside allowed_clients


@dataclass
class KernelServe:
    lab: Lab
    process: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with netns.entered(self.lab.nat):
            text = urllib.request.urlopen("http://127.0.0.1:9108/metrics", timeout=5).read().decode()
        return parse_metrics(text)

    def metric(self, name: str, **labels: str) -> float:
        return self.samples().get((name, frozenset(labels.items())), 0.0)

    def table(self) -> str | None:
        listed = self.lab.run(self.lab.nat, ["nft", "list", "table", "inet", "natfwd_serve"], check=False)
        return listed.stdout if listed.returncode == 0 else None


def kernel_config(the_lab: Lab, node: int = 0, extra: str = "") -> str:
    target = the_lab.nodes[node]
    return (
        f"engine: memcached\npublic_address: {PUBLIC_ADDRESS}\ndata_path: kernel\n"
        f"allowed_clients: [{CLIENT_ADDRESS}/32]\n"
        f"forwards:\n  - {{port: 11211, target: '{target.address}:{target.port}'}}\n"
        f"metrics: {{listen: '127.0.0.1:9108'}}\ndrain_timeout_s: 30\n{extra}"
    )


def start_serve(
    the_lab: Lab, tmp_path: Path, text: str, name: str = "serve", env: dict[str, str] | None = None
) -> KernelServe:
    """natfwd serve in the NAT namespace, once it has programmed its table and serves its metrics."""
    serve = launch(the_lab, tmp_path, text, name, env)
    process = serve.process
    wait_for(
        lambda: "kernel path on" in serve.log() or process.poll() is not None,
        "natfwd serve to program its table",
        30,
        detail=serve.log,
    )
    assert process.poll() is None, serve.log()
    the_lab.wait_listening(the_lab.nat, "127.0.0.1", 9108, 15.0, process)
    return serve


def launch(
    the_lab: Lab, tmp_path: Path, text: str, name: str = "serve", env: dict[str, str] | None = None
) -> KernelServe:
    """natfwd serve with `text` as its config, started in the NAT namespace."""
    config_path = tmp_path / f"{name}.yaml"
    config_path.write_text(text)
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as log:
        process = the_lab.popen(
            the_lab.nat,
            [sys.executable, "-m", "forwarder", "serve", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**(env or os.environ), "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )
    return KernelServe(the_lab, process, config_path, log_path)


@contextmanager
def kernel_lab(nodes: int = 2) -> Iterator[Lab]:
    with running_lab(nodes=nodes) as the_lab:
        # The untrusted source: a second address in the client's namespace, routed from the NAT box like the first.
        the_lab.run(the_lab.client, ["ip", "addr", "add", f"{UNTRUSTED_ADDRESS}/32", "dev", "eth0"])
        the_lab.run(the_lab.nat, ["ip", "route", "add", f"{UNTRUSTED_ADDRESS}/32", "dev", "eth0"])
        yield the_lab


def connect(the_lab: Lab, source: str = CLIENT_ADDRESS) -> socket.socket:
    with netns.entered(the_lab.client):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect((PUBLIC_ADDRESS, 11211))
    except BaseException:
        sock.close()
        raise
    return sock


def ask(sock: socket.socket, request: bytes) -> bytes:
    sock.sendall(request)
    data = b""
    while not data.endswith((b"END\r\n", b"STORED\r\n")):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def node_pid(sock: socket.socket) -> int:
    """Which node this connection reaches: the memcached pid its `stats` reports."""
    line = next(line for line in ask(sock, b"stats\r\n").split(b"\r\n") if line.startswith(b"STAT pid "))
    return int(line.split()[2])


def node_pids(the_lab: Lab) -> list[int]:
    pids: list[int] = []
    for node in the_lab.nodes:
        with netns.entered(the_lab.nat):
            sock = socket.create_connection((node.address, node.port), timeout=5)
        with sock:
            pids.append(node_pid(sock))
    return pids


def listening(the_lab: Lab) -> str:
    return the_lab.run(the_lab.nat, ["ss", "-Htln", "sport = :11211"]).stdout


@root
def test_kernel_path_forwards_counts_refuses_retargets_and_drains(tmp_path: Path) -> None:
    with kernel_lab() as the_lab:
        serve = start_serve(the_lab, tmp_path, kernel_config(the_lab))
        pids = node_pids(the_lab)
        assert serve.table() is not None
        assert listening(the_lab) == ""  # no relay: the kernel forwards 11211
        assert sysctl(the_lab, the_lab.nat, "net.ipv4.ip_forward") == "1"

        # The trusted client reaches node 1 through the kernel; the counters move.
        first = connect(the_lab)
        value = b"x" * 5000
        assert ask(first, b"set k 0 0 5000\r\n" + value + b"\r\n") == b"STORED\r\n"
        assert node_pid(first) == pids[0]
        wait_for(lambda: serve.metric("natfwd_connections_accepted_total", forward="11211") == 1, "accepted", 15)
        wait_for(lambda: serve.metric("natfwd_connections_active", forward="11211") == 1, "active", 15)
        to_node = ("natfwd_bytes_total", {"forward": "11211", "direction": "client_to_node"})
        wait_for(lambda: serve.metric(to_node[0], **to_node[1]) > len(value), "bytes to the node", 15)
        wait_for(
            lambda: serve.metric("natfwd_bytes_total", forward="11211", direction="node_to_client") > 0,
            "bytes to the client",
            15,
        )

        # The untrusted source gets nothing: refused at once, counted, and no flow reaches a node.
        with pytest.raises(ConnectionRefusedError):
            connect(the_lab, UNTRUSTED_ADDRESS)
        wait_for(
            lambda: serve.metric("natfwd_connections_rejected_total", forward="11211", reason="not_allowed") == 1,
            "the refusal counted",
            15,
        )
        assert serve.metric("natfwd_connections_accepted_total", forward="11211") == 1

        # SIGHUP with node 2 as the target: new connections go there, the live one keeps node 1.
        serve.config_path.write_text(kernel_config(the_lab, node=1))
        serve.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "forward retargeted in the kernel" in serve.log(), "the retarget", 15, detail=serve.log)
        second = connect(the_lab)
        assert node_pid(second) == pids[1]
        assert node_pid(first) == pids[0]
        assert ask(first, b"get k\r\n") == b"VALUE k 0 5000\r\n" + value + b"\r\nEND\r\n"
        second.close()
        wait_for(lambda: serve.metric("natfwd_connections_accepted_total", forward="11211") == 2, "counted on", 15)
        assert serve.metric("natfwd_config_reloads_total", result="success") == 1

        # SIGTERM drains: the live flow keeps its translation, new ones are no longer forwarded...
        serve.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining" in serve.log(), "the drain", 15, detail=serve.log)
        with pytest.raises(ConnectionRefusedError):
            connect(the_lab)
        assert node_pid(first) == pids[0]
        assert serve.process.poll() is None
        # ...and once it has ended natfwd removes its table and exits 0.
        first.close()
        assert serve.process.wait(timeout=30) == 0, serve.log()
        assert serve.table() is None
        assert "Traceback" not in serve.log()


@root
def test_a_table_left_by_a_killed_natfwd_is_replaced_at_start(tmp_path: Path) -> None:
    with kernel_lab() as the_lab:
        pids = node_pids(the_lab)
        killed = start_serve(the_lab, tmp_path, kernel_config(the_lab), "killed")
        with connect(the_lab) as sock:
            assert node_pid(sock) == pids[0]
        killed.process.kill()
        killed.process.wait()
        stale = killed.table()
        assert stale is not None and "10.0.1.230:11211" in stale  # SIGKILL leaves the rules in the kernel

        serve = start_serve(the_lab, tmp_path, kernel_config(the_lab, node=1))
        table = serve.table()
        assert table is not None
        assert "10.0.1.230" not in table and table.count("dnat ip to 10.0.1.231:11211") == 1
        with connect(the_lab) as sock:
            assert node_pid(sock) == pids[1]
        wait_for(lambda: serve.metric("natfwd_connections_accepted_total", forward="11211") == 1, "accepted", 15)
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(timeout=30) == 0, serve.log()
        assert serve.table() is None


@root
def test_with_two_workers_one_programs_nft_and_metrics_count_once(tmp_path: Path) -> None:
    with kernel_lab() as the_lab:
        pids = node_pids(the_lab)
        serve = start_serve(the_lab, tmp_path, kernel_config(the_lab, extra="workers: 2\n"))
        assert "workers: 2 gain nothing with data_path kernel" in serve.log()
        for _ in range(3):
            with connect(the_lab) as sock:
                assert node_pid(sock) == pids[0]
        wait_for(lambda: serve.metric("natfwd_connections_accepted_total", forward="11211") == 3, "accepted", 15)
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(timeout=30) == 0, serve.log()
        assert serve.log().count("kernel path on") == 1 and serve.log().count("kernel path off") == 1
        assert serve.table() is None


@root
def test_a_flow_still_open_at_the_end_of_the_grace_is_cut(tmp_path: Path) -> None:
    with kernel_lab() as the_lab:
        serve = start_serve(
            the_lab, tmp_path, kernel_config(the_lab).replace("drain_timeout_s: 30", "drain_timeout_s: 1")
        )
        with connect(the_lab) as live:
            assert ask(live, b"get k\r\n") == b"END\r\n"
            wait_for(lambda: serve.metric("natfwd_connections_active", forward="11211") == 1, "active", 15)
            serve.process.send_signal(signal.SIGTERM)
            assert serve.process.wait(timeout=30) == 0, serve.log()
            assert "kernel path off: table removed table=natfwd_serve cut=1" in serve.log()
            assert serve.table() is None
            # Without a NAT chain the kernel no longer translates the flow: this host answers it with a reset.
            live.sendall(b"get k\r\n")
            with pytest.raises(ConnectionResetError):
                live.recv(100)


@root
def test_a_node_name_is_followed_into_the_kernel(tmp_path: Path) -> None:
    with kernel_lab() as the_lab:
        pids = node_pids(the_lab)
        # `ip netns exec` shows /etc/netns/NAME/hosts as /etc/hosts: the node's name, for natfwd in the NAT namespace.
        hosts_dir = Path("/etc/netns") / the_lab.nat
        hosts_dir.mkdir(parents=True)
        try:
            hosts = hosts_dir / "hosts"
            hosts.write_text("10.0.1.230 node.lab.internal\n")
            text = kernel_config(the_lab).replace("10.0.1.230:11211", "node.lab.internal:11211")
            serve = start_serve(the_lab, tmp_path, text)
            live = connect(the_lab)
            assert node_pid(live) == pids[0]
            with open(hosts, "r+") as rewrite:  # in place: the bind mount shows this inode
                rewrite.truncate(0)
                rewrite.write("10.0.1.231 node.lab.internal\n")
            serve.process.send_signal(signal.SIGHUP)  # resolves names now, not at the next 30 s round
            wait_for(lambda: "forward retargeted in the kernel" in serve.log(), "the new address", 15, detail=serve.log)
            with connect(the_lab) as sock:
                assert node_pid(sock) == pids[1]
            assert node_pid(live) == pids[0]
            live.close()
            serve.process.send_signal(signal.SIGTERM)
            assert serve.process.wait(timeout=30) == 0, serve.log()
        finally:
            shutil.rmtree(hosts_dir, ignore_errors=True)


@root
def test_auto_relays_what_needs_userspace_and_forwards_the_rest_in_the_kernel(tmp_path: Path) -> None:
    with kernel_lab() as the_lab:
        node = the_lab.nodes[0]
        discovery = f"auto_discovery: {{port: 11210, target: '{node.address}:{node.port}'}}\n"
        serve = start_serve(the_lab, tmp_path, kernel_config(the_lab).replace("data_path: kernel", "data_path: auto")
                            + discovery)  # fmt: skip
        assert listening(the_lab) == ""  # 11211 is the kernel's...
        the_lab.wait_listening(the_lab.client, PUBLIC_ADDRESS, 11210, 15.0, serve.process)  # ...11210 the relay's
        table = serve.table()
        assert table is not None and "11210" not in table
        with connect(the_lab) as sock:
            assert ask(sock, b"get nothing\r\n") == b"END\r\n"
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(timeout=30) == 0, serve.log()
        assert serve.table() is None


@root
def test_without_cap_net_admin_serve_says_which_capability_it_needs(tmp_path: Path) -> None:
    with running_lab(nodes=1) as the_lab:
        the_lab.run(the_lab.nat, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        config_path = tmp_path / "natfwd.yaml"
        config_path.write_text(kernel_config(the_lab))
        result = the_lab.run(
            the_lab.nat,
            ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin", "--",
             sys.executable, "-m", "forwarder", "serve", "--config", str(config_path)],
            check=False,
            timeout=60,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert "natfwd: error: data_path kernel: creating its table: nft was refused" in result.stderr
        assert "CAP_NET_ADMIN" in result.stderr and "Traceback" not in result.stderr
        assert the_lab.run(the_lab.nat, ["nft", "list", "tables"]).stdout == ""


@root
def test_without_conntrack_the_gauge_is_left_alone_and_the_drain_takes_its_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernelpath, "NFT_SEARCH_PATH", str(tmp_path))  # no conntrack tool either
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("natfwd.kernel").addHandler(handler)
    with running_lab(nodes=1) as the_lab:
        cfg = config.loads(kernel_config(the_lab))
        registry = CollectorRegistry()
        path = kernelpath.KernelPath(metrics.Metrics(registry), conntrack_path=str(tmp_path / "nf_conntrack"))

        async def main() -> tuple[float, float]:
            await path.apply(cfg, {})
            await path.poll()
            await path.poll()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 0.2
            await path.wait_idle(deadline)
            returned = loop.time()
            await path.stop()
            return deadline, returned

        try:
            with netns.entered(the_lab.nat):  # nft and the executor's threads start from this thread: they are there
                deadline, returned = asyncio.run(main())
        finally:
            logging.getLogger("natfwd.kernel").removeHandler(handler)
        assert returned >= deadline  # no flow count to wait for: the drain takes the whole grace period
        warned = [r for r in records if r.getMessage().startswith("natfwd_connections_active is not reported")]
        assert len(warned) == 1
        assert registry.get_sample_value("natfwd_connections_active", {"forward": "11211"}) == 0
        assert the_lab.run(the_lab.nat, ["nft", "list", "tables"]).stdout == ""


def set_nodes(cluster_id: str, addresses: dict[str, str]) -> None:
    """Make moto's cluster list exactly these nodes (id -> lab node address, port 11211), as ElastiCache would."""
    from moto.elasticache.models import elasticache_backends

    cluster = elasticache_backends[ACCOUNT][REGION].cache_clusters[cluster_id]
    cluster.cache_nodes = [
        {"CacheNodeId": node_id, "CacheNodeStatus": "available", "Endpoint": {"Address": address, "Port": 11211}}
        for node_id, address in addresses.items()
    ]


@contextmanager
def bridge(namespace: str, port: int) -> Iterator[int]:
    """A port on 127.0.0.1 inside `namespace`, relayed to 127.0.0.1:`port` here (this session's moto server), so
    natfwd in the lab reaches the API without a link between the lab and this namespace. Yields the port."""
    with netns.entered(namespace):
        listener = socket.socket()  # a socket stays in the namespace it was made in
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def handle(client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", port), timeout=30) as upstream:
            other = threading.Thread(target=pipe, args=(upstream, client))
            other.start()
            pipe(client, upstream)
            other.join()

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            client.settimeout(30)
            thread = threading.Thread(target=handle, args=(client,))
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=accept)
    acceptor.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        acceptor.join()
        listener.close()
        for thread in threads:
            thread.join(35)


@root
def test_discovery_follows_a_replaced_node_into_the_kernel(aws: Aws, tmp_path: Path) -> None:
    aws.elasticache.create_cache_cluster(
        CacheClusterId="mc", Engine="memcached", NumCacheNodes=2, CacheNodeType="cache.t3.micro", Port=11211
    )
    with kernel_lab(nodes=3) as the_lab, bridge(the_lab.nat, int(aws.url.rpartition(":")[2])) as api_port:
        pids = node_pids(the_lab)
        set_nodes("mc", {"0001": "10.0.1.230", "0002": "10.0.1.231"})
        text = kernel_config(the_lab).partition("forwards:")[0] + (
            f"discovery: {{cluster_id: mc, region: {REGION}, refresh_s: 0.3, first_port: 11211, "
            f"endpoint_url: 'http://127.0.0.1:{api_port}'}}\nmetrics: {{listen: '127.0.0.1:9108'}}\n"
        )
        serve = start_serve(the_lab, tmp_path, text, env=aws.cli_env())
        live = connect(the_lab)
        assert node_pid(live) == pids[0]
        # ElastiCache replaces node 0001: it comes back on another address. New connections follow; the live one
        # keeps its node.
        set_nodes("mc", {"0001": "10.0.1.232", "0002": "10.0.1.231"})
        wait_for(lambda: "forward retargeted in the kernel" in serve.log(), "the replaced node", 30, detail=serve.log)
        with connect(the_lab) as sock:
            assert node_pid(sock) == pids[2]
        assert node_pid(live) == pids[0]
        live.close()
        assert serve.metric("natfwd_forward_changes_total", change="retargeted") == 1
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(timeout=30) == 0, serve.log()


@root
def test_a_reload_moves_a_forward_from_the_kernel_to_the_relay_and_back(tmp_path: Path) -> None:
    with kernel_lab() as the_lab:
        pids = node_pids(the_lab)
        serve = start_serve(the_lab, tmp_path, kernel_config(the_lab))
        in_kernel = connect(the_lab)
        assert node_pid(in_kernel) == pids[0] and listening(the_lab) == ""

        serve.config_path.write_text(kernel_config(the_lab).replace("data_path: kernel", "data_path: userspace"))
        serve.process.send_signal(signal.SIGHUP)
        wait_for(lambda: listening(the_lab) != "", "the relay's listener", 15, detail=serve.log)
        relayed = connect(the_lab)
        assert node_pid(relayed) == pids[0]
        assert node_pid(in_kernel) == pids[0]  # the kernel still translates the flow it had
        table = serve.table()
        assert table is not None and "dnat ip to" not in table  # and translates no new one

        serve.config_path.write_text(kernel_config(the_lab, node=1))
        serve.process.send_signal(signal.SIGHUP)
        wait_for(lambda: listening(the_lab) == "", "the relay's listener closing", 15, detail=serve.log)
        with connect(the_lab) as sock:
            assert node_pid(sock) == pids[1]
        assert node_pid(relayed) == pids[0] and node_pid(in_kernel) == pids[0]  # both keep their paths
        relayed.close()
        in_kernel.close()
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(timeout=30) == 0, serve.log()
        assert serve.table() is None


def relayed_node_ports(the_lab: Lab, node: int = 0) -> list[int]:
    """The local ports of the NAT box's established connections to a node: the relay's node connections."""
    target = the_lab.nodes[node]
    listed = the_lab.run(
        the_lab.nat, ["ss", "-Htn", "state", "established", "dst", target.address, "dport", f"= :{target.port}"]
    ).stdout
    return [int(line.split()[2].rpartition(":")[2]) for line in listed.splitlines()]


@root
def test_a_kernel_client_is_never_given_the_address_of_a_relayed_node_connection(tmp_path: Path) -> None:
    # auto with multiplex: every forward is relayed, yet serve's table is there from the start (so conntrack is
    # on). A reload then moves the forward to the kernel while a multiplexed client keeps its shared connection.
    with kernel_lab() as the_lab:
        text = kernel_config(the_lab).replace("data_path: kernel", "data_path: auto")
        serve = start_serve(the_lab, tmp_path, text + "multiplex: true\n")
        assert serve.table() is not None
        shared = connect(the_lab)
        assert ask(shared, b"get nothing\r\n") == b"END\r\n"
        (port,) = relayed_node_ports(the_lab)

        serve.config_path.write_text(text)
        serve.process.send_signal(signal.SIGHUP)
        wait_for(lambda: listening(the_lab) == "", "the forward moving to the kernel", 15, detail=serve.log)
        # A client whose source port is the shared connection's: masquerade must not keep it. Without conntrack
        # knowing the shared connection, the node would take this SYN for it and answer with an ACK, the client
        # would reset, and the reset would close the shared connection under the multiplexed client.
        with netns.entered(the_lab.client):
            colliding = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with colliding:
            colliding.settimeout(10)
            colliding.bind((CLIENT_ADDRESS, port))
            colliding.connect((PUBLIC_ADDRESS, 11211))
            assert ask(colliding, b"get nothing\r\n") == b"END\r\n"
        assert relayed_node_ports(the_lab) == [port]  # the shared connection is still up...
        assert ask(shared, b"get nothing\r\n") == b"END\r\n"  # ...and serves its client
        shared.close()
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(timeout=30) == 0, serve.log()


@root
def test_a_reload_does_not_turn_the_kernel_path_on_in_a_serve_started_on_the_relay(tmp_path: Path) -> None:
    with kernel_lab() as the_lab:
        text = kernel_config(the_lab)
        serve = launch(the_lab, tmp_path, text.replace("data_path: kernel", "data_path: userspace"))
        config_path, process = serve.config_path, serve.process
        the_lab.wait_listening(the_lab.nat, "127.0.0.1", 9108, 15.0, process)
        wait_for(lambda: listening(the_lab) != "", "the relay's listener", 15, detail=serve.log)
        config_path.write_text(text)
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: "data_path changed from userspace" in serve.log(), "the warning", 15, detail=serve.log)
        wait_for(lambda: serve.metric("natfwd_config_reloads_total", result="success") == 1, "the reload", 15)
        assert serve.table() is None and listening(the_lab) != ""  # still relayed: the restart turns it on
        with connect(the_lab) as sock:
            assert ask(sock, b"get nothing\r\n") == b"END\r\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, serve.log()


@root
def test_a_worker_respawned_after_such_a_reload_stays_on_the_relay(tmp_path: Path) -> None:
    with kernel_lab() as the_lab:
        text = kernel_config(the_lab, extra="workers: 2\n")
        serve = launch(the_lab, tmp_path, text.replace("data_path: kernel", "data_path: userspace"))
        config_path, process = serve.config_path, serve.process

        def listeners() -> set[int]:
            listed = the_lab.run(the_lab.nat, ["ss", "-Htlnp", "sport = :11211"]).stdout
            return {int(pid) for pid in re.findall(r"pid=(\d+)", listed)}

        wait_for(lambda: len(listeners()) == 2, "both workers listening", 15, detail=serve.log)
        config_path.write_text(text)
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: serve.log().count("data_path changed from userspace") == 2, "both workers' warning", 15,
                 detail=serve.log)  # fmt: skip
        # The supervisor starts a dead worker again with the config the workers kept, not the file's. (It gives up on
        # a worker that dies within its first second, as one that cannot bind would.)
        time.sleep(supervisor.RESPAWN_DELAY_S)
        before = listeners()
        os.kill(min(before), signal.SIGKILL)
        wait_for(lambda: len(listeners()) == 2 and listeners() != before, "the respawned worker listening", 15,
                 detail=serve.log)  # fmt: skip
        assert serve.table() is None and "kernel path on" not in serve.log()
        with connect(the_lab) as sock:
            assert ask(sock, b"get nothing\r\n") == b"END\r\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, serve.log()


def _flows(count: int) -> str:
    """`count` live flows DNATed from the lab's forward 11211, as /proc/net/nf_conntrack lists them."""
    return "".join(
        f"ipv4     2 tcp      6 431999 ESTABLISHED src={CLIENT_ADDRESS} dst={PUBLIC_ADDRESS} sport={40000 + n} "
        f"dport=11211 src=10.0.1.231 dst=10.0.1.1 sport=11211 dport={40000 + n} [ASSURED] mark=0 zone=0 use=2\n"
        for n in range(count)
    )


@root
def test_a_table_with_no_kernel_forward_reads_no_conntrack(tmp_path: Path) -> None:
    table = tmp_path / "nf_conntrack"
    table.write_text(_flows(2))
    with running_lab(nodes=1) as the_lab:
        # auto with multiplex: every forward relayed, and the table there only to keep conntrack on.
        cfg = config.loads(kernel_config(the_lab).replace("data_path: kernel", "data_path: auto") + "multiplex: true\n")
        path = kernelpath.KernelPath(metrics.Metrics(CollectorRegistry()), conntrack_path=str(table))

        async def main() -> None:
            await path.apply(cfg, {})
            assert path.table is not None and path.table.forwards == ()
            await path.poll()
            assert path._conntrack_due == 0.0 and path.live == {}  # not read
            the_lab.run(the_lab.nat, ["nft", "delete", "table", "inet", iptables.SERVE_TABLE])
            await path.poll()
            assert path.table is None  # the counters read still notices the table gone...
            await path.apply(cfg, {})  # ...and the next apply makes it again
            assert path.table is not None
            assert iptables.SERVE_TABLE in the_lab.run(the_lab.nat, ["nft", "list", "tables"]).stdout
            await path.stop()

        with netns.entered(the_lab.nat):
            asyncio.run(main())


@root
def test_the_active_gauge_reads_conntrack_only_when_due(tmp_path: Path) -> None:
    table = tmp_path / "nf_conntrack"
    with running_lab(nodes=1) as the_lab:
        cfg = config.loads(kernel_config(the_lab))
        registry = CollectorRegistry()
        path = kernelpath.KernelPath(metrics.Metrics(registry), conntrack_path=str(table))

        def active() -> float | None:
            return registry.get_sample_value("natfwd_connections_active", {"forward": "11211"})

        async def main() -> list[float | None]:
            seen = []
            loop = asyncio.get_running_loop()
            await path.apply(cfg, {})
            table.write_text(_flows(1))
            await path.poll()  # due from the start
            seen.append(active())
            table.write_text(_flows(3))
            path._conntrack_due = loop.time() + 3600  # as after a read that took 72 s
            await path.poll()
            seen.append(active())
            path._conntrack_due = loop.time()
            await path.poll()
            seen.append(active())
            assert path._conntrack_due >= loop.time() - 1  # set again by that read
            await path.stop()
            return seen

        with netns.entered(the_lab.nat):
            assert asyncio.run(main()) == [1.0, 1.0, 3.0]
