"""Validation of each config key: one parser per value, each raising a ConfigError that names the key path, the bad
value and what would be valid."""

from __future__ import annotations

import contextvars
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

from forwarder import credentials
from forwarder.configtypes import (
    DATA_PATHS,
    ENGINES,
    RELAY_ONLY,
    Auth,
    AutoDiscovery,
    ConfigError,
    DataPath,
    Discovery,
    Engine,
    Forward,
    MetricsConfig,
    Network,
    Target,
    TLSConfig,
    UpstreamTLS,
)

# RFC 1123 host names; anything else (spaces, quotes, `;`) could inject into the
# shell and nft text that emit-iptables renders, so it is rejected here, once.
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
# Linux IFNAMSIZ is 16 including the NUL; restrict to characters safe in sh and nft.
_INTERFACE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


T = TypeVar("T")
# While parse() runs: where mapping reports unknown keys, so that parsing goes on and finds every mistake.
collecting: contextvars.ContextVar[list[ConfigError] | None] = contextvars.ContextVar("collecting", default=None)


def fail(path: str, value: object, expected: str) -> ConfigError:
    shown = "missing" if value is _MISSING else repr(value)
    return ConfigError(f"{path}: {shown} is not valid; expected {expected}")


_MISSING = object()


def key_name(key: object) -> str:
    return key if isinstance(key, str) and key.isprintable() else repr(key)  # keep the message one line


