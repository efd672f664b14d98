"""The lab's failover: a second NAT namespace takes the public address and a retrying client is served through it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from labkit import ROOT_MARKS, memcached_client, namespace_metric, natfwd, tcp_peers, unique_name

from benchmarks.failover import KEY, KV, Stage, fail_over, kv_client, staged
from forwarder import lab, netns
from forwarder.errors import NatfwdError
from forwarder.lab import CLIENT_ADDRESS, NAT_PRIVATE_ADDRESS, PUBLIC_ADDRESS
from forwarder.labfailover import STANDBY_PRIVATE_ADDRESS, FailoverLab, garp_frame

pytestmark = ROOT_MARKS

ACCEPTED = "natfwd_connections_accepted_total"


def _addresses(the_lab: FailoverLab, namespace: str) -> set[str]:
    out = the_lab.run(namespace, ["ip", "-o", "-4", "addr", "show"]).stdout
    return {f"{line.split()[1]} {line.split()[3]}" for line in out.splitlines()}


def _links() -> list[str]:
    out = subprocess.check_output(["ip", "-o", "link", "show"], text=True)
    return sorted(line.split(":")[1].strip() for line in out.splitlines())


def test_garp_frame_is_a_broadcast_who_has_for_the_address_itself() -> None:
    mac = bytes.fromhex("02aabbccddee")
    frame = garp_frame(mac, PUBLIC_ADDRESS)
    address = bytes([203, 0, 113, 73])
    assert len(frame) == 60
    assert frame[:14] == b"\xff" * 6 + mac + b"\x08\x06"
    assert frame[14:22] == bytes.fromhex("0001080006040001")  # Ethernet, IPv4, request
    assert frame[22:42] == mac + address + b"\x00" * 6 + address  # sender and target are both the address
    assert frame[42:] == b"\x00" * 18


def test_failover_topology_has_one_public_holder_and_no_way_out() -> None:
    host_links = _links()
    the_lab = FailoverLab(unique_name("fo"), nodes=2)
    try:
        the_lab.build()
        assert lab.existing_namespaces(the_lab.name) == sorted(the_lab.namespaces)
        assert _links() == host_links  # nothing attached to the host's namespace
        assert _addresses(the_lab, the_lab.client) == {"lo 127.0.0.1/8", f"eth0 {CLIENT_ADDRESS}/32"}
        assert _addresses(the_lab, the_lab.nat) == {
            "lo 127.0.0.1/8",
            f"eth0 {PUBLIC_ADDRESS}/32",
            f"eth1 {NAT_PRIVATE_ADDRESS}/24",
        }
        # The standby has only its private address until it takes the public one.
        assert _addresses(the_lab, the_lab.standby) == {"lo 127.0.0.1/8", f"eth1 {STANDBY_PRIVATE_ADDRESS}/24"}
        assert _addresses(the_lab, the_lab.switch) == {"lo 127.0.0.1/8"}
        for namespace in the_lab.namespaces:
            assert the_lab.run(namespace, ["ip", "route", "show", "default"]).stdout == ""
            assert the_lab.run(namespace, ["ip", "-6", "route", "show", "default"]).stdout == ""
            unreachable = the_lab.run(namespace, ["ip", "route", "get", "192.0.2.1"], check=False)
            assert unreachable.returncode != 0
        the_lab.claim_address(the_lab.standby)
        assert f"eth0 {PUBLIC_ADDRESS}/32" in _addresses(the_lab, the_lab.standby)
    finally:
        the_lab.teardown()
    assert lab.existing_namespaces(the_lab.name) == []


def _served_by(stage: Stage) -> set[str]:
    """The NAT private addresses with a connection to node 1, the node behind the client's forward."""
    return set(tcp_peers(stage.lab, stage.lab.nodes[0].namespace))


@contextmanager
def _kv(engine: str, host: str, port: int, namespace: str) -> Iterator[KV]:
    """A pymemcache or redis-py client connected from inside `namespace`."""
    client = kv_client(engine, host, port)  # type: ignore[arg-type]
    try:
        with netns.entered(namespace):
            assert client.set("connected", "yes") is True  # connects now, inside the namespace
        yield client
    finally:
        client.close()


