"""YAML config to frozen, validated dataclasses; every mistake is one line of a single ConfigError."""

from __future__ import annotations

import contextvars
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

import yaml

from forwarder import credentials
from forwarder.errors import UsageError

Engine = Literal["memcached", "redis", "redis-cluster"]
ENGINES: tuple[str, ...] = get_args(Engine)
DataPath = Literal["userspace", "kernel", "auto"]
DATA_PATHS: tuple[str, ...] = get_args(DataPath)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ALLOWED_CACHE_SIZE = 4096  # client addresses whose allowlist answer each config keeps

# RFC 1123 host names; anything else (spaces, quotes, `;`) could inject into the
# shell and nft text that emit-iptables renders, so it is rejected here, once.
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
# Linux IFNAMSIZ is 16 including the NUL; restrict to characters safe in sh and nft.
_INTERFACE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


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
        return _relay_needs(self.engine, self.tls, self.upstream_tls, self.multiplex)

    @property
    def kernel_forwards(self) -> tuple[Forward, ...]:
        """The forwards the kernel serves (nftables DNAT): all of them with data_path kernel, or auto when nothing
        needs the relay; never the auto_discovery port, whose answers the relay rewrites."""
        if self.data_path == "userspace" or (self.data_path == "auto" and self.relay_needs() is not None):
            return ()
        return self.forwards


# Defaults are HAProxy-like: connect 5 s, idle (HAProxy `timeout client/server`) 1 h,
# drain (HAProxy `hard-stop-after`) 30 s.
DEFAULTS: dict[str, Any] = {
    "listen_address": "0.0.0.0",
    "interface": "eth0",
    "workers": 1,
    "connect_timeout_s": 5.0,
    "idle_timeout_s": 3600.0,
    "drain_timeout_s": 30.0,
    "max_connections": 10000,
    "multiplex": False,
    "multiplex_connections": 1,
    "mux_stall_timeout_s": 5.0,
    "cpu_affinity": False,
    "access_log": False,
    "data_path": "userspace",
}

_TOP_KEYS = (
    "engine",
    "public_address",
    "listen_address",
    "interface",
    "allowed_clients",
    "forwards",
    "metrics",
    "workers",
    "connect_timeout_s",
    "idle_timeout_s",
    "drain_timeout_s",
    "max_connections",
    "multiplex",
    "multiplex_connections",
    "mux_stall_timeout_s",
    "cpu_affinity",
    "auto_discovery",
    "discovery",
    "tls",
    "upstream_tls",
    "auth",
    "access_log",
    "data_path",
)

T = TypeVar("T")
# While parse() runs: where _mapping reports unknown keys, so that parsing goes on and finds every mistake.
_collecting: contextvars.ContextVar[list[ConfigError] | None] = contextvars.ContextVar("_collecting", default=None)


def _fail(path: str, value: object, expected: str) -> ConfigError:
    shown = "missing" if value is _MISSING else repr(value)
    return ConfigError(f"{path}: {shown} is not valid; expected {expected}")


_MISSING = object()


def _key_name(key: object) -> str:
    return key if isinstance(key, str) and key.isprintable() else repr(key)  # keep the message one line


def _mapping(value: object, path: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path or "config", value, "a mapping of keys")
    unknown: list[str] = []
    for key in value:
        if key not in allowed:
            name = _key_name(key)
            where = f"{path}.{name}" if path else str(name)
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            unknown.append(f"{where}: unknown key{hint}; valid keys here are: {', '.join(allowed)}")
    if unknown:
        collected = _collecting.get()
        if collected is None:
            raise ConfigError(*unknown)
        collected.append(ConfigError(*unknown))  # and check the known keys beside them
        return {k: v for k, v in value.items() if k in allowed}
    return cast(Mapping[str, Any], value)


def _attempt(errors: list[ConfigError], parse: Callable[[], T], fallback: T) -> T:
    """parse(), or `fallback` with its ConfigError kept in `errors`: one mistake does not hide the next."""
    try:
        return parse()
    except ConfigError as exc:
        errors.append(exc)
        return fallback


