"""Reusable test helpers: root gating, labs, loopback cache servers, the natfwd CLI, clients inside namespaces."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import free_port, wait_port
from pymemcache.client.base import Client

from forwarder import netns
from forwarder.lab import Lab, LabEngine

REPO = Path(__file__).resolve().parent.parent

# Root tests are marked `root` and skipped when not root, unless CI=true, where a missing privilege must fail
# loudly instead of silently skipping. Use `@root` on a test, or `pytestmark = ROOT_MARKS` for a module.
ROOT_SKIP = pytest.mark.skipif(
    os.geteuid() != 0 and os.environ.get("CI") != "true", reason="needs root and network namespaces"
)
ROOT_MARKS = [pytest.mark.root, ROOT_SKIP]
F = TypeVar("F", bound=Callable[..., object])


def root(test: F) -> F:
    """Mark a test as needing root and network namespaces."""
    marked: F = pytest.mark.root(ROOT_SKIP(test))
    return marked


def unique_name(prefix: str = "t") -> str:
    """A lab name no other test run uses (namespaces are named `<name>-client` and so on)."""
    return f"{prefix}{secrets.token_hex(4)}"


def natfwd(
    *args: str, namespace: str | None = None, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -m forwarder ARGS` (inside `namespace` if given) and capture its text output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "forwarder", *args]
    if namespace is not None:
        argv = ["ip", "netns", "exec", namespace, *argv]
    return subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@contextmanager
def running_lab(
    engine: LabEngine = "memcached", *, nodes: int = 3, routed: bool = False, start: bool = True
) -> Iterator[Lab]:
    """A freshly built lab with its nodes started; torn down (processes killed, namespaces deleted) on exit."""
    lab = Lab(unique_name(), engine, nodes=nodes, routed=routed)
    try:
        lab.build()
        if start:
            lab.start_nodes()
        yield lab
    finally:
        lab.teardown()


def write_config(directory: Path, text: str, name: str = "natfwd.yaml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


@contextmanager
def server_process(argv: Sequence[str], port: int) -> Iterator[int]:
    """Run a server on 127.0.0.1:`port` for the block; killed and reaped on exit, even on failure."""
    process = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/tmp")
    try:
        wait_port("127.0.0.1", port, process=process)
        yield port
    finally:
        process.kill()
        process.wait()


@contextmanager
def memcached_server() -> Iterator[int]:
    """A real memcached on a free loopback port; yields the port."""
    port = free_port()
    with server_process(["memcached", "-u", "root", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "16"], port):
        yield port


@contextmanager
def redis_server(*extra: str, port: int | None = None) -> Iterator[int]:
    """A real redis-server on loopback (extra args such as `--requirepass` come last and win); yields the port.

    `port` is the port to wait on; pass it when `extra` moves the server, e.g. to `--tls-port`.
    """
    port = port if port is not None else free_port()
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", *extra]
    with server_process(argv, port):
        yield port


@contextmanager
def memcached_client(host: str, port: int, namespace: str | None = None) -> Iterator[Client]:
    """A pymemcache client connected from inside `namespace` (sockets keep the namespace they were made in)."""
    client = Client((host, port), connect_timeout=3, timeout=3, default_noreply=False)
    try:
        if namespace is None:
            client.version()
        else:
            with netns.entered(namespace):
                client.version()  # connects now, inside the namespace
        yield client
    finally:
        client.close()


def ruleset(lab: Lab) -> str:
    """The NAT namespace's iptables rules and nft ruleset, without counters or timestamps."""
    saved = lab.run(lab.nat, ["iptables-save"]).stdout + lab.run(lab.nat, ["nft", "list", "ruleset"]).stdout
    lines = [line for line in saved.splitlines() if not line.startswith("#")]
    return re.sub(r"\[\d+:\d+\]|counter packets \d+ bytes \d+", "", "\n".join(lines))


def sysctl(lab: Lab, namespace: str, key: str) -> str:
    return lab.run(namespace, ["sysctl", "-n", key]).stdout.strip()


def namespace_metric(namespace: str, name: str, listen: str = "127.0.0.1:9108", **labels: str) -> float:
    """One sample of natfwd's metrics served inside `namespace` (0 if the labelled series does not exist yet)."""
    with netns.entered(namespace), urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def tcp_peers(lab: Lab, namespace: str) -> list[str]:
    """The remote addresses of the established TCP connections in `namespace` (a node's client list, from ss)."""
    out = lab.run(namespace, ["ss", "-Htn", "state", "established"]).stdout
    return sorted(line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines() if line.strip())
