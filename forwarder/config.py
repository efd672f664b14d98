"""YAML config to frozen, validated dataclasses; every mistake is one line of a single ConfigError."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from forwarder import configfields as fields
from forwarder import credentials
from forwarder.configtypes import (
    ALLOWED_CACHE_SIZE,
    DATA_PATHS,
    ENGINES,
    Auth,
    AutoDiscovery,
    Config,
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
    relay_needs,
)

__all__ = [
    "ALLOWED_CACHE_SIZE",
    "DATA_PATHS",
    "DEFAULT_PATH",
    "ENGINES",
    "Auth",
    "AutoDiscovery",
    "Config",
    "ConfigError",
    "DataPath",
    "Discovery",
    "Engine",
    "Forward",
    "MetricsConfig",
    "Network",
    "TLSConfig",
    "Target",
    "UpstreamTLS",
    "load",
    "loads",
    "parse",
    "warnings",
]

T = TypeVar("T")

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


def parse(data: object) -> Config:
    """Validate a decoded YAML document; raises one ConfigError naming every bad key, one per line."""
    if data is None:
        raise ConfigError("config: the file is empty; see config.example.yaml for a complete example")
    errors: list[ConfigError] = []
    token = fields.collecting.set(errors)
    cfg: Config | None = None
    try:
        cfg = _parse(data, errors)
    except ConfigError as exc:  # the document itself is not a mapping
        errors.append(exc)
    finally:
        fields.collecting.reset(token)
    if cfg is None or errors:
        raise ConfigError(*[problem for error in errors for problem in error.problems])
    return cfg


def _parse(data: object, errors: list[ConfigError]) -> Config | None:
    top = fields.mapping(data, "", _TOP_KEYS)
    merged = {**DEFAULTS, **{k: v for k, v in top.items() if v is not None}}

    def attempt(parse: Callable[[], T]) -> T | None:
        return fields.attempt(errors, parse, None)

    engine = attempt(lambda: fields.engine(top))
    public_address = attempt(
        lambda: fields.hostname(fields.require(top, "public_address", "public_address"), "public_address")
    )
    listen_address = attempt(lambda: fields.listen_address(merged["listen_address"]))
    interface = attempt(lambda: fields.interface(merged["interface"]))
    allowed = attempt(lambda: fields.allowed_clients(top))

    discovery = attempt(lambda: fields.optional(top, "discovery", lambda v, _p: fields.discovery(v), "discovery"))
    forwards_raw = top.get("forwards")
    forwards: tuple[Forward, ...] | None = ()
    if forwards_raw is not None or discovery is None:
        forwards = attempt(lambda: fields.forwards(fields.require(top, "forwards", "forwards")))
        if forwards is not None and not forwards:
            errors.append(
                fields.fail("forwards", forwards_raw, fields.DESCRIPTIONS["forwards"] + " (or a discovery section)")
            )
    ports = forwards or ()

    auto_discovery = attempt(
        lambda: fields.optional(top, "auto_discovery", lambda v, _p: fields.auto_discovery(v), "auto_discovery")
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

    attempt(lambda: fields.not_empty(top, "tls", "give cert and key, or remove the tls key to serve without TLS"))
    attempt(
        lambda: fields.not_empty(
            top,
            "upstream_tls",
            "write `upstream_tls: {}` to verify the nodes against the system CA store, or remove the key",
        )
    )
    tls = attempt(lambda: fields.optional(top, "tls", lambda v, _p: fields.tls(v), "tls"))
    upstream_tls = attempt(
        lambda: fields.optional(top, "upstream_tls", lambda v, _p: fields.upstream_tls(v), "upstream_tls")
    )
    metrics = attempt(lambda: fields.optional(top, "metrics", lambda v, _p: fields.metrics(v), "metrics"))
    if metrics is not None and metrics.port in {f.port for f in ports} and metrics.host in (listen_address, "0.0.0.0"):
        errors.append(ConfigError(f"metrics.listen: port {metrics.port} is also a forward port; pick another port"))

    workers = attempt(lambda: fields.workers(merged["workers"], "workers"))
    connect_timeout_s = attempt(lambda: fields.seconds(merged["connect_timeout_s"], "connect_timeout_s"))
    idle_timeout_s = attempt(lambda: fields.seconds(merged["idle_timeout_s"], "idle_timeout_s", allow_zero=True))
    drain_timeout_s = attempt(lambda: fields.seconds(merged["drain_timeout_s"], "drain_timeout_s", allow_zero=True))
    max_connections = attempt(lambda: fields.positive_int(merged["max_connections"], "max_connections"))
    multiplex = attempt(lambda: fields.multiplex(merged["multiplex"], str(engine), tls, upstream_tls))
    multiplex_connections = attempt(
        lambda: fields.multiplex_connections(merged["multiplex_connections"], "multiplex_connections")
    )
    mux_stall_timeout_s = attempt(lambda: fields.seconds(merged["mux_stall_timeout_s"], "mux_stall_timeout_s"))
    cpu_affinity = attempt(lambda: fields.cpu_affinity(merged["cpu_affinity"], 2 if workers is None else workers))
    auth = attempt(lambda: fields.optional(top, "auth", lambda v, _p: fields.auth(v), "auth"))
    access_log = attempt(lambda: fields.boolean(merged["access_log"], "access_log"))
    relay_need = relay_needs(engine, tls, upstream_tls, multiplex)
    data_path = attempt(lambda: fields.data_path(merged["data_path"], relay_need, auto_discovery))
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
                    name = fields.key_name(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
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
                name = fields.key_name(key)
                where = f"line {line}" if lines[key] == line else f"lines {lines[key]} and {line}"
                raise ConfigError(
                    f"{f'{parent}.{name}' if parent else name}: duplicate key on {where}; remove one of them"
                )
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def reloadable(started_with: DataPath, new: Config) -> Config:
    """`new` as a reload applies it to a serve started with data_path `started_with`: kept on the relay when it
    would turn the kernel path on in a serve started with `userspace` (that takes a restart).

    The node connections relayed until then were opened with conntrack off, so conntrack does not know them: a
    kernel forward could masquerade a client onto one's address and port, and the node's replies would then go
    to that client. Started with kernel or auto, serve's table keeps conntrack on from the start.
    """
    if started_with != "userspace" or new.data_path == "userspace":
        return new
    return dataclasses.replace(new, data_path="userspace")


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