def _require(data: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in data or data[key] is None:
        raise _fail(path, _MISSING, _DESCRIPTIONS.get(key, "a value"))
    return data[key]


_DESCRIPTIONS = {
    "engine": "one of memcached, redis, redis-cluster",
    "public_address": "the IP address or DNS name clients dial (the EIP)",
    "allowed_clients": "a non-empty list of CIDRs such as 198.51.100.27/32",
    "forwards": "a non-empty list of {port, target} entries",
    "port": "an integer port from 1 to 65535",
    "target": "HOST:PORT such as 10.0.1.230:11211",
    "cluster_id": "the ElastiCache cluster or replication group id",
    "cert": "the path of a PEM certificate file",
    "key": "the path of a PEM private key file",
    "password": "the Redis AUTH token",
    "listen": "HOST:PORT such as 127.0.0.1:9108",
}


def _port(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _fail(path, value, "an integer port from 1 to 65535")
    return value


def _host(value: object, path: str) -> str:
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            if _HOSTNAME.match(value):
                return value
    raise _fail(path, value, "an IP address or a DNS host name")


def _host_port(value: object, path: str) -> Target:
    if not isinstance(value, str):
        raise _fail(path, value, "HOST:PORT such as 10.0.1.230:11211")
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
    else:
        host, sep, port_text = value.rpartition(":")
    if not sep or not host or ":" in host and not value.startswith("["):
        raise _fail(path, value, "HOST:PORT such as 10.0.1.230:11211 (IPv6 as [::1]:11211)")
    if not port_text.isdigit():
        raise _fail(path, value, "HOST:PORT with a numeric port from 1 to 65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise _fail(path, value, "HOST:PORT with a port from 1 to 65535")
    return Target(_host(host, path), port)


def _seconds(value: object, path: str, *, allow_zero: bool = False) -> float:
    # NaN passes every comparison below, and uvloop then fails each timer with "cannot convert float NaN".
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _fail(path, value, "a number of seconds")
    if value < 0 or (value == 0 and not allow_zero):
        raise _fail(path, value, "a positive number of seconds" + (" or 0 to disable" if allow_zero else ""))
    return float(value)


def _positive_int(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(path, value, "a positive integer")
    return value


def _workers(value: object, path: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise _fail(path, value, "an integer from 1 to 256, or auto (one per core)")
    return value


def _multiplex_connections(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise _fail(path, value, "an integer from 1 to 64 (shared node connections per forward and worker)")
    return value


def _cpu_affinity(value: object, workers: int) -> bool:
    """`cpu_affinity: true` pins each worker to a CPU and steers connections to it; it needs workers to steer to."""
    if not isinstance(value, bool):
        raise _fail("cpu_affinity", value, "true or false")
    if value and workers < 2:
        raise ConfigError(
            f"cpu_affinity: needs workers of 2 or more (workers is {workers}: one worker takes every connection "
            "anyway); raise workers or remove cpu_affinity"
        )
    return value


def _multiplex(value: object, engine: str, tls: TLSConfig | None, upstream: UpstreamTLS | None) -> bool:
    """`multiplex: true` shares node connections; refused where natfwd cannot follow the requests yet."""
    if not isinstance(value, bool):
        raise _fail("multiplex", value, "true or false")
    if value and engine == "redis-cluster":
        raise ConfigError(
            "multiplex: not available with engine redis-cluster (cluster clients open a connection per node "
            "anyway); remove multiplex or use engine redis"
        )
    if value and (tls is not None or upstream is not None):
        key = "tls" if tls is not None else "upstream_tls"
        raise ConfigError(f"multiplex: cannot be combined with {key} yet; remove one of the two")
    return value


def _network(value: object, path: str) -> Network:
    if not isinstance(value, str):
        raise _fail(path, value, "a CIDR such as 198.51.100.27/32")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise _fail(path, value, f"a CIDR such as 198.51.100.27/32 ({exc})") from None


def _path(value: object, path: str) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(path, value, "a file path")
    try:
        return Path(credentials.resolve(value))
    except credentials.CredentialError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _optional(data: Mapping[str, Any], key: str, parse: Callable[[object, str], T], path: str) -> T | None:
    value = data.get(key)
    return None if value is None else parse(value, path)


def _forward(item: object, path: str) -> Forward:
    entry = _mapping(item, path, ("port", "target"))
    errors: list[ConfigError] = []
    port = _attempt(errors, lambda: _port(_require(entry, "port", f"{path}.port"), f"{path}.port"), None)
    target = _attempt(errors, lambda: _host_port(_require(entry, "target", f"{path}.target"), f"{path}.target"), None)
    if port is None or target is None:
        raise ConfigError(*[problem for error in errors for problem in error.problems])
    return Forward(port, target)


def _forwards(value: object) -> tuple[Forward, ...]:
    if not isinstance(value, list):
        raise _fail("forwards", value, _DESCRIPTIONS["forwards"])
    forwards: list[Forward] = []
    seen: dict[int, int] = {}
    errors: list[ConfigError] = []
    for index, item in enumerate(value):
        try:
            forward = _forward(item, f"forwards[{index}]")
        except ConfigError as exc:
            errors.append(exc)
            continue
        if forward.port in seen:
            errors.append(
                ConfigError(
                    f"forwards[{index}].port: {forward.port} is already used by forwards[{seen[forward.port]}]; "
                    "each forward needs its own port"
                )
            )
            continue
        seen[forward.port] = index
        forwards.append(forward)
    if errors:
        raise ConfigError(*[problem for error in errors for problem in error.problems])
    return tuple(forwards)


def _metrics(value: object) -> MetricsConfig:
    entry = _mapping(value, "metrics", ("listen",))
    target = _host_port(_require(entry, "listen", "metrics.listen"), "metrics.listen")
    return MetricsConfig(target.host, target.port)


def _auto_discovery(value: object) -> AutoDiscovery:
    entry = _mapping(value, "auto_discovery", ("port", "target"))
    port = _port(_require(entry, "port", "auto_discovery.port"), "auto_discovery.port")
    target = _host_port(_require(entry, "target", "auto_discovery.target"), "auto_discovery.target")
    return AutoDiscovery(port, target)


def _discovery(value: object) -> Discovery:
    keys = ("cluster_id", "region", "refresh_s", "first_port", "endpoint_url", "state_file")
    entry = _mapping(value, "discovery", keys)
    cluster_id = _require(entry, "cluster_id", "discovery.cluster_id")
    if not isinstance(cluster_id, str) or not re.fullmatch(r"[A-Za-z0-9-]{1,64}", cluster_id):
        raise _fail("discovery.cluster_id", cluster_id, "a cluster or replication group id (letters, digits, hyphens)")
    region = entry.get("region")
    if region is not None and (not isinstance(region, str) or not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", region)):
        raise _fail("discovery.region", region, "an AWS region such as us-east-1")
    endpoint_url = entry.get("endpoint_url")
    if endpoint_url is not None and (not isinstance(endpoint_url, str) or not re.match(r"https?://", endpoint_url)):
        raise _fail("discovery.endpoint_url", endpoint_url, "an http:// or https:// URL")
    refresh_s = _seconds(entry.get("refresh_s", 30), "discovery.refresh_s")
    first_port = _port(entry.get("first_port", 11211), "discovery.first_port")
    state_file = _optional(entry, "state_file", _path, "discovery.state_file")
    return Discovery(cluster_id, region, refresh_s, first_port, endpoint_url, state_file)


def _tls(value: object) -> TLSConfig:
    entry = _mapping(value, "tls", ("cert", "key", "client_ca"))
    return TLSConfig(
        cert=_path(_require(entry, "cert", "tls.cert"), "tls.cert"),
        key=_path(_require(entry, "key", "tls.key"), "tls.key"),
        client_ca=_optional(entry, "client_ca", _path, "tls.client_ca"),
    )


def _upstream_tls(value: object) -> UpstreamTLS:
    if value is True or value == {}:
        return UpstreamTLS(ca=None)
    entry = _mapping(value, "upstream_tls", ("ca",))
    return UpstreamTLS(ca=_optional(entry, "ca", _path, "upstream_tls.ca"))


def _auth(value: object) -> Auth:
    entry = _mapping(value, "auth", ("username", "password"))
    password = _require(entry, "password", "auth.password")
    if not isinstance(password, str) or not password:
        raise _fail("auth.password", "***", "a non-empty string")
    username = entry.get("username")
    if username is not None and not isinstance(username, str):
        raise _fail("auth.username", username, "a string")
    return Auth(username, password)


def _engine(top: Mapping[str, Any]) -> Engine:
    engine = _require(top, "engine", "engine")
    if engine not in ENGINES:
        raise _fail("engine", engine, _DESCRIPTIONS["engine"])
    return cast(Engine, engine)


def _listen_address(value: object) -> str:
    try:
        if not isinstance(value, str):  # ip_address() would take 0 or True as 0.0.0.0 / 0.0.0.1
            raise ValueError(value)
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _fail("listen_address", value, "an IP address to bind, such as 0.0.0.0 or ::") from None


def _interface(value: object) -> str:
    if not isinstance(value, str) or not _INTERFACE.match(value):
        raise _fail("interface", value, "a network interface name such as eth0 (letters, digits, _ . -, at most 15)")
    return value


def _allowed_clients(top: Mapping[str, Any]) -> tuple[Network, ...]:
    clients_raw = _require(top, "allowed_clients", "allowed_clients")
    if not isinstance(clients_raw, list) or not clients_raw:
        raise _fail("allowed_clients", clients_raw, _DESCRIPTIONS["allowed_clients"])
    errors: list[ConfigError] = []
    allowed: list[Network] = []
    for index, item in enumerate(clients_raw):
        try:
            allowed.append(_network(item, f"allowed_clients[{index}]"))
        except ConfigError as exc:
            errors.append(exc)
    if errors:
        raise ConfigError(*[problem for error in errors for problem in error.problems])
    return tuple(allowed)


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, value, "true or false")
    return value


_RELAY_ONLY = {
    "tls": "tls: the kernel cannot terminate TLS",
    "upstream_tls": "upstream_tls: the kernel cannot open TLS to the nodes",
    "engine": "engine redis-cluster: MOVED/ASK and CLUSTER replies need rewriting",
    "multiplex": "multiplex: only the relay shares node connections",
}


def _relay_needs(engine: str | None, tls: object, upstream_tls: object, multiplex: bool | None) -> str | None:
    if tls is not None:
        return "tls"
    if upstream_tls is not None:
        return "upstream_tls"
    if engine == "redis-cluster":
        return "engine"
    if multiplex:
        return "multiplex"
    return None


def _data_path(value: object, relay_need: str | None, auto_discovery: AutoDiscovery | None) -> DataPath:
    """`data_path`: with kernel, every forward must be one the kernel can serve (auto picks per forward)."""
    if not isinstance(value, str) or value not in DATA_PATHS:
        raise _fail("data_path", value, "one of userspace, kernel, auto")
    data_path = cast(DataPath, value)
    if data_path == "kernel":
        need = relay_need
        if need is not None:
            raise ConfigError(
                f"data_path: kernel cannot serve these forwards ({_RELAY_ONLY[need]}); use data_path: auto, which "
                "keeps them on the relay, or userspace"
            )
        if auto_discovery is not None:
            raise ConfigError(
                "data_path: kernel cannot serve auto_discovery (its answers need node addresses rewritten); use "
                "data_path: auto, which keeps that port on the relay and the forwards on the kernel"
            )
    return data_path


def _not_empty(top: Mapping[str, Any], key: str, fix: str) -> None:
    """A section given with nothing in it (YAML null: every entry commented out) is a mistake, not "off"."""
    if key in top and top[key] is None:
        raise ConfigError(f"{key}: is empty (are all its entries commented out?); {fix}")


def parse(data: object) -> Config:
    """Validate a decoded YAML document; raises one ConfigError naming every bad key, one per line."""
    if data is None:
        raise ConfigError("config: the file is empty; see config.example.yaml for a complete example")
    errors: list[ConfigError] = []
    token = _collecting.set(errors)
    cfg: Config | None = None
    try:
        cfg = _parse(data, errors)
    except ConfigError as exc:  # the document itself is not a mapping
        errors.append(exc)
    finally:
        _collecting.reset(token)
    if cfg is None or errors:
        raise ConfigError(*[problem for error in errors for problem in error.problems])
    return cfg


def _parse(data: object, errors: list[ConfigError]) -> Config | None:
    top = _mapping(data, "", _TOP_KEYS)
    merged = {**DEFAULTS, **{k: v for k, v in top.items() if v is not None}}

    def attempt(parse: Callable[[], T]) -> T | None:
        return _attempt(errors, parse, None)

    engine = attempt(lambda: _engine(top))
    public_address = attempt(lambda: _host(_require(top, "public_address", "public_address"), "public_address"))
    listen_address = attempt(lambda: _listen_address(merged["listen_address"]))
    interface = attempt(lambda: _interface(merged["interface"]))
    allowed = attempt(lambda: _allowed_clients(top))

    discovery = attempt(lambda: _optional(top, "discovery", lambda v, _p: _discovery(v), "discovery"))
    forwards_raw = top.get("forwards")
    forwards: tuple[Forward, ...] | None = ()
    if forwards_raw is not None or discovery is None:
        forwards = attempt(lambda: _forwards(_require(top, "forwards", "forwards")))
        if forwards is not None and not forwards:
            errors.append(_fail("forwards", forwards_raw, _DESCRIPTIONS["forwards"] + " (or a discovery section)"))
    ports = forwards or ()

    auto_discovery = attempt(
        lambda: _optional(top, "auto_discovery", lambda v, _p: _auto_discovery(v), "auto_discovery")
    )
    if auto_discovery is not None:
        if engine is not None and engine != "memcached":
            errors.append(ConfigError(f"auto_discovery: only valid with engine memcached, not {engine!r}"))
        clash = next((i for i, f in enumerate(ports) if f.port == auto_discovery.port), None)
        if clash is not None:
            errors.append(
                ConfigError(
                    f"auto_discovery.port: {auto_discovery.port} is already used by forwards[{clash}]; pick a free port"
                )
            )

    attempt(lambda: _not_empty(top, "tls", "give cert and key, or remove the tls key to serve without TLS"))
    attempt(
        lambda: _not_empty(
            top,
            "upstream_tls",
            "write `upstream_tls: {}` to verify the nodes against the system CA store, or remove the key",
        )
    )
    tls = attempt(lambda: _optional(top, "tls", lambda v, _p: _tls(v), "tls"))
    upstream_tls = attempt(lambda: _optional(top, "upstream_tls", lambda v, _p: _upstream_tls(v), "upstream_tls"))
    metrics = attempt(lambda: _optional(top, "metrics", lambda v, _p: _metrics(v), "metrics"))
    if metrics is not None and metrics.port in {f.port for f in ports} and metrics.host in (listen_address, "0.0.0.0"):
        errors.append(ConfigError(f"metrics.listen: port {metrics.port} is also a forward port; pick another port"))

    workers = attempt(lambda: _workers(merged["workers"], "workers"))
    connect_timeout_s = attempt(lambda: _seconds(merged["connect_timeout_s"], "connect_timeout_s"))
    idle_timeout_s = attempt(lambda: _seconds(merged["idle_timeout_s"], "idle_timeout_s", allow_zero=True))
    drain_timeout_s = attempt(lambda: _seconds(merged["drain_timeout_s"], "drain_timeout_s", allow_zero=True))
    max_connections = attempt(lambda: _positive_int(merged["max_connections"], "max_connections"))
    multiplex = attempt(lambda: _multiplex(merged["multiplex"], str(engine), tls, upstream_tls))
    multiplex_connections = attempt(
        lambda: _multiplex_connections(merged["multiplex_connections"], "multiplex_connections")
    )
    mux_stall_timeout_s = attempt(lambda: _seconds(merged["mux_stall_timeout_s"], "mux_stall_timeout_s"))
    cpu_affinity = attempt(lambda: _cpu_affinity(merged["cpu_affinity"], 2 if workers is None else workers))
    auth = attempt(lambda: _optional(top, "auth", lambda v, _p: _auth(v), "auth"))
    access_log = attempt(lambda: _bool(merged["access_log"], "access_log"))
    relay_need = _relay_needs(engine, tls, upstream_tls, multiplex)
    data_path = attempt(lambda: _data_path(merged["data_path"], relay_need, auto_discovery))
    if errors:
        return None  # parse() raises them all
    assert engine is not None and public_address is not None and listen_address is not None
    assert interface is not None and allowed is not None and forwards is not None and workers is not None
    assert connect_timeout_s is not None and idle_timeout_s is not None and drain_timeout_s is not None
    assert mux_stall_timeout_s is not None
    assert max_connections is not None and multiplex is not None and multiplex_connections is not None
    assert cpu_affinity is not None and access_log is not None and data_path is not None
    return Config(
        engine=engine,
        public_address=public_address,
        listen_address=listen_address,
        interface=interface,
        allowed_clients=allowed,
        forwards=forwards,
        metrics=metrics,
        workers=workers,
        connect_timeout_s=connect_timeout_s,
        idle_timeout_s=idle_timeout_s,
        drain_timeout_s=drain_timeout_s,
        max_connections=max_connections,
        multiplex=multiplex,
        multiplex_connections=multiplex_connections,
        mux_stall_timeout_s=mux_stall_timeout_s,
        cpu_affinity=cpu_affinity,
        auto_discovery=auto_discovery,
        discovery=discovery,
        tls=tls,
        upstream_tls=upstream_tls,
        auth=auth,
        access_log=access_log,
        data_path=data_path,
    )


# Warned about at start (natfwd serve), not refused: each can be what the operator meant.
WIDE_ALLOWLIST_PREFIX = 8


def warnings(cfg: Config) -> list[str]:
    """Settings that work but are probably a mistake: an allowlist wider than /8, /metrics reachable off-host."""
    found: list[str] = []
    for index, net in enumerate(cfg.allowed_clients):
        if net.prefixlen < WIDE_ALLOWLIST_PREFIX:
            found.append(
                f"allowed_clients[{index}]: {net} is wider than /{WIDE_ALLOWLIST_PREFIX} and lets in "
                f"{net.num_addresses:,} addresses; list the trusted clients' networks instead"
            )
    if cfg.workers > 1 and cfg.kernel_forwards and cfg.auto_discovery is None:
        # Only worker 0 programs nft; the others would have nothing to relay.
        found.append(
            f"workers: {cfg.workers} gain nothing with data_path {cfg.data_path}: the kernel forwards every "
            "connection and one worker programs it; set workers: 1"
        )
    if cfg.metrics is not None:
        try:
            loopback = ipaddress.ip_address(cfg.metrics.host).is_loopback
        except ValueError:
            loopback = cfg.metrics.host == "localhost"
        if not loopback:
            found.append(
                f"metrics.listen: {cfg.metrics.host}:{cfg.metrics.port} is not a loopback address, so /metrics "
                "(no authentication) is reachable from the network; bind 127.0.0.1 unless a firewall keeps it private"
            )
    return found


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice; plain YAML loading silently keeps only the last one."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._paths: dict[int, str] = {}  # id(mapping node) -> its key path, such as forwards[1]
        self.lines: dict[str, int] = {}  # key path -> the line of its key (or of its list item), from 1

    def construct_document(self, node: yaml.Node) -> Any:
        self._record_paths(node)
        return super().construct_document(node)

    def _record_paths(self, root: yaml.Node) -> None:
        # Iterative, each node once: an anchor reached again through an alias (even inside itself) keeps its first path.
        seen: set[int] = set()
        stack: list[tuple[yaml.Node, str]] = [(root, "")]
        while stack:
            node, path = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.MappingNode):
                self._paths[id(node)] = path
                for key_node, value_node in node.value:
                    name = _key_name(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                    child = f"{path}.{name}" if path else name
                    self.lines[child] = key_node.start_mark.line + 1  # a duplicate: the later one
                    stack.append((value_node, child))
            elif isinstance(node, yaml.SequenceNode):
                for index, item in enumerate(node.value):
                    self.lines.setdefault(f"{path}[{index}]", item.start_mark.line + 1)
                    stack.append((item, f"{path}[{index}]"))

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        # Checked before SafeLoader flattens `<<` merges, whose keys an explicit key may rightly override.
        lines: dict[object, int] = {}
        for key_node, _value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: SafeLoader rejects it as unhashable
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # flatten_mapping merges every `<<`, so a second one loses nothing
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in lines:
                parent = self._paths.get(id(node), "")
                name = _key_name(key)
                where = f"line {line}" if lines[key] == line else f"lines {lines[key]} and {line}"
                raise ConfigError(
                    f"{f'{parent}.{name}' if parent else name}: duplicate key on {where}; remove one of them"
                )
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file; raises ConfigError (never OSError or YAMLError), each problem as
    `FILE:LINE: key.path: ...`."""
    try:
        path = credentials.resolve(os.fspath(path))
    except credentials.CredentialError as exc:
        raise ConfigError(f"config: {exc}") from None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config: {os.fspath(path)!r} does not exist; pass --config, set NATFWD_CONFIG, or create {DEFAULT_PATH}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: cannot read {os.fspath(path)!r}: {exc}") from None
    return loads(text, source=os.fspath(path))


DEFAULT_PATH = "/etc/natfwd/natfwd.yaml"


def _located(problems: tuple[str, ...], source: str, lines: Mapping[str, int]) -> ConfigError:
    """Each problem prefixed with `source:line:` of the key path it starts with (or of its nearest parent)."""
    located: list[tuple[int, str]] = []
    for problem in problems:
        path = problem.partition(": ")[0]
        while path and path not in lines:
            path = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path) if re.search(r"(\.[^.\[]*|\[\d+\])$", path) else ""
        line = lines.get(path)
        if line is None:
            located.append((0, f"{source}: {problem}"))
        else:
            located.append((line, f"{source}:{line}: {problem}"))
    located.sort(key=lambda item: item[0])  # in file order, as a compiler reports; stable within a line
    return ConfigError(*(problem for _line, problem in located))


def loads(text: str, source: str | None = None) -> Config:
    """Validate YAML text; raises ConfigError with every problem found, each on its own line. With `source` (the
    file's name) each problem starts `source:line:`, as a compiler's do."""
    where = source if source is not None else "<config>"
    loader: _UniqueKeyLoader | None = None
    try:
        loader = _UniqueKeyLoader(text)  # a SafeLoader subclass: no arbitrary tags
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if source is not None and mark is not None:
            raise ConfigError(f"{source}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}") from None
        at = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config: {where}{at}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"config: {where}: invalid YAML: nested too deeply") from None
    except ConfigError as exc:  # a duplicate key
        if source is None or loader is None:
            raise
        raise _located(exc.problems, source, loader.lines) from None
    finally:
        if loader is not None:
            loader.dispose()
    try:
        return parse(data)
    except ConfigError as exc:
        if source is None:
            raise
        raise _located(exc.problems, source, loader.lines) from None