@pytest.mark.parametrize("engine", ["memcached", "redis"])
@pytest.mark.parametrize("mode", ["warm", "cold"])
def test_failover_moves_the_client_to_the_standby_with_the_data_intact(mode: str, engine: str, tmp_path: Path) -> None:
    with staged(mode, unique_name("fo"), tmp_path, engine) as stage:  # type: ignore[arg-type]
        the_lab, client = stage.lab, stage.client
        assert client is not None
        forward = str(the_lab.nodes[0].public_port)
        namespaces = lab.existing_namespaces(the_lab.name)
        pids = [pid for ns in namespaces for pid in netns.pids(ns)]
        stored = {}
        for node in the_lab.nodes:
            with _kv(engine, PUBLIC_ADDRESS, node.public_port, the_lab.client) as writer:
                for i in range(10):
                    stored[(node.public_port, f"k{i}")] = f"{node.public_port}:{i}"
                    assert writer.set(f"k{i}", stored[(node.public_port, f"k{i}")]) is True

        # Before: the active NAT serves; a warm standby has accepted nothing.
        assert _served_by(stage) == {NAT_PRIVATE_ADDRESS}
        if mode == "warm":
            assert namespace_metric(the_lab.standby, ACCEPTED, forward=forward) == 0

        failover = fail_over(stage)

        # After: only the standby's connection reaches node 1, and its natfwd accepted the client.
        assert failover.failures >= 1  # the client did see the cut
        assert _served_by(stage) == {STANDBY_PRIVATE_ADDRESS}
        assert namespace_metric(the_lab.standby, ACCEPTED, forward=forward) >= 1
        client.stop()
        for node in the_lab.nodes:
            with _kv(engine, PUBLIC_ADDRESS, node.public_port, the_lab.client) as reader:
                for i in range(10):
                    assert reader.get(f"k{i}") == stored[(node.public_port, f"k{i}")].encode()
        # The client's counter holds its last acknowledged value, on node 1 itself.
        node1 = the_lab.nodes[0]
        with _kv(engine, node1.address, node1.port, the_lab.standby) as direct:
            assert direct.get(KEY) == str(client.acknowledged).encode()
        assert client.acknowledged > 20
    assert lab.existing_namespaces(the_lab.name) == []
    assert not any(os.path.exists(f"/proc/{pid}/ns/net") for pid in pids)


def test_without_natfwd_on_the_standby_the_client_is_refused_until_it_starts(tmp_path: Path) -> None:
    with staged("cold", unique_name("fo"), tmp_path) as stage:
        the_lab, client = stage.lab, stage.client
        assert client is not None
        died_at = time.monotonic()
        the_lab.fail(the_lab.nat)
        the_lab.claim_address(the_lab.standby)
        # The standby's kernel refuses the client's connects (nothing listens): the path reaches it, no reply does.
        failures = client.failures
        client.wait_for("20 refused connects at the standby", lambda: client.failures >= failures + 20)
        assert client.first_success_after(died_at) is None
        assert tcp_peers(the_lab, the_lab.nodes[0].namespace) == []
        log = tmp_path / "serve-nat2.log"
        serve = the_lab.start_serve(the_lab.standby, stage.config_path, log)
        the_lab.wait_serving(the_lab.standby, serve, log)
        client.wait_for("a reply through the standby", lambda: client.first_success_after(died_at) is not None)


def test_teardown_removes_everything_when_the_block_fails(tmp_path: Path) -> None:
    name = unique_name("fo")
    with pytest.raises(NatfwdError, match="boom"), staged("warm", name, tmp_path) as stage:
        pids = [pid for ns in lab.existing_namespaces(name) for pid in netns.pids(ns)]
        assert len(pids) >= 5  # three nodes and two natfwd
        raise NatfwdError("boom")
    assert lab.existing_namespaces(name) == []
    assert not any(os.path.exists(f"/proc/{pid}/ns/net") for pid in pids)
    assert stage.client is not None and not stage.client.is_alive()


