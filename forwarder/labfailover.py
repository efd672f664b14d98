"""The lab's failover: a second NAT namespace on the same segments, and the move of the public address to it."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from forwarder import netns
from forwarder.errors import NatfwdError, UsageError
from forwarder.lab import (
    CLIENT_ADDRESS,
    NAT_PRIVATE_ADDRESS,
    PRIVATE_PREFIX_LENGTH,
    PUBLIC_ADDRESS,
    PUBLIC_INTERFACE,
    Lab,
    LabEngine,
    LabMode,
    UpResult,
    _ip,
    _natfwd_command,
    _package_env,
    _signal,
    _tail,
    _wait_gone,
    existing_namespaces,
    require_root,
    state_dir,
    validate_name,
)
from forwarder.lab import up as lab_up

STANDBY_PRIVATE_ADDRESS = "10.0.1.2"
PRIVATE_INTERFACE = "eth1"
PUBLIC_BRIDGE = "pub"
PRIVATE_BRIDGE = "priv"
ETH_P_ARP = 0x0806


@dataclass(frozen=True, slots=True)
class Takeover:
    """When each step of a takeover finished, in time.monotonic() seconds."""

    address_at: float  # the standby holds the public address and has announced it
    listening_at: float  # natfwd serve in the standby listens on every public port


class FailoverLab(Lab):
    """A lab with two NAT namespaces, `nat` (the active one) and `standby`, on shared public and private segments.

    The segments are two bridges in a namespace of their own (`switch`, no addresses), so either NAT can die
    without taking the network with it, as an instance does in a VPC. The active NAT holds 203.0.113.73; the
    standby has only its private address (10.0.1.2) until `take_over` moves the public address to it, which is
    what an Elastic IP reassociation looks like to the client: the same address behind a new MAC, and no state
    for the old connections, which the new holder resets.
    """

    def __init__(
        self, name: str, engine: LabEngine = "memcached", *, nodes: int = 3, log_dir: Path | None = None
    ) -> None:
        super().__init__(name, engine, nodes=nodes, log_dir=log_dir)
        self.private_side = PRIVATE_INTERFACE
        self.standby = f"{name}-nat2"
        self.switch = f"{name}-switch"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.client, self.nat, self.standby, *(node.namespace for node in self.nodes), self.switch)

    def _plug(self, namespace: str, interface: str, bridge: str, port: str) -> None:
        # One veth from `namespace` into a bridge of the switch namespace; the switch end is named after its owner.
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", interface, "netns", namespace)
        _ip("-n", self.switch, "link", "set", port, "master", bridge, "up")
        _ip("-n", namespace, "link", "set", interface, "up")

    def _build(self) -> None:
        for ns in self.namespaces:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for bridge in (PUBLIC_BRIDGE, PRIVATE_BRIDGE):
            _ip("-n", self.switch, "link", "add", bridge, "type", "bridge")
            _ip("-n", self.switch, "link", "set", bridge, "up")
        self._plug(self.client, PUBLIC_INTERFACE, PUBLIC_BRIDGE, "client")
        _ip("-n", self.client, "addr", "add", f"{CLIENT_ADDRESS}/32", "dev", PUBLIC_INTERFACE)
        _ip("-n", self.client, "route", "add", f"{PUBLIC_ADDRESS}/32", "dev", PUBLIC_INTERFACE)
        for role, ns, private in (
            ("nat1", self.nat, NAT_PRIVATE_ADDRESS),
            ("nat2", self.standby, STANDBY_PRIVATE_ADDRESS),
        ):
            self._plug(ns, PUBLIC_INTERFACE, PUBLIC_BRIDGE, f"{role}-pub")
            self._plug(ns, PRIVATE_INTERFACE, PRIVATE_BRIDGE, f"{role}-priv")
            _ip("-n", ns, "addr", "add", f"{private}/{PRIVATE_PREFIX_LENGTH}", "dev", PRIVATE_INTERFACE)
            # A host route needs no address on the link: the standby reaches the client once it holds the EIP.
            _ip("-n", ns, "route", "add", f"{CLIENT_ADDRESS}/32", "dev", PUBLIC_INTERFACE)
        _ip("-n", self.nat, "addr", "add", f"{PUBLIC_ADDRESS}/32", "dev", PUBLIC_INTERFACE)
        for node in self.nodes:
            self._plug(node.namespace, "eth0", PRIVATE_BRIDGE, f"node{node.index + 1}")
            _ip("-n", node.namespace, "addr", "add", f"{node.address}/{PRIVATE_PREFIX_LENGTH}", "dev", "eth0")

    def start_serve(
        self, namespace: str, config_path: Path, log_path: Path, *, detach: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start `natfwd serve` (this interpreter and package) in `namespace`; returns at once, not yet listening.

        `detach` puts it in a session of its own, so it outlives the command that started it (`natfwd lab`).
        """
        with open(log_path, "ab") as log:
            return self.popen(
                namespace,
                [sys.executable, "-m", "forwarder", "serve", "--config", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_package_env(),
                cwd=config_path.parent,
                start_new_session=detach,
            )

    def wait_serving(
        self, namespace: str, process: subprocess.Popen[bytes] | None, log_path: Path, timeout_s: float = 30.0
    ) -> float:
        """Wait until natfwd in `namespace` listens on every public port; returns when (time.monotonic()).

        It reads the namespace's socket tables instead of connecting, so a standby is never probed. `process` is
        serve's, or None for one another command started. Raises NatfwdError, with the tail of the log, if serve
        exits (or nothing runs in `namespace`) or does not listen within `timeout_s`.
        """
        wanted = {node.public_port for node in self.nodes}
        deadline = time.monotonic() + timeout_s
        while not wanted <= netns.listening_ports(namespace):
            if process is None and not netns.pids(namespace):
                raise NatfwdError(f"no natfwd serve runs in {namespace}:\n{_tail(log_path)}")
            if process is not None and process.poll() is not None:
                raise NatfwdError(f"natfwd serve in {namespace} exited {process.returncode}:\n{_tail(log_path)}")
            if time.monotonic() >= deadline:
                raise NatfwdError(
                    f"natfwd serve in {namespace} did not listen within {timeout_s:g} s:\n{_tail(log_path)}"
                )
            time.sleep(0.005)
        return time.monotonic()

    def fail(self, namespace: str) -> None:
        """Make NAT `namespace` die as an instance does: silent on the public side at once, then natfwd SIGKILLed.

        The public link goes down first, so clients see no FIN or RST from the dead box (a dead instance sends
        none); the address is then released. Raises NatfwdError if the processes do not die.
        """
        _ip("-n", namespace, "link", "set", PUBLIC_INTERFACE, "down")
        _signal(netns.pids(namespace), signal.SIGKILL)
        if _wait_gone([namespace], time.monotonic() + 10.0):
            raise NatfwdError(f"processes in {namespace} survived SIGKILL")
        _ip("-n", namespace, "addr", "del", f"{PUBLIC_ADDRESS}/32", "dev", PUBLIC_INTERFACE)

    def claim_address(self, namespace: str) -> None:
        """Give NAT `namespace` the public address and announce it (the lab's `claim-address`); raises NatfwdError."""
        _ip("-n", namespace, "link", "set", PUBLIC_INTERFACE, "up")  # down if this NAT failed before
        _ip("-n", namespace, "addr", "add", f"{PUBLIC_ADDRESS}/32", "dev", PUBLIC_INTERFACE)
        # A link going down drops its routes, so a NAT that failed before has lost the one to the client.
        _ip("-n", namespace, "route", "replace", f"{CLIENT_ADDRESS}/32", "dev", PUBLIC_INTERFACE)
        announce(namespace, PUBLIC_INTERFACE, PUBLIC_ADDRESS)

    def take_over(
        self,
        namespace: str,
        *,
        cold: tuple[Path, Path] | None = None,
        serving: subprocess.Popen[bytes] | None = None,
        detach: bool = False,
    ) -> Takeover:
        """Move the public address to NAT `namespace` and announce it; then wait until natfwd serves it there.

        Warm (no `cold`): natfwd already runs there, listening on 0.0.0.0, so it needs no `ip_nonlocal_bind`;
        `serving` is its process if this caller started it. `cold` is (config, log) for a replacement: serve
        starts after the address is claimed, as an instance's user data runs `claim-address` before natfwd.
        Raises NatfwdError if serve does not come up.
        """
        self.claim_address(namespace)
        address_at = time.monotonic()
        log_path = Path("/dev/null")
        if cold is not None:
            config_path, log_path = cold
            serving = self.start_serve(namespace, config_path, log_path, detach=detach)
        return Takeover(address_at, self.wait_serving(namespace, serving, log_path))


def garp_frame(mac: bytes, address: str) -> bytes:
    """A gratuitous ARP request: who-has `address` tell `address`, from `mac`, to broadcast (60 bytes, padded)."""
    ip = socket.inet_aton(address)
    ethernet = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip
    return (ethernet + arp).ljust(60, b"\x00")


def announce(namespace: str, interface: str, address: str) -> None:
    """Send a gratuitous ARP for `address` out of `interface` in `namespace`, as keepalived does on takeover.

    Neighbours that already know the address (the client) update its MAC at once instead of probing the old
    one until it fails (seconds). Raises NatfwdError if the namespace or interface is missing.
    """
    with netns.entered(namespace):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    try:
        sock.bind((interface, ETH_P_ARP))
        mac = sock.getsockname()[4]
        sock.send(garp_frame(mac, address))
    except OSError as exc:
        raise NatfwdError(f"cannot announce {address} on {interface} in {namespace}: {exc.strerror}") from None
    finally:
        sock.close()


# --- `natfwd lab up --standby` and `natfwd lab failover` ---


def start_standby(lab: Lab, config_path: Path) -> int:
    """Start the warm standby's natfwd serve for `lab up --standby`; returns its pid once it listens.

    Raises NatfwdError (with its log) if it does not come up; `lab up` then removes the lab.
    """
    if not isinstance(lab, FailoverLab):
        raise NatfwdError("a standby needs the failover lab (FailoverLab)")
    log_path = config_path.parent / "serve-nat2.log"
    process = lab.start_serve(lab.standby, config_path, log_path, detach=True)
    lab.wait_serving(lab.standby, process, log_path)
    return process.pid


def up(name: str, engine: LabEngine = "memcached", mode: LabMode = "userspace") -> UpResult:
    """`natfwd lab up --standby`: the lab with a second NAT namespace whose natfwd waits for the public address.

    Raises UsageError for the kernel mode (the standby runs natfwd serve), and what `lab.up` raises.
    """
    if mode == "kernel":
        raise UsageError("--standby: the failover lab runs natfwd serve in both NATs; drop --mode kernel")
    return lab_up(name, engine, mode, lab_type=FailoverLab, start_standby=start_standby)


def describe_standby(result: UpResult) -> list[str]:
    """The lines `natfwd lab up --standby` adds: the standby NAT, and how to fail over to it."""
    lab, pid = result.lab, result.standby_pid
    standby = f"{lab.name}-nat2"
    natfwd = " ".join(_natfwd_command())
    return [
        f"  nat2    (standby)       netns {standby} (private side {STANDBY_PRIVATE_ADDRESS}), "
        f"natfwd serve (pid {pid}, log {result.state / 'serve-nat2.log'}) waiting for {PUBLIC_ADDRESS}",
        f"  both NATs share the public and private segments through bridges in netns {lab.name}-switch",
        f"fail over (kill the NAT holding {PUBLIC_ADDRESS}, move the address to the other): "
        f"{natfwd} lab failover --name {lab.name}",
    ]


@dataclass(frozen=True, slots=True)
class FailoverResult:
    """What `natfwd lab failover` did, with seconds counted from the moment the old holder died."""

    name: str
    failed: str
    holder: str
    cold: bool
    address_s: float
    listening_s: float


def holder(lab: FailoverLab) -> str | None:
    """The NAT namespace that holds the public address now, or None."""
    for namespace in (lab.nat, lab.standby):
        out = subprocess.run(
            ["ip", "-n", namespace, "-o", "-4", "addr", "show", "dev", PUBLIC_INTERFACE],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        if f" {PUBLIC_ADDRESS}/32 " in out:
            return namespace
    return None


def failover(name: str) -> FailoverResult:
    """Kill the NAT holding the public address in lab `name` and move the address to the other NAT.

    The other NAT's natfwd serves at once if it runs there (warm: the standby of `lab up --standby`), or is
    started after the address moves (cold: failing back to a NAT whose natfwd died). Raises NatfwdError if the
    lab has no standby NAT, neither NAT holds the address, or serve does not come up.
    """
    require_root()
    validate_name(name)
    if not existing_namespaces(name):
        raise NatfwdError(f"lab {name!r} is not up; run `natfwd lab up --standby --name {name}`")
    state = state_dir(name)
    try:
        recorded = json.loads((state / "lab.json").read_text())
    except (OSError, ValueError):
        recorded = {}
    if not recorded.get("standby"):
        raise NatfwdError(
            f"lab {name!r} has no standby NAT; run `natfwd lab down --name {name}` and "
            f"`natfwd lab up --standby --name {name}`"
        )
    lab = FailoverLab(name, recorded.get("engine", "memcached"), log_dir=state)
    old = holder(lab)
    if old is None:
        raise NatfwdError(f"neither NAT of lab {name!r} holds {PUBLIC_ADDRESS}; run `natfwd lab down` and up again")
    new = lab.standby if old == lab.nat else lab.nat
    cold = not netns.pids(new)
    log_path = state / ("serve-nat2.log" if new == lab.standby else "serve.log")
    died_at = time.monotonic()
    lab.fail(old)
    takeover = lab.take_over(new, cold=(state / "config.yaml", log_path) if cold else None, detach=True)
    return FailoverResult(name, old, new, cold, takeover.address_at - died_at, takeover.listening_at - died_at)


def describe_failover(result: FailoverResult) -> str:
    """The text `natfwd lab failover` prints."""
    start = "natfwd serve started there (cold)" if result.cold else "its natfwd serve was already running (warm)"
    return "\n".join(
        [
            f"lab {result.name}: {result.failed} died (public link down, natfwd SIGKILLed); "
            f"{result.holder} holds {PUBLIC_ADDRESS}, {start}",
            f"  address moved and announced {result.address_s * 1000:.0f} ms after the kill; "
            f"natfwd listening {result.listening_s * 1000:.0f} ms after it",
            "  clients reconnect: the connections they had through the dead NAT are gone",
        ]
    )
