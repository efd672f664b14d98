"""The Prometheus registry, the natfwd metric families, and the /metrics exporter."""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from forwarder import __version__, extensions
from forwarder.errors import bind_error
from forwarder.fastseries import (
    AnyFamily,
    CounterFamily,
    CounterSeries,
    FilesCollector,
    GaugeFamily,
    GaugeSeries,
    HistogramFamily,
    HistogramSeries,
    LocalCollector,
    zero_gauges,
)

DIRECTION_TO_NODE = "client_to_node"
DIRECTION_TO_CLIENT = "node_to_client"
# natfwd_discovery_errors_total sources: the ElastiCache API poll of a `discovery` section, and re-resolving
# DNS-name node targets (the periodic round and the one at start).
DISCOVERY_ELASTICACHE = "elasticache"
DISCOVERY_DNS = "dns"

# Connect latency inside one VPC is sub-millisecond; the upper buckets catch retransmits and DNS stalls.
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Cache clients either open a connection per request (milliseconds) or keep a pool for hours.
DURATION_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
# Series made at start for every forward, so that increase() and alerts see the first failure (a series that
# appears at 1 has no increase).
UPSTREAM_ERROR_REASONS = ("timeout", "refused", "unreachable", "tls", "dns", "error")
# The C extensions natfwd_build_info reports, by their module name under forwarder.
EXTENSIONS = ("_crelay", "protocols._cframing")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


@dataclass(frozen=True, slots=True)
class ForwardMetrics:
    """The series of one forward, resolved once so the connection path never looks labels up."""

    accepted: CounterSeries
    active: GaugeSeries
    bytes_to_node: CounterSeries
    bytes_to_client: CounterSeries
    duration: HistogramSeries


class FastFamilies:
    """The families updated per connection (fastseries: no lock, no label lookup); the rest stay prometheus_client
    metrics. Their cells live in this process, or in files under `directory` with `workers: N`."""

    def __init__(self, directory: str | None) -> None:
        self.accepted = CounterFamily(
            "natfwd_connections_accepted_total",
            "Client connections accepted (allowlist passed), by listen port",
            ["forward"],
            directory,
        )
        self.active = GaugeFamily(
            "natfwd_connections_active", "Client connections open now, by listen port", ["forward"], directory
        )
        self.bytes = CounterFamily(
            "natfwd_bytes_total",
            "Bytes relayed, by listen port and direction (client_to_node, node_to_client)",
            ["forward", "direction"],
            directory,
        )
        self.upstream_connect = HistogramFamily(
            "natfwd_upstream_connect_seconds",
            "Time to open the TCP connection to the node",
            directory=directory,
            buckets=CONNECT_BUCKETS,
        )
        self.duration = HistogramFamily(
            "natfwd_connection_duration_seconds",
            "Lifetime of accepted client connections, from accept to close, by listen port",
            ["forward"],
            directory,
            buckets=DURATION_BUCKETS,
        )

    def all(self) -> list[AnyFamily]:
        return [self.accepted, self.active, self.bytes, self.upstream_connect, self.duration]


class Metrics:
    """Every natfwd metric family, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        fast = FastFamilies(multiprocess_dir())
        registry.register(LocalCollector(fast.all()))
        self.accepted = fast.accepted
        self.active = fast.active
        self.bytes = fast.bytes
        self.duration = fast.duration
        self.upstream_connect = fast.upstream_connect.labels()
        self.rejected = Counter(
            "natfwd_connections_rejected_total",
            "Client connections refused at accept or failed before relaying, by listen port and reason",
            ["forward", "reason"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "natfwd_upstream_errors_total",
            "Failed connections to a node, by listen port and reason (timeout, refused, unreachable, tls, dns)",
            ["forward", "reason"],
            registry=registry,
        )
        self.shared = Gauge(
            "natfwd_multiplex_node_connections",
            "Node connections shared by multiplexed clients (multiplex: true) open now, by listen port",
            ["forward"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.pinned = Counter(
            "natfwd_multiplex_pinned_total",
            "Multiplexed clients given a node connection of their own, by listen port and reason (command: a "
            "request that cannot share; pipelined; large_request; eof_mid_request; alone; no_reset)",
            ["forward", "reason"],
            registry=registry,
        )
        self.reloads = Counter(
            "natfwd_config_reloads_total",
            "Config reloads (SIGHUP), by result (success, failure)",
            ["result"],
            registry=registry,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self.forward_changes = Counter(
            "natfwd_forward_changes_total",
            "Forwards opened, closed or retargeted by reload, discovery or DNS re-resolution, by change",
            ["change"],
            registry=registry,
        )
        self.discovery_errors = Counter(
            "natfwd_discovery_errors_total",
            "Failed node lookups, by source (elasticache: the discovery API poll, dns: re-resolving a node name); "
            "every worker looks up on its own",
            ["source"],
            registry=registry,
        )
        # Resolved once; making the children also exports 0 from the start, so rate() and alerts have a series.
        self.elasticache_errors = self.discovery_errors.labels(DISCOVERY_ELASTICACHE)
        self.dns_errors = self.discovery_errors.labels(DISCOVERY_DNS)
        if multiprocess_dir() is None:
            # One process: it reports on itself. With workers: N the supervisor's exporter does (exporter_registry).
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            registry.register(BuildInfoCollector())

    def forward(self, port: int) -> ForwardMetrics:
        label = str(port)
        for reason in UPSTREAM_ERROR_REASONS:
            self.upstream_errors.labels(label, reason)
        self.rejected.labels(label, "limit")
        return ForwardMetrics(
            accepted=self.accepted.labels(label),
            active=self.active.labels(label),
            bytes_to_node=self.bytes.labels(label, DIRECTION_TO_NODE),
            bytes_to_client=self.bytes.labels(label, DIRECTION_TO_CLIENT),
            duration=self.duration.labels(label),
        )


def loaded_extensions() -> str:
    """The C extensions this process can load, comma-separated (`none` without any: the pure-Python path)."""
    names = [name.rpartition(".")[2].lstrip("_") for name in EXTENSIONS if extensions.load(name) is not None]
    return ",".join(names) or "none"


class BuildInfoCollector:
    """natfwd_build_info{version,extensions} 1, in the manner of Prometheus's own build_info."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "natfwd_build_info",
            "Always 1; the labels say which natfwd runs and which C extensions it loaded (none: pure Python)",
            labels=["version", "extensions"],
        )
        family.add_metric([__version__, loaded_extensions()], 1.0)
        yield family


