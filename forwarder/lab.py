"""The page's topology on one host: client, NAT box and cache-node network namespaces, their processes and teardown."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, get_args

from forwarder import netns
from forwarder.errors import NatfwdError, UsageError

if TYPE_CHECKING:
    from forwarder.check import Result as CheckResult

# The addresses are the AWS page's, and part of the contract (design.md "The lab").
CLIENT_ADDRESS = "198.51.100.27"
PUBLIC_ADDRESS = "203.0.113.73"
NAT_PRIVATE_ADDRESS = "10.0.1.1"
PRIVATE_PREFIX_LENGTH = 24
PRIVATE_NETWORK = f"10.0.1.0/{PRIVATE_PREFIX_LENGTH}"
NODE_ADDRESSES = ("10.0.1.230", "10.0.1.231", "10.0.1.232")
# Interface names are per namespace, so these short fixed names never collide between labs. The NAT's public
# side is eth0, like the config default, so emitted rules apply unchanged.
PUBLIC_INTERFACE = "eth0"
BRIDGE = "br0"
METRICS_LISTEN = "127.0.0.1:9108"
STATE_ROOT = Path("/run/natfwd")

LabEngine = Literal["memcached", "redis"]
LAB_ENGINES: tuple[str, ...] = get_args(LabEngine)
LabMode = Literal["userspace", "kernel"]
NODE_PORTS: Mapping[str, int] = {"memcached": 11211, "redis": 6379}
FIRST_PUBLIC_PORTS: Mapping[str, int] = {"memcached": 11211, "redis": 6379}

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_ROLES = r"(client|nat|nat2|switch|node[0-9]+)"  # nat2 and switch: the failover lab


def validate_name(name: str) -> str:
    """Return `name` if it can prefix namespace names; raises UsageError otherwise."""
    if not _NAME.match(name):
        raise UsageError(
            f"--name: {name!r} is not valid; use 1-32 lowercase letters, digits and hyphens, starting with a "
            "letter or digit"
        )
    return name


def require_root() -> None:
    """Raise NatfwdError unless running as root (namespaces, veths and iptables need it)."""
    if os.geteuid() != 0:
        raise NatfwdError("natfwd lab needs root to create network namespaces; run it with sudo")


def state_dir(name: str) -> Path:
    return STATE_ROOT / f"lab-{name}"


def existing_namespaces(name: str) -> list[str]:
    """Namespaces of lab `name` that exist now (works after a crash: found by name, not by memory)."""
    pattern = re.compile(rf"^{re.escape(name)}-{_ROLES}$")
    try:
        entries = os.listdir(netns.NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(entry for entry in entries if pattern.match(entry))


def _ip(*args: str) -> None:
    """Run one `ip` command; raises NatfwdError with its stderr."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NatfwdError(f"`ip {' '.join(args)}` failed: {result.stderr.strip() or result.returncode}")


def _write_sysctl(namespace: str, key: str, value: str) -> None:
    # /proc/sys/net follows the network namespace of the thread that opens it.
    with netns.entered(namespace), open("/proc/sys/" + key.replace(".", "/"), "w") as handle:
        handle.write(value)


