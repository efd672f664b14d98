"""The lab: topology and isolation, teardown after a crash, and `natfwd lab up|status|down` end to end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from labkit import REPO, ROOT_MARKS, memcached_client, natfwd, running_lab, unique_name

from forwarder import cli, lab, netns
from forwarder.lab import CLIENT_ADDRESS, NAT_PRIVATE_ADDRESS, NODE_ADDRESSES, PUBLIC_ADDRESS, Lab

pytestmark = ROOT_MARKS


def _links(namespace: str | None = None) -> list[str]:
    argv = ["ip", "-o", "link", "show"] if namespace is None else ["ip", "-n", namespace, "-o", "link", "show"]
    return sorted(line.split(":")[1].strip() for line in subprocess.check_output(argv, text=True).splitlines())


def _addresses(the_lab: Lab, namespace: str) -> set[str]:
    out = the_lab.run(namespace, ["ip", "-o", "-4", "addr", "show"]).stdout
    return {f"{line.split()[1]} {line.split()[3]}" for line in out.splitlines()}


def _routes(the_lab: Lab, namespace: str) -> list[str]:
    return sorted(" ".join(line.split()[:3]) for line in the_lab.run(namespace, ["ip", "route"]).stdout.splitlines())


def _unreachable(the_lab: Lab, namespace: str, address: str) -> bool:
    result = the_lab.run(namespace, ["ip", "route", "get", address], check=False)
    return result.returncode != 0 and "unreachable" in result.stderr


def test_topology_has_the_pages_addresses_and_no_way_out() -> None:
    root_links = _links()
    with running_lab(start=False) as the_lab:
        assert lab.existing_namespaces(the_lab.name) == sorted(the_lab.namespaces)
        assert _links() == root_links  # nothing of the lab is attached to the host's namespace
        assert _addresses(the_lab, the_lab.client) == {"lo 127.0.0.1/8", f"eth0 {CLIENT_ADDRESS}/32"}
        assert _addresses(the_lab, the_lab.nat) == {
            "lo 127.0.0.1/8",
            f"eth0 {PUBLIC_ADDRESS}/32",
            f"br0 {NAT_PRIVATE_ADDRESS}/24",
        }
        for node, address in zip(the_lab.nodes, NODE_ADDRESSES, strict=True):
            assert _addresses(the_lab, node.namespace) == {"lo 127.0.0.1/8", f"eth0 {address}/24"}
            assert _routes(the_lab, node.namespace) == ["10.0.1.0/24 dev eth0"]
            assert _unreachable(the_lab, node.namespace, CLIENT_ADDRESS)  # as in the VPC: no route back
        assert _routes(the_lab, the_lab.client) == [f"{PUBLIC_ADDRESS} dev eth0"]
        assert _routes(the_lab, the_lab.nat) == ["10.0.1.0/24 dev br0", f"{CLIENT_ADDRESS} dev eth0"]
        assert _unreachable(the_lab, the_lab.client, NODE_ADDRESSES[0])
        for namespace in the_lab.namespaces:
            assert the_lab.run(namespace, ["ip", "route", "show", "default"]).stdout == ""
            assert the_lab.run(namespace, ["ip", "-6", "route", "show", "default"]).stdout == ""
            assert _unreachable(the_lab, namespace, "192.0.2.1")
            assert "UP" in the_lab.run(namespace, ["ip", "-o", "link", "show", "lo"]).stdout
    assert lab.existing_namespaces(the_lab.name) == []


def test_routed_extra_is_the_direct_baseline() -> None:
    with running_lab(routed=True, nodes=2) as the_lab:
        node = the_lab.nodes[1]
        with memcached_client(node.address, node.port, the_lab.client) as client:
            client.set("direct", "yes")
            assert client.get("direct") == b"yes"
            assert client.stats()[b"curr_connections"] >= 1


def test_two_labs_never_collide() -> None:
    with running_lab(nodes=1) as first, running_lab(nodes=1) as second:
        with memcached_client(first.nodes[0].address, 11211, first.nat) as a:
            a.set("lab", first.name)
        with memcached_client(second.nodes[0].address, 11211, second.nat) as b:
            assert b.get("lab") is None
            b.set("lab", second.name)
        with memcached_client(first.nodes[0].address, 11211, first.nat) as a:
            assert a.get("lab") == first.name.encode()


def test_teardown_is_idempotent_and_down_cleans_up_after_a_crash() -> None:
    name = unique_name()
    # A process builds a lab, starts its nodes, then dies without any cleanup.
    crash = textwrap.dedent(f"""
        import os, signal
        from forwarder.lab import Lab
        the_lab = Lab({name!r})
        the_lab.build()
        the_lab.start_nodes()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    try:
        died = subprocess.run([sys.executable, "-c", crash], cwd=REPO, timeout=30, check=False)
        assert died.returncode == -signal.SIGKILL
        namespaces = lab.existing_namespaces(name)
        assert len(namespaces) == 5
        orphans = [pid for ns in namespaces for pid in netns.pids(ns)]
        assert len(orphans) == 3  # the memcached nodes survived their parent

        down = natfwd("lab", "down", "--name", name)
        assert (down.returncode, down.stderr) == (0, "")
        assert down.stdout == f"lab {name}: removed {', '.join(namespaces)}\n"
        assert lab.existing_namespaces(name) == []
        assert not any(os.path.exists(f"/proc/{pid}/ns/net") for pid in orphans)

        again = natfwd("lab", "down", "--name", name)
        assert (again.returncode, again.stdout) == (0, f"lab {name}: nothing to remove\n")
        assert lab.destroy(name) == []
    finally:
        lab.destroy(name)