def _holds_public_address(namespace: str) -> bool:
    out = subprocess.run(["ip", "-n", namespace, "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    return f" {PUBLIC_ADDRESS}/32 " in out


def test_lab_up_standby_then_failover_and_back_from_the_command_line() -> None:
    name = unique_name("fo")
    client_ns, nat, standby = f"{name}-client", f"{name}-nat", f"{name}-nat2"
    try:
        up = natfwd("lab", "up", "--standby", "--name", name, timeout=90)
        assert up.returncode == 0, up.stderr
        assert f"natfwd lab failover --name {name}" in up.stdout
        with memcached_client(PUBLIC_ADDRESS, 11212, client_ns) as client:
            assert client.set("before", "nat1") is True
        assert _holds_public_address(nat) and not _holds_public_address(standby)

        warm = natfwd("lab", "failover", "--name", name)
        assert (warm.returncode, warm.stderr) == (0, ""), warm.stderr
        assert warm.stdout.startswith(f"lab {name}: {nat} died (public link down, natfwd SIGKILLed); {standby} holds ")
        assert "already running (warm)" in warm.stdout
        assert _holds_public_address(standby) and not _holds_public_address(nat)
        assert netns.pids(nat) == []  # the dead NAT's natfwd is gone
        with memcached_client(PUBLIC_ADDRESS, 11212, client_ns) as client:
            assert client.get("before") == b"nat1"
            assert client.set("after", "nat2") is True
        assert namespace_metric(standby, ACCEPTED, forward="11212") == 1

        back = natfwd("lab", "failover", "--name", name)
        assert back.returncode == 0, back.stderr
        assert f"{standby} died" in back.stdout and "natfwd serve started there (cold)" in back.stdout
        assert _holds_public_address(nat) and not _holds_public_address(standby)
        status = natfwd("lab", "status", "--name", name)
        assert status.returncode == 0, status.stdout + status.stderr
        assert [line.split()[2] for line in status.stdout.splitlines() if line.startswith("1121")] == ["ok"] * 3
        with memcached_client(PUBLIC_ADDRESS, 11212, client_ns) as client:
            assert client.get_many(["before", "after"]) == {"before": b"nat1", "after": b"nat2"}
        assert namespace_metric(nat, ACCEPTED, forward="11212") == 2  # `lab status` probed, then the client

        pids = [pid for ns in lab.existing_namespaces(name) for pid in netns.pids(ns)]
        down = natfwd("lab", "down", "--name", name)
        assert down.returncode == 0, down.stderr
        assert lab.existing_namespaces(name) == []
        assert not any(os.path.exists(f"/proc/{pid}/ns/net") for pid in pids)
    finally:
        lab.destroy(name)
        shutil.rmtree(lab.state_dir(name), ignore_errors=True)


def test_lab_failover_needs_a_standby_and_userspace() -> None:
    name = unique_name("fo")
    try:
        up = natfwd("lab", "up", "--name", name, timeout=90)
        assert up.returncode == 0, up.stderr
        refused = natfwd("lab", "failover", "--name", name)
        assert (refused.returncode, refused.stdout) == (1, "")
        assert refused.stderr.startswith(f"natfwd: error: lab '{name}' has no standby NAT; run `natfwd lab down")
    finally:
        lab.destroy(name)
        shutil.rmtree(lab.state_dir(name), ignore_errors=True)
    gone = natfwd("lab", "failover", "--name", name)
    assert (gone.returncode, gone.stdout) == (1, "")
    assert gone.stderr == f"natfwd: error: lab '{name}' is not up; run `natfwd lab up --standby --name {name}`\n"
    kernel = natfwd("lab", "up", "--standby", "--mode", "kernel", "--name", name)
    assert (kernel.returncode, kernel.stdout) == (2, "")
    assert kernel.stderr.startswith("natfwd: error: --standby: the failover lab runs natfwd serve in both NATs")
    assert lab.existing_namespaces(name) == []