def _wait_gone(namespaces: Sequence[str], deadline: float) -> list[int]:
    while True:
        left = [pid for ns in namespaces for pid in netns.pids(ns)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def _signal(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def destroy(name: str, *, grace_s: float = 3.0) -> list[str]:
    """Kill every process in lab `name`'s namespaces and delete them; returns the deleted namespaces ([] if none).

    Cache nodes hold throwaway data and get SIGKILL (memcached takes a second to honour SIGTERM); anything else
    (natfwd serve) gets SIGTERM to drain, then SIGKILL after `grace_s`. Idempotent, and works after a crash since
    it finds the namespaces by name. Raises NatfwdError if `ip netns del` fails.
    """
    namespaces = existing_namespaces(name)
    node_pattern = re.compile(rf"^{re.escape(name)}-node[0-9]+$")
    for ns in namespaces:
        _signal(netns.pids(ns), signal.SIGKILL if node_pattern.match(ns) else signal.SIGTERM)
    left = _wait_gone(namespaces, time.monotonic() + grace_s)
    if left:
        _signal(left, signal.SIGKILL)
        _wait_gone(namespaces, time.monotonic() + 5.0)
    for ns in namespaces:
        _ip("netns", "del", ns)
    return namespaces


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One cache node: its namespace, address and port."""

    index: int
    namespace: str
    address: str
    port: int
    public_port: int


class Lab:
    """One lab: `build()` the namespaces, `start_nodes()`, use `run`/`popen`/`netns.entered`, then `teardown()`.

    `routed=True` adds the "direct, no NAT" baseline: client and nodes get routes to each other through the
    NAT namespace, which forwards. It is off by default, because in the VPC the nodes cannot reach the client.
    """

    def __init__(
        self,
        name: str,
        engine: LabEngine = "memcached",
        *,
        nodes: int = len(NODE_ADDRESSES),
        routed: bool = False,
        log_dir: Path | None = None,
    ) -> None:
        if engine not in LAB_ENGINES:
            raise UsageError(f"--engine: {engine!r} is not valid; expected one of {', '.join(LAB_ENGINES)}")
        if not 1 <= nodes <= len(NODE_ADDRESSES):
            raise UsageError(f"nodes: {nodes} is not valid; expected 1 to {len(NODE_ADDRESSES)}")
        self.name = validate_name(name)
        self.engine: LabEngine = engine
        self.routed = routed
        self.log_dir = log_dir
        self.client = f"{name}-client"
        self.nat = f"{name}-nat"
        self.nodes = tuple(
            NodeSpec(
                i,
                f"{name}-node{i + 1}",
                NODE_ADDRESSES[i],
                NODE_PORTS[engine],
                FIRST_PUBLIC_PORTS[engine] + i,
            )
            for i in range(nodes)
        )
        self.private_side = BRIDGE  # the NAT's private interface (the failover lab's NATs have a veth instead)
        self._processes: list[subprocess.Popen[bytes]] = []
        self._node_processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.client, self.nat, *(node.namespace for node in self.nodes))

    def __enter__(self) -> Lab:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def build(self) -> None:
        """Create the namespaces and links; on any failure remove what was made and raise NatfwdError."""
        require_root()
        present = existing_namespaces(self.name)
        if present:
            raise NatfwdError(
                f"lab {self.name!r} already exists ({', '.join(present)}); run `natfwd lab down --name {self.name}` "
                "first, or pick another --name"
            )
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise

    def _build(self) -> None:
        for ns in self.namespaces:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # Public side: one veth between client and NAT, host routes only (no default route anywhere).
        _ip("-n", self.nat, "link", "add", PUBLIC_INTERFACE, "type", "veth", "peer", "name", PUBLIC_INTERFACE,
            "netns", self.client)  # fmt: skip
        for ns, mine, peer in (
            (self.nat, PUBLIC_ADDRESS, CLIENT_ADDRESS),
            (self.client, CLIENT_ADDRESS, PUBLIC_ADDRESS),
        ):
            _ip("-n", ns, "addr", "add", f"{mine}/32", "dev", PUBLIC_INTERFACE)
            _ip("-n", ns, "link", "set", PUBLIC_INTERFACE, "up")
            _ip("-n", ns, "route", "add", f"{peer}/32", "dev", PUBLIC_INTERFACE)
        # Private side: a bridge in the NAT namespace, one veth per node into it.
        _ip("-n", self.nat, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", self.nat, "addr", "add", f"{NAT_PRIVATE_ADDRESS}/{PRIVATE_PREFIX_LENGTH}", "dev", BRIDGE)
        _ip("-n", self.nat, "link", "set", BRIDGE, "up")
        for node in self.nodes:
            port = f"node{node.index + 1}"
            _ip("-n", self.nat, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", node.namespace)
            _ip("-n", self.nat, "link", "set", port, "master", BRIDGE, "up")
            _ip("-n", node.namespace, "addr", "add", f"{node.address}/{PRIVATE_PREFIX_LENGTH}", "dev", "eth0")
            _ip("-n", node.namespace, "link", "set", "eth0", "up")
        if self.routed:
            _ip("-n", self.client, "route", "add", PRIVATE_NETWORK, "via", PUBLIC_ADDRESS, "dev", PUBLIC_INTERFACE)
            for node in self.nodes:
                _ip("-n", node.namespace, "route", "add", f"{CLIENT_ADDRESS}/32", "via", NAT_PRIVATE_ADDRESS)
            _write_sysctl(self.nat, "net.ipv4.ip_forward", "1")

    def node_command(self, node: NodeSpec) -> list[str]:
        """The cache server command line for `node` (foreground, no persistence)."""
        if self.engine == "redis":
            return ["redis-server", "--bind", node.address, "--port", str(node.port), "--save", "",
                    "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"]  # fmt: skip
        return ["memcached", "-u", "root", "-l", node.address, "-p", str(node.port), "-U", "0", "-m", "64"]

    def start_nodes(self, timeout_s: float = 10.0) -> None:
        """Start every cache node and wait until each accepts; raises NatfwdError if one does not."""
        program = self.node_command(self.nodes[0])[0]
        if shutil.which(program) is None:
            package = "redis-server" if self.engine == "redis" else "memcached"
            raise NatfwdError(f"{program} is not installed; install it (Debian: apt-get install {package})")
        for node in self.nodes:
            self.start_node(node.index, wait=False)
        for node in self.nodes:
            self.wait_listening(self.nat, node.address, node.port, timeout_s, self._node_processes[node.index])

    def start_node(self, index: int, *, wait: bool = True) -> None:
        """(Re)start node `index` (0-based); it must not be running."""
        node = self.nodes[index]
        log = self._log(f"node{index + 1}.log")
        try:
            # cwd /tmp: redis-server may write there, never into the caller's cwd. A session of its own: closing
            # the terminal that ran `natfwd lab up` must not SIGHUP the nodes.
            process = self.popen(node.namespace, self.node_command(node), stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, cwd="/tmp", start_new_session=True)  # fmt: skip
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        self._node_processes[index] = process
        if wait:
            self.wait_listening(self.nat, node.address, node.port, 10.0, process)

    def stop_node(self, index: int) -> None:
        """Kill node `index` and wait for it: its forward then fails, as when a cache node dies."""
        process = self._node_processes.pop(index, None)
        if process is not None:
            process.kill()
            process.wait()

    def _log(self, filename: str) -> IO[bytes] | int:
        if self.log_dir is None:
            return subprocess.DEVNULL
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / filename, "ab")

    def popen(self, namespace: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start `argv` inside `namespace` (via `ip netns exec`, which execs it, so the pid is argv's)."""
        process: subprocess.Popen[bytes] = subprocess.Popen(["ip", "netns", "exec", namespace, *argv], **kwargs)
        self._processes.append(process)
        return process

    def run(
        self, namespace: str, argv: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `namespace` to completion; with check, raises NatfwdError on a non-zero exit."""
        result = subprocess.run(
            ["ip", "netns", "exec", namespace, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise NatfwdError(
                f"`{' '.join(argv)}` in {namespace} exited {result.returncode}: {result.stderr.strip()[-500:]}"
            )
        return result

    def wait_listening(
        self,
        namespace: str,
        host: str,
        port: int,
        timeout_s: float = 10.0,
        process: subprocess.Popen[bytes] | None = None,
    ) -> None:
        """Wait until host:port accepts a TCP connection made from `namespace`; raises NatfwdError on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            with netns.entered(namespace):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(0.5)
                sock.connect((host, port))
                return
            except OSError as exc:
                error = exc
            finally:
                sock.close()
            if process is not None and process.poll() is not None:
                raise NatfwdError(f"the process expected on {host}:{port} exited {process.returncode} before accepting")
            if time.monotonic() >= deadline:
                raise NatfwdError(f"{host}:{port} did not accept from {namespace} within {timeout_s:g} s: {error}")
            time.sleep(0.02)

    def config_text(self, *, metrics: bool = True) -> str:
        """The natfwd config that forwards public ports to the nodes, as `natfwd lab up` writes it."""
        lines = [
            f"# natfwd lab {self.name}: {self.engine} nodes behind the NAT namespace {self.nat}",
            f"engine: {self.engine}",
            f"public_address: {PUBLIC_ADDRESS}",
            "listen_address: 0.0.0.0",
            f"interface: {PUBLIC_INTERFACE}",
            "allowed_clients:",
            f"  - {CLIENT_ADDRESS}/32",
            "forwards:",
        ]
        for node in self.nodes:
            lines += [f"  - port: {node.public_port}", f"    target: {node.address}:{node.port}"]
        if metrics:
            lines += ["metrics:", f"  listen: {METRICS_LISTEN}"]
        return "\n".join(lines) + "\n"

    def teardown(self) -> None:
        """Kill everything in the lab's namespaces and delete them; safe to call twice or after a crash."""
        try:
            destroy(self.name)
        finally:
            for process in self._processes:
                if process.poll() is None:
                    process.kill()
                process.wait()
            self._processes.clear()
            self._node_processes.clear()


# --- `natfwd lab up|down|status`: the lab as a long-lived thing on the host, remembered in its state dir ---


@dataclass(frozen=True, slots=True)
class UpResult:
    """What `natfwd lab up` made, for the CLI to print."""

    lab: Lab
    mode: LabMode
    config_path: Path
    state: Path
    serve_pid: int | None
    standby_pid: int | None = None  # natfwd serve in the standby NAT (`lab up --standby`)


def _natfwd_command() -> list[str]:
    # The natfwd of this very install (another one may come first on PATH, or its bin/ may not be on PATH at all).
    script = Path(sys.executable).with_name("natfwd")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "forwarder"]


def _package_env() -> dict[str, str]:
    # Lets `python -m forwarder` import this very package inside the namespace even when it is not installed.
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def up(
    name: str, engine: LabEngine = "memcached", mode: LabMode = "userspace", *, timeout_s: float = 15.0,
    lab_type: Callable[..., Lab] = Lab, start_standby: Callable[[Lab, Path], int] | None = None,
) -> UpResult:  # fmt: skip
    """Build lab `name`, start its nodes, write its config and start natfwd serve (or apply kernel rules).

    `lab_type` and `start_standby` are the failover lab's (forwarder/labfailover.py `up`). Raises NatfwdError
    (not root, lab already up, a step failed); on failure everything made is removed.
    """
    require_root()
    validate_name(name)
    state = state_dir(name)
    lab = lab_type(name, engine, log_dir=state)
    if existing_namespaces(name):
        raise NatfwdError(
            f"lab {name!r} is already up; run `natfwd lab status --name {name}`, or `natfwd lab down --name {name}` "
            "and up again"
        )
    if state.exists():
        shutil.rmtree(state)  # left over from a crash: nothing runs without its namespaces
    state.mkdir(parents=True, mode=0o700)
    try:
        lab.build()
        lab.start_nodes()
        config_path = state / "config.yaml"
        config_path.write_text(lab.config_text(), encoding="utf-8")
        serve_pid = standby_pid = None
        if mode == "kernel":
            from forwarder import config, iptables

            script = iptables.render(config.load(config_path), "commands")
            lab.run(lab.nat, ["sh", "-s"], input=script)
        else:
            with open(state / "serve.log", "ab") as log:
                process = lab.popen(
                    lab.nat,
                    # This interpreter and this package, whatever `natfwd` on PATH would be.
                    [sys.executable, "-m", "forwarder", "serve", "--config", str(config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_package_env(),
                    cwd=state,
                    start_new_session=True,  # outlives `lab up`; `lab down` finds it by namespace
                )
            serve_pid = process.pid
            for node in lab.nodes:
                try:
                    lab.wait_listening(lab.client, PUBLIC_ADDRESS, node.public_port, timeout_s, process)
                except NatfwdError as exc:
                    log_tail = _tail(state / "serve.log")
                    raise NatfwdError(f"natfwd serve did not come up: {exc}; its log:\n{log_tail}") from None
            if start_standby is not None:
                standby_pid = start_standby(lab, config_path)
        recorded = {"engine": engine, "mode": mode, "serve_pid": serve_pid, "standby": start_standby is not None}
        (state / "lab.json").write_text(json.dumps(recorded) + "\n")
    except BaseException:
        lab.teardown()
        shutil.rmtree(state, ignore_errors=True)
        raise
    return UpResult(lab, mode, config_path, state, serve_pid, standby_pid)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def down(name: str) -> list[str]:
    """Remove lab `name` (processes, namespaces, state dir); returns the deleted namespaces, [] if none."""
    require_root()
    validate_name(name)
    deleted = destroy(name)
    shutil.rmtree(state_dir(name), ignore_errors=True)
    return deleted


@dataclass(frozen=True, slots=True)
class Status:
    """What exists of lab `name` now."""

    name: str
    namespaces: tuple[str, ...]
    processes: tuple[tuple[str, int, str], ...]  # (namespace, pid, command line)
    engine: str | None
    mode: str | None
    config_path: Path | None


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)


def status(name: str) -> Status:
    """Inspect lab `name` (namespaces, the processes inside them, its recorded mode); raises NatfwdError if not root."""
    require_root()
    validate_name(name)
    namespaces = existing_namespaces(name)
    processes = tuple((ns, pid, _cmdline(pid)) for ns in namespaces for pid in netns.pids(ns))
    state = state_dir(name)
    try:
        recorded: dict[str, Any] = json.loads((state / "lab.json").read_text())
    except (OSError, ValueError):
        recorded = {}
    config_path = state / "config.yaml"
    return Status(
        name,
        tuple(namespaces),
        processes,
        recorded.get("engine"),
        recorded.get("mode"),
        config_path if config_path.exists() else None,
    )


def describe_up(result: UpResult, extra: Sequence[str] = ()) -> str:
    """The text `natfwd lab up` prints: what runs where, how to try it from the client namespace, then `extra`."""
    lab = result.lab
    command = _natfwd_command()
    natfwd = " ".join(command)
    if len(command) > 1:  # python -m forwarder: point it at this checkout
        natfwd = f"PYTHONPATH={Path(__file__).resolve().parent.parent} {natfwd}"
    forwarder = (
        f"natfwd serve (pid {result.serve_pid}, log {result.state / 'serve.log'})"
        if result.mode == "userspace"
        else "kernel DNAT rules (natfwd emit-iptables --format commands)"
    )
    first = lab.nodes[0]
    lines = [
        f"lab {lab.name} is up: {lab.engine} nodes behind {forwarder}",
        f"  client  {CLIENT_ADDRESS:<15} netns {lab.client}",
        f"  nat     {PUBLIC_ADDRESS:<15} netns {lab.nat} (private side {NAT_PRIVATE_ADDRESS} on {lab.private_side})",
    ]
    lines += [
        f"  node{n.index + 1}   {n.address:<15} netns {n.namespace}, {lab.engine} on port {n.port}" for n in lab.nodes
    ]
    lines += ["forwards:"]
    lines += [f"  {PUBLIC_ADDRESS}:{n.public_port} -> {n.address}:{n.port}" for n in lab.nodes]
    lines += [
        f"config: {result.config_path}",
        "try it from the client namespace:",
        f"  ip netns exec {lab.client} {natfwd} check --config {result.config_path}",
    ]
    if lab.engine == "redis":
        lines.append(f"  ip netns exec {lab.client} redis-cli -h {PUBLIC_ADDRESS} -p {first.public_port} ping")
    else:
        lines.append(
            f"  printf 'version\\r\\n' | ip netns exec {lab.client} socat - TCP:{PUBLIC_ADDRESS}:{first.public_port}"
        )
        lines.append(
            f'  ip netns exec {lab.client} {sys.executable} -c "from pymemcache.client.base import Client; '
            f"c = Client(('{PUBLIC_ADDRESS}', {first.public_port})); c.set('hello', 'world'); print(c.get('hello'))\""
        )
    if result.mode == "userspace":
        lines.append(
            f'metrics: ip netns exec {lab.nat} {sys.executable} -c "import urllib.request; '
            f"print(urllib.request.urlopen('http://{METRICS_LISTEN}/metrics').read().decode())\""
        )
    lines += extra
    lines.append(f"tear down: {natfwd} lab down --name {lab.name}")
    return "\n".join(lines)


def describe_status(st: Status) -> str:
    """The text `natfwd lab status` prints before its checks."""
    if not st.namespaces:
        return f"lab {st.name} is not up"
    lines = [f"lab {st.name}: {st.engine or 'unknown engine'}, {st.mode or 'unknown mode'}"]
    for ns in st.namespaces:
        procs = [(pid, cmd) for owner, pid, cmd in st.processes if owner == ns]
        lines.append(f"  {ns}: " + (", ".join(f"{pid} {cmd}" for pid, cmd in procs) if procs else "no processes"))
    if st.config_path is not None:
        lines.append(f"config: {st.config_path}")
    return "\n".join(lines)


def check(st: Status, timeout_s: float = 3.0) -> list[CheckResult]:
    """Run `natfwd check` from the client namespace of a lab that is up; raises NatfwdError without its config."""
    from forwarder import check as probes
    from forwarder import config

    if st.config_path is None or not st.namespaces:
        raise NatfwdError(
            f"lab {st.name} has no config in {state_dir(st.name)}; run `natfwd lab down --name {st.name}` and up again"
        )
    cfg = config.load(st.config_path)
    with netns.entered(f"{st.name}-client"):
        return probes.run(cfg, timeout_s=timeout_s)