def mapping(value: object, path: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise fail(path or "config", value, "a mapping of keys")
    unknown: list[str] = []
    for key in value:
        if key not in allowed:
            name = key_name(key)
            where = f"{path}.{name}" if path else str(name)
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            unknown.append(f"{where}: unknown key{hint}; valid keys here are: {', '.join(allowed)}")
    if unknown:
        collected = collecting.get()
        if collected is None:
            raise ConfigError(*unknown)
        collected.append(ConfigError(*unknown))  # and check the known keys beside them
        return {k: v for k, v in value.items() if k in allowed}
    return cast(Mapping[str, Any], value)


def attempt(errors: list[ConfigError], parse: Callable[[], T], fallback: T) -> T:
    """parse(), or `fallback` with its ConfigError kept in `errors`: one mistake does not hide the next."""
    try:
        return parse()
    except ConfigError as exc:
        errors.append(exc)
        return fallback


def require(data: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in data or data[key] is None:
        raise fail(path, _MISSING, DESCRIPTIONS.get(key, "a value"))
    return data[key]


DESCRIPTIONS = {
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
        raise fail(path, value, "an integer port from 1 to 65535")
    return value


def hostname(value: object, path: str) -> str:
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            if _HOSTNAME.match(value):
                return value
    raise fail(path, value, "an IP address or a DNS host name")


def _host_port(value: object, path: str) -> Target:
    if not isinstance(value, str):
        raise fail(path, value, "HOST:PORT such as 10.0.1.230:11211")
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
    else:
        host, sep, port_text = value.rpartition(":")
    if not sep or not host or ":" in host and not value.startswith("["):
        raise fail(path, value, "HOST:PORT such as 10.0.1.230:11211 (IPv6 as [::1]:11211)")
    if not port_text.isdigit():
        raise fail(path, value, "HOST:PORT with a numeric port from 1 to 65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise fail(path, value, "HOST:PORT with a port from 1 to 65535")
    return Target(hostname(host, path), port)


def seconds(value: object, path: str, *, allow_zero: bool = False) -> float:
    # NaN passes every comparison below, and uvloop then fails each timer with "cannot convert float NaN".
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise fail(path, value, "a number of seconds")
    if value < 0 or (value == 0 and not allow_zero):
        raise fail(path, value, "a positive number of seconds" + (" or 0 to disable" if allow_zero else ""))
    return float(value)


def positive_int(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(path, value, "a positive integer")
    return value


def workers(value: object, path: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise fail(path, value, "an integer from 1 to 256, or auto (one per core)")
    return value


def multiplex_connections(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise fail(path, value, "an integer from 1 to 64 (shared node connections per forward and worker)")
    return value


def cpu_affinity(value: object, workers: int) -> bool:
    """`cpu_affinity: true` pins each worker to a CPU and steers connections to it; it needs workers to steer to."""
    if not isinstance(value, bool):
        raise fail("cpu_affinity", value, "true or false")
    if value and workers < 2:
        raise ConfigError(
            f"cpu_affinity: needs workers of 2 or more (workers is {workers}: one worker takes every connection "
            "anyway); raise workers or remove cpu_affinity"
        )
    return value


def multiplex(value: object, engine: str, tls: TLSConfig | None, upstream: UpstreamTLS | None) -> bool:
    """`multiplex: true` shares node connections; refused where natfwd cannot follow the requests yet."""
    if not isinstance(value, bool):
        raise fail("multiplex", value, "true or false")
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
        raise fail(path, value, "a CIDR such as 198.51.100.27/32")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise fail(path, value, f"a CIDR such as 198.51.100.27/32 ({exc})") from None


def _path(value: object, path: str) -> Path:
    if not isinstance(value, str) or not value:
        raise fail(path, value, "a file path")
    try:
        return Path(credentials.resolve(value))
    except credentials.CredentialError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def optional(data: Mapping[str, Any], key: str, parse: Callable[[object, str], T], path: str) -> T | None:
    value = data.get(key)
    return None if value is None else parse(value, path)


def _forward(item: object, path: str) -> Forward:
    entry = mapping(item, path, ("port", "target"))
    errors: list[ConfigError] = []
    port = attempt(errors, lambda: _port(require(entry, "port", f"{path}.port"), f"{path}.port"), None)
    target = attempt(errors, lambda: _host_port(require(entry, "target", f"{path}.target"), f"{path}.target"), None)
    if port is None or target is None:
        raise ConfigError(*[problem for error in errors for problem in error.problems])
    return Forward(port, target)


def forwards(value: object) -> tuple[Forward, ...]:
    if not isinstance(value, list):
        raise fail("forwards", value, DESCRIPTIONS["forwards"])
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


def metrics(value: object) -> MetricsConfig:
    entry = mapping(value, "metrics", ("listen",))
    target = _host_port(require(entry, "listen", "metrics.listen"), "metrics.listen")
    return MetricsConfig(target.host, target.port)


def auto_discovery(value: object) -> AutoDiscovery:
    entry = mapping(value, "auto_discovery", ("port", "target"))
    port = _port(require(entry, "port", "auto_discovery.port"), "auto_discovery.port")
    target = _host_port(require(entry, "target", "auto_discovery.target"), "auto_discovery.target")
    return AutoDiscovery(port, target)


def discovery(value: object) -> Discovery:
    keys = ("cluster_id", "region", "refresh_s", "first_port", "endpoint_url", "state_file")
    entry = mapping(value, "discovery", keys)
    cluster_id = require(entry, "cluster_id", "discovery.cluster_id")
    if not isinstance(cluster_id, str) or not re.fullmatch(r"[A-Za-z0-9-]{1,64}", cluster_id):
        raise fail("discovery.cluster_id", cluster_id, "a cluster or replication group id (letters, digits, hyphens)")
    region = entry.get("region")
    if region is not None and (not isinstance(region, str) or not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", region)):
        raise fail("discovery.region", region, "an AWS region such as us-east-1")
    endpoint_url = entry.get("endpoint_url")
    if endpoint_url is not None and (not isinstance(endpoint_url, str) or not re.match(r"https?://", endpoint_url)):
        raise fail("discovery.endpoint_url", endpoint_url, "an http:// or https:// URL")
    refresh_s = seconds(entry.get("refresh_s", 30), "discovery.refresh_s")
    first_port = _port(entry.get("first_port", 11211), "discovery.first_port")
    state_file = optional(entry, "state_file", _path, "discovery.state_file")
    return Discovery(cluster_id, region, refresh_s, first_port, endpoint_url, state_file)


def tls(value: object) -> TLSConfig:
    entry = mapping(value, "tls", ("cert", "key", "client_ca"))
    return TLSConfig(
        cert=_path(require(entry, "cert", "tls.cert"), "tls.cert"),
        key=_path(require(entry, "key", "tls.key"), "tls.key"),
        client_ca=optional(entry, "client_ca", _path, "tls.client_ca"),
    )


def upstream_tls(value: object) -> UpstreamTLS:
    if value is True or value == {}:
        return UpstreamTLS(ca=None)
    entry = mapping(value, "upstream_tls", ("ca",))
    return UpstreamTLS(ca=optional(entry, "ca", _path, "upstream_tls.ca"))


def auth(value: object) -> Auth:
    entry = mapping(value, "auth", ("username", "password"))
    password = require(entry, "password", "auth.password")
    if not isinstance(password, str) or not password:
        raise fail("auth.password", "***", "a non-empty string")
    username = entry.get("username")
    if username is not None and not isinstance(username, str):
        raise fail("auth.username", username, "a string")
    return Auth(username, password)


def engine(top: Mapping[str, Any]) -> Engine:
    engine = require(top, "engine", "engine")
    if engine not in ENGINES:
        raise fail("engine", engine, DESCRIPTIONS["engine"])
    return cast(Engine, engine)


def listen_address(value: object) -> str:
    try:
        if not isinstance(value, str):  # ip_address() would take 0 or True as 0.0.0.0 / 0.0.0.1
            raise ValueError(value)
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise fail("listen_address", value, "an IP address to bind, such as 0.0.0.0 or ::") from None


def interface(value: object) -> str:
    if not isinstance(value, str) or not _INTERFACE.match(value):
        raise fail("interface", value, "a network interface name such as eth0 (letters, digits, _ . -, at most 15)")
    return value


def allowed_clients(top: Mapping[str, Any]) -> tuple[Network, ...]:
    clients_raw = require(top, "allowed_clients", "allowed_clients")
    if not isinstance(clients_raw, list) or not clients_raw:
        raise fail("allowed_clients", clients_raw, DESCRIPTIONS["allowed_clients"])
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


def boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise fail(path, value, "true or false")
    return value


def data_path(value: object, relay_need: str | None, auto_discovery: AutoDiscovery | None) -> DataPath:
    """`data_path`: with kernel, every forward must be one the kernel can serve (auto picks per forward)."""
    if not isinstance(value, str) or value not in DATA_PATHS:
        raise fail("data_path", value, "one of userspace, kernel, auto")
    data_path = cast(DataPath, value)
    if data_path == "kernel":
        need = relay_need
        if need is not None:
            raise ConfigError(
                f"data_path: kernel cannot serve these forwards ({RELAY_ONLY[need]}); use data_path: auto, which "
                "keeps them on the relay, or userspace"
            )
        if auto_discovery is not None:
            raise ConfigError(
                "data_path: kernel cannot serve auto_discovery (its answers need node addresses rewritten); use "
                "data_path: auto, which keeps that port on the relay and the forwards on the kernel"
            )
    return data_path


def not_empty(top: Mapping[str, Any], key: str, fix: str) -> None:
    """A section given with nothing in it (YAML null: every entry commented out) is a mistake, not "off"."""
    if key in top and top[key] is None:
        raise ConfigError(f"{key}: is empty (are all its entries commented out?); {fix}")