class WorkerProcessCollector:
    """process_* for the supervisor and each worker (its child processes), labelled `pid` and `process`.

    Per process, not summed: each process has its own open-file limit, so descriptors near the limit must be
    compared process by process; sum by instance in PromQL for the total memory or CPU.
    """

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc

    def _children(self) -> list[int]:
        me = os.getpid()
        try:
            # The workers are forked by the main thread, whose task lists them (Linux CONFIG_PROC_CHILDREN).
            with open(os.path.join(self.proc, str(me), "task", str(me), "children")) as listed:
                return sorted(int(pid) for pid in listed.read().split())
        except OSError:
            pass  # no such file on this kernel: find them by their parent pid
        children: list[int] = []
        for entry in os.listdir(self.proc):
            if not entry.isdigit():
                continue
            try:
                with open(os.path.join(self.proc, entry, "stat"), "rb") as stat:
                    # The field after the parenthesised command name (which may hold spaces) is the state, then ppid.
                    ppid = int(stat.read().rpartition(b")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
            if ppid == me:
                children.append(int(entry))
        return sorted(children)

    def collect(self) -> Iterator[Metric]:
        processes = [(os.getpid(), "supervisor")] + [(pid, "worker") for pid in self._children()]
        merged: dict[str, Metric] = {}
        for pid, role in processes:
            collector = ProcessCollector(pid=_constant(pid), proc=self.proc, registry=None)
            for family in collector.collect():
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    labels = {**sample.labels, "pid": str(pid), "process": role}
                    into.add_sample(sample.name, labels, sample.value)
        yield from merged.values()


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


class SizedFilesCollector:
    """prometheus_client's multiprocess collector over the worker files that have been sized. A new worker's file
    exists empty for a moment, and reading an empty one fails the whole scrape (client_python issue 1199): a scrape
    racing a worker's start got HTTP 500, and a worker killed in that moment would have failed every scrape after."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterator[Metric]:
        from prometheus_client import multiprocess

        files = []
        for name in sorted(glob.glob(os.path.join(self.path, "*.db"))):
            try:
                if os.path.getsize(name) > 0:
                    files.append(name)
            except FileNotFoundError:  # a dead worker's gauges, removed since the listing
                continue
        merged: list[Metric] = multiprocess.MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call]
        return iter(merged)


def exporter_registry() -> CollectorRegistry:
    """The registry to expose: this process's own, or the sum of every worker's in multiprocess mode."""
    registry = CollectorRegistry()
    path = multiprocess_dir()
    if path is not None:
        registry.register(SizedFilesCollector(path))
        registry.register(FilesCollector(path, FastFamilies(None).all()))
        registry.register(WorkerProcessCollector())
        PlatformCollector(registry=registry)
        registry.register(BuildInfoCollector())
    return registry


def start_exporter(host: str, port: int, registry: CollectorRegistry) -> Any:
    """Serve Prometheus text at http://host:port/metrics in a daemon thread; raises NatfwdError if it cannot bind."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise bind_error(host, port, exc, "metrics.listen") from exc
    assert isinstance(thread, threading.Thread)
    return server


def mark_worker_dead(pid: int) -> None:
    path = multiprocess_dir()
    if path is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
        zero_gauges(path, pid, FastFamilies(None).all())
