"""The config's frozen dataclasses and ConfigError: what a validated config is, and what each key holds."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from forwarder.errors import UsageError

Engine = Literal["memcached", "redis", "redis-cluster"]
ENGINES: tuple[str, ...] = get_args(Engine)
DataPath = Literal["userspace", "kernel", "auto"]
DATA_PATHS: tuple[str, ...] = get_args(DataPath)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ALLOWED_CACHE_SIZE = 4096  # client addresses whose allowlist answer each config keeps


class ConfigError(UsageError):
    """Config values are missing or invalid: one problem per line, each naming the key path and the fix."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems: tuple[str, ...] = problems


@dataclass(frozen=True, slots=True)
class Target:
    """A node address: an IP literal or a DNS name, and a port."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Forward:
    """One public listen port relayed to one node."""

    port: int
    target: Target


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class AutoDiscovery:
    """Memcached configuration endpoint published on `port`."""

    port: int
    target: Target


@dataclass(frozen=True, slots=True)
class Discovery:
    """Forwards built and followed from the ElastiCache API."""

    cluster_id: str
    region: str | None
    refresh_s: float
    first_port: int
    endpoint_url: str | None
    state_file: Path | None = None  # where each node's port is kept across restarts


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path
    key: Path
    client_ca: Path | None


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    ca: Path | None


@dataclass(frozen=True, slots=True)
class Auth:
    """Redis AUTH credentials used by `natfwd check` (the ElastiCache AUTH token)."""

    username: str | None
    password: str


@dataclass(frozen=True, slots=True)
class Config:
    engine: Engine
    public_address: str
    listen_address: str
    interface: str
    allowed_clients: tuple[Network, ...]
    forwards: tuple[Forward, ...]
    metrics: MetricsConfig | None
    workers: int
    connect_timeout_s: float
    idle_timeout_s: float
    drain_timeout_s: float
    max_connections: int
    multiplex: bool = False
    multiplex_connections: int = 1
    mux_stall_timeout_s: float = 5.0
    cpu_affinity: bool = False
    auto_discovery: AutoDiscovery | None = None
    discovery: Discovery | None = None
    tls: TLSConfig | None = None
    upstream_tls: UpstreamTLS | None = None
    auth: Auth | None = None
    access_log: bool = False
    data_path: DataPath = "userspace"

    # Answers per client address: parsing it with ipaddress costs more than the rest of the accept path in Python,
    # and clients come back from the same few addresses. Not part of the config's value (no init, repr or
    # comparison), so replace() starts an empty one for the new allowlist.
    _allowed: dict[str, bool] = field(default_factory=dict, init=False, repr=False, compare=False)

    def is_allowed(self, address: str) -> bool:
        """True when `address` (an IP literal) falls in `allowed_clients`."""
        known = self._allowed.get(address)
        if known is None:
            known = self._is_allowed(address)
            if len(self._allowed) >= ALLOWED_CACHE_SIZE:
                self._allowed.clear()  # a spray of addresses costs what it did before caching, no more memory
            self._allowed[address] = known
        return known

    def _is_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allowed_clients)

    def relay_needs(self) -> str | None:
        """The key that keeps the forwards on the relay (TLS, rewriting, multiplexing), or None if none does."""
        return relay_needs(self.engine, self.tls, self.upstream_tls, self.multiplex)

    @property
    def kernel_forwards(self) -> tuple[Forward, ...]:
        """The forwards the kernel serves (nftables DNAT): all of them with data_path kernel, or auto when nothing
        needs the relay; never the auto_discovery port, whose answers the relay rewrites."""
        if self.data_path == "userspace" or (self.data_path == "auto" and self.relay_needs() is not None):
            return ()
        return self.forwards


RELAY_ONLY = {
    "tls": "tls: the kernel cannot terminate TLS",
    "upstream_tls": "upstream_tls: the kernel cannot open TLS to the nodes",
    "engine": "engine redis-cluster: MOVED/ASK and CLUSTER replies need rewriting",
    "multiplex": "multiplex: only the relay shares node connections",
}


def relay_needs(engine: str | None, tls: object, upstream_tls: object, multiplex: bool | None) -> str | None:
    if tls is not None:
        return "tls"
    if upstream_tls is not None:
        return "upstream_tls"
    if engine == "redis-cluster":
        return "engine"
    if multiplex:
        return "multiplex"
    return None
