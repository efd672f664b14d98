"""Live node tracking for one worker: forwards followed from the ElastiCache API, DNS-name targets re-resolved."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from forwarder import config as config_mod
from forwarder import portstate
from forwarder.errors import NatfwdError

if TYPE_CHECKING:
    from forwarder.aws.cluster import NodeEndpoint
    from forwarder.metrics import Metrics
    from forwarder.rewriting import NodeMap

log = logging.getLogger("natfwd.tracking")

DNS_REFRESH_S = 30.0
"""How often DNS-name targets are re-resolved when there is no discovery section (else every refresh_s)."""


def forwards_for(nodes: Sequence[NodeEndpoint], ports: Mapping[str, int]) -> tuple[config_mod.Forward, ...]:
    """One forward per node, to its endpoint name, ordered by listen port."""
    forwards = [config_mod.Forward(ports[node.node_id], config_mod.Target(node.address, node.port)) for node in nodes]
    return tuple(sorted(forwards, key=lambda forward: forward.port))


def _shared_file() -> Path | None:
    # With `workers: N` and no state_file, the supervisor gives its workers one file to agree through.
    shared = os.environ.get(portstate.SHARED_FILE_ENV)
    return Path(shared) if shared else None


def _reserved(cfg: config_mod.Config) -> frozenset[int]:
    ports = set()
    if cfg.auto_discovery is not None:
        ports.add(cfg.auto_discovery.port)
    if cfg.metrics is not None:
        ports.add(cfg.metrics.port)
    return frozenset(ports)


class Host(Protocol):
    """What the tracker needs from the worker it keeps in step (worker.Worker), and how it reports changes."""

    @property
    def config(self) -> config_mod.Config: ...  # what the worker serves now
    @property
    def nodes(self) -> NodeMap: ...  # the rewriters' node map; the tracker refreshes its resolved IPs
    @property
    def metrics(self) -> Metrics: ...
    @property
    def draining(self) -> bool: ...  # no more polls then
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...  # a task the worker cancels at drain
    async def apply_discovered(self, new: config_mod.Config) -> None: ...  # serve `new`; raises if it cannot


class Tracker:
    """Keeps one worker's forwards and node map in step with the cluster; both loops run until drain cancels them."""

    def __init__(self, worker: Host) -> None:
        self.worker = worker
        self.discovered: tuple[config_mod.Forward, ...] = ()
        self.ports: dict[str, int] = {}  # node id -> listen port, stable while the node exists
        self.first_port: int | None = None
        self._client: Any = None  # the AwsClient, made once: creating a boto3 client loads its service model
        self._client_key: tuple[str | None, str | None] = (None, None)
        self._dns_wake = asyncio.Event()

    # --- called by the worker ---------------------------------------------------------------------------------
    async def prepare(self, cfg: config_mod.Config) -> config_mod.Config:
        """At start: discover the forwards (when configured) and resolve node names for the rewriters.

        Raises NatfwdError when the cluster cannot be listed or has no node with an endpoint yet.
        """
        if cfg.discovery is not None:
            discovery = cfg.discovery
            try:
                nodes = await self._describe(discovery)
            # Anything boto3 raises (not only the wrapped API errors) is a clear start failure.
            except Exception as exc:
                raise NatfwdError(f"discovery: cannot list the nodes of {discovery.cluster_id!r}: {exc}") from exc
            if not nodes:
                raise NatfwdError(
                    f"discovery: cluster {discovery.cluster_id!r} has no node with an endpoint yet; start natfwd "
                    "once it is available, or list forwards in the config"
                )
            cfg = self._follow(cfg, nodes)
            for forward in cfg.forwards:
                log.info("discovered node", extra={"forward": forward.port, "target": str(forward.target)})
        self.worker.nodes.update(cfg, await self._resolve(cfg, log_changes=False))
        return cfg

    def start(self) -> None:
        self.worker.spawn(self._poll_discovery())
        self.worker.spawn(self._poll_dns())

    def adopt(self, cfg: config_mod.Config) -> config_mod.Config:
        """A reloaded config with a discovery section has no forwards of its own: keep the discovered ones."""
        if cfg.discovery is not None and not cfg.forwards and self.discovered:
            return dataclasses.replace(cfg, forwards=self.discovered)
        return cfg

    def config_changed(self) -> None:
        """New targets may be DNS names: resolve them now rather than at the next period."""
        self._dns_wake.set()

    # --- discovery --------------------------------------------------------------------------------------------
    async def _describe(self, discovery: config_mod.Discovery) -> list[NodeEndpoint]:
        from forwarder.aws import discovery as discovery_mod
        from forwarder.aws.client import AwsClient

        key = (discovery.region, discovery.endpoint_url)
        if self._client is None or key != self._client_key:
            self._client = await asyncio.to_thread(AwsClient.create, discovery.region, None, discovery.endpoint_url)
            self._client_key = key
        return await asyncio.to_thread(discovery_mod.describe_nodes, discovery, self._client)

    def _follow(self, cfg: config_mod.Config, nodes: Sequence[NodeEndpoint]) -> config_mod.Config:
        """`cfg` with forwards for `nodes`; raises ConfigError when the ports run out."""
        assert cfg.discovery is not None
        if self.first_port != cfg.discovery.first_port:
            self.ports = {}  # a new first_port renumbers everything
        node_ids = [node.node_id for node in nodes]
        ports = self._assign(cfg.discovery, node_ids, _reserved(cfg))
        forwards = forwards_for(nodes, ports)
        self.ports, self.first_port, self.discovered = ports, cfg.discovery.first_port, forwards
        return dataclasses.replace(cfg, forwards=forwards)

    def _assign(self, discovery: config_mod.Discovery, node_ids: list[str], reserved: frozenset[int]) -> dict[str, int]:
        """Ports per node id: through the state file when there is one, so that workers and restarts agree."""
        path = discovery.state_file or _shared_file()
        if path is None:
            return portstate.assign_ports(node_ids, self.ports, discovery.first_port, reserved)
        try:
            return portstate.assign(path, discovery.cluster_id, node_ids, self.ports, discovery.first_port, reserved)
        except OSError as exc:
            if not self.discovered:  # at start: a state file that cannot be written is a configuration error
                raise NatfwdError(
                    f"discovery.state_file: cannot write {path}: {exc.strerror or exc}; create its directory or "
                    "give natfwd write access to it"
                ) from exc
            log.warning(
                "cannot write the port state file; assigning ports in this worker only",
                extra={"path": str(path), "error": str(exc)},
            )
            return portstate.assign_ports(node_ids, self.ports, discovery.first_port, reserved)

    async def _poll_discovery(self) -> None:
        while True:
            discovery = self.worker.config.discovery
            await asyncio.sleep(discovery.refresh_s if discovery is not None else DNS_REFRESH_S)
            discovery = self.worker.config.discovery
            if discovery is None or self.worker.draining:
                continue
            try:
                nodes = await self._describe(discovery)
            # Whatever the API or boto3 raises, the server keeps serving what it has and tries again next period.
            except Exception as exc:
                self.worker.metrics.elasticache_errors.inc()
                log.warning(
                    "discovery failed; keeping the current forwards and retrying next period",
                    extra={"cluster_id": discovery.cluster_id, "error": str(exc) or type(exc).__name__},
                )
                continue
            if not nodes:
                log.warning(
                    "discovery found no node with an endpoint; keeping the current forwards",
                    extra={"cluster_id": discovery.cluster_id},
                )
                continue
            await self._apply_nodes(nodes)

    async def _apply_nodes(self, nodes: Sequence[NodeEndpoint]) -> None:
        cfg = self.worker.config
        saved = (self.ports, self.first_port, self.discovered)
        try:
            new = self._follow(cfg, nodes)
            if new.forwards == cfg.forwards:
                return
            log.info("cluster nodes changed; applying", extra={"forwards": len(new.forwards)})
            await self.worker.apply_discovered(new)
        except (config_mod.ConfigError, NatfwdError) as exc:
            self.ports, self.first_port, self.discovered = saved
            log.error("could not apply the discovered nodes; retrying next period", extra={"error": str(exc)})

    # --- DNS --------------------------------------------------------------------------------------------------
    async def _poll_dns(self) -> None:
        while True:
            discovery = self.worker.config.discovery
            try:
                await asyncio.wait_for(self._dns_wake.wait(), discovery.refresh_s if discovery else DNS_REFRESH_S)
            except TimeoutError:
                pass
            self._dns_wake.clear()
            cfg = self.worker.config
            resolved = await self._resolve(cfg, log_changes=True)
            if self.worker.config is cfg:  # a reload meanwhile has woken us again; its round will do this
                self.worker.nodes.update(cfg, resolved)

    async def _resolve(self, cfg: config_mod.Config, *, log_changes: bool) -> dict[str, tuple[str, ...]]:
        """IPs of every DNS-name node target; a name that fails to resolve keeps its previous IPs."""
        loop = asyncio.get_running_loop()
        before = self.worker.nodes.resolved
        resolved: dict[str, tuple[str, ...]] = {}
        for forward in cfg.forwards:
            target = forward.target
            host = target.host.lower().rstrip(".")
            if target.is_ip or host in resolved:
                continue
            try:
                infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                self.worker.metrics.dns_errors.inc()
                resolved[host] = before.get(host, ())
                if log_changes:
                    log.warning("node name did not resolve", extra={"target": str(target), "error": str(exc)})
                continue
            ips = tuple(sorted({str(info[4][0]) for info in infos}))
            resolved[host] = ips
            if log_changes and host in before and before[host] != ips:
                log.info(
                    "node address changed; new connections follow",
                    extra={
                        "forward": forward.port,
                        "target": str(target),
                        "from": ",".join(before[host]),
                        "to": ",".join(ips),
                    },  # fmt: skip
                )
                self.worker.metrics.forward_changes.labels("resolved").inc()
        return resolved