@contextmanager
def _cli_lab(*args: str) -> Iterator[tuple[str, subprocess.CompletedProcess[str]]]:
    name = unique_name()
    try:
        yield name, natfwd("lab", "up", "--name", name, *args, timeout=60)
    finally:
        lab.destroy(name)
        shutil.rmtree(lab.state_dir(name), ignore_errors=True)


def _assert_down_leaves_nothing(name: str) -> None:
    pids = [pid for ns in lab.existing_namespaces(name) for pid in netns.pids(ns)]
    assert pids
    down = natfwd("lab", "down", "--name", name)
    assert (down.returncode, down.stderr) == (0, ""), down.stderr
    assert lab.existing_namespaces(name) == []
    assert not any(os.path.exists(f"/proc/{pid}/ns/net") for pid in pids)
    assert not lab.state_dir(name).exists()
    status = natfwd("lab", "status", "--name", name)
    assert (status.returncode, status.stdout) == (1, f"lab {name} is not up\n")


def _memcached_round_trip(name: str) -> None:
    for index, port in enumerate((11211, 11212, 11213)):
        with memcached_client(PUBLIC_ADDRESS, port, f"{name}-client") as client:
            client.set("k", f"via {port}")
            assert client.get("k") == f"via {port}".encode()
        # ...and the value landed on that port's own node.
        with memcached_client(NODE_ADDRESSES[index], 11211, f"{name}-nat") as node:
            assert node.get("k") == f"via {port}".encode()


@pytest.mark.parametrize("mode", ["userspace", "kernel"])
def test_lab_up_round_trip_status_down(mode: str) -> None:
    with _cli_lab("--mode", mode) as (name, up):
        assert up.returncode == 0, up.stderr
        assert f"ip netns exec {name}-client" in up.stdout and f"natfwd lab down --name {name}" in up.stdout
        _memcached_round_trip(name)

        status = natfwd("lab", "status", "--name", name)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.startswith(f"lab {name}: memcached, {mode}\n")
        assert [line.split()[2] for line in status.stdout.splitlines() if line.startswith("1121")] == ["ok"] * 3

        again = natfwd("lab", "up", "--name", name)
        assert (again.returncode, again.stdout) == (1, "")
        assert again.stderr.startswith(f"natfwd: error: lab '{name}' is already up")

        _assert_down_leaves_nothing(name)


def test_lab_up_with_redis_nodes() -> None:
    with _cli_lab("--engine", "redis") as (name, up):
        assert up.returncode == 0, up.stderr
        assert f"redis-cli -h {PUBLIC_ADDRESS} -p 6379 ping" in up.stdout
        for port in (6379, 6380, 6381):
            client = redis.Redis(PUBLIC_ADDRESS, port, socket_timeout=3, socket_connect_timeout=3)
            try:
                with netns.entered(f"{name}-client"):
                    assert client.ping() is True
                assert client.set("k", port) and client.get("k") == str(port).encode()
            finally:
                client.close()
        _assert_down_leaves_nothing(name)


def test_lab_usage_errors(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    bad = natfwd("lab", "up", "--name", "Bad;name")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr.startswith("natfwd: error: --name: 'Bad;name' is not valid")

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["lab", "up", "--name", unique_name()]) == 1
    captured = capsys.readouterr()
    assert captured.err == "natfwd: error: natfwd lab needs root to create network namespaces; run it with sudo\n"
