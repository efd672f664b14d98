"""Listeners, the accept-time allowlist, limits, signals, reload and drain; one worker process per event loop."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from forwarder import config as config_mod
from forwarder import notify, tls
from forwarder.acceptor import TlsListener
from forwarder.errors import NatfwdError
from forwarder.mux import MuxPool, Session, new_pool
from forwarder.relay import BUFFER_SIZE, RAW_FD_SHARE, BufferPool, Half, duplicate
from forwarder.rewriting import (
    NodeMap,
    ObservingClient,
    RateLimitedWarning,
    RewriterFactory,
    RewritingNodeHalf,
    all_forwards,
    rewriter_factory,
)
from forwarder.tracking import Tracker

if TYPE_CHECKING:
    from forwarder.metrics import ForwardMetrics, Metrics

log = logging.getLogger("natfwd.server")
Listener = asyncio.Server | TlsListener  # both stop accepting on close() and leave live connections alone

LISTEN_BACKLOG = 4096


@dataclass(slots=True)
class Route:
    """What one listen port does right now; reload swaps `target` and `config` for new connections only."""

    port: int
    target: config_mod.Target
    config: config_mod.Config
    metrics: ForwardMetrics
    connections: set[ClientHalf]
    rewriter: RewriterFactory | None = None  # set for cluster-aware forwards; None keeps the plain fast relay
    mux: MuxPool | None = None  # the shared node connections, with `multiplex: true`


class NodeHalf(Half):
    """The node side of a connection."""

    __slots__ = ()


class ClientHalf(Half):
    """The client side: checks the allowlist at accept, then opens the node connection and pairs the halves."""

    __slots__ = (
        "worker",
        "route",
        "connect_task",
        "connect_expired",
        "seen_to_node",
        "seen_to_client",
        "idle_s",
        "accounted",
        "client_ip",
    )

    def __init__(self, worker: Worker, route: Route) -> None:
        super().__init__(worker.pool)
        self.worker = worker
        self.route = route
        self.connect_task: asyncio.Task[None] | None = None
        self.connect_expired = False  # the connect timer cancelled connect_task (the client did not leave)
        self.seen_to_node = 0
        self.seen_to_client = 0
        self.idle_s = 0.0
        self.accounted = False
        self.client_ip = ""

    def node_half(self) -> NodeHalf:
        return NodeHalf(self.worker.pool)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        route = self.route
        worker = self.worker
        peer = transport.get_extra_info("peername")
        client_ip = peer[0] if peer else ""
        if not worker.allows(route, client_ip):
            self.transport.abort()
            return
        if worker.active >= route.config.max_connections:
            worker.reject(route, "limit", client_ip)
            self.transport.abort()
            return
        if worker.draining:
            worker.reject(route, "draining", client_ip)
            self.transport.abort()
            return
        worker.active += 1
        self.accounted = True
        route.connections.add(self)
        route.metrics.accepted.inc()
        route.metrics.active.inc()
        self.client_ip = client_ip
        node = self.node_half()
        self.peer = node
        node.peer = self
        self.open_node(node)

    def open_node(self, node: NodeHalf) -> None:
        """Connect this client's own node connection (MuxClient shares one instead)."""
        self.connect_task = self.worker.loop.create_task(self._connect(node, self.route.target, self.client_ip))

    async def _connect(self, node: NodeHalf, target: config_mod.Target, client_ip: str) -> None:
        loop = self.worker.loop
        route = self.route
        started = loop.time()
        # A timer that cancels this task, rather than asyncio.timeout(): that asks for the running loop twice per
        # connection, each a getpid() system call on Python 3.11, and this runs once per client connection.
        expired = loop.call_later(route.config.connect_timeout_s, self._connect_expired)
        try:
            try:
                upstream_ssl = self.worker.upstream_ssl
                await loop.create_connection(
                    lambda: node,
                    target.host,
                    target.port,
                    ssl=upstream_ssl,
                    # The name checked and sent as SNI is the target's host name (or its IP, checked against IP SANs).
                    server_hostname=target.host if upstream_ssl is not None else None,
                    ssl_handshake_timeout=route.config.connect_timeout_s if upstream_ssl is not None else None,
                )
            except asyncio.CancelledError:
                node.abort()  # the client left, or the timer fired; the node connection may have completed meanwhile
                if not self.connect_expired:
                    raise
                raise TimeoutError from None
            finally:
                expired.cancel()
        except (OSError, TimeoutError) as exc:
            self.worker.connect_failed("node connection failed", route.port, target, exc, client=client_ip)
            if self.transport is not None and not self.closed:
                self.transport.abort()
            return
        finally:
            self.connect_task = None
        self.worker.metrics.upstream_connect.observe(loop.time() - started)
        if self.closed:
            node.abort()
            return
        self.release_early()

    def _connect_expired(self) -> None:
        task = self.connect_task
        if task is not None:
            self.connect_expired = True
            task.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        task = self.connect_task
        if task is not None:
            task.cancel()
        super().connection_lost(exc)
        self._finish()

    def _finish(self) -> None:
        node = self.peer
        if node is not None and node.transport is not None and not node.closed:
            node.on_closed = self._finish  # the connection ends when the node side is gone too
            return
        if self.accounted:
            self.accounted = False
            self.worker.active -= 1
            if self.worker.active == 0:
                self.worker.idle.set()
            self.route.connections.discard(self)
            self.worker.account(self)
            self.route.metrics.active.dec()


class RewritingNode(RewritingNodeHalf, NodeHalf):
    """The node side of a cluster-aware connection: replies pass through the connection's rewriter."""

    __slots__ = ()


class RewritingClientHalf(ObservingClient, ClientHalf):
    """The client side of a cluster-aware connection: requests are shown to the rewriter, then relayed unchanged."""

    __slots__ = ()

    def node_half(self) -> NodeHalf:
        factory = self.route.rewriter
        assert factory is not None  # _factory picks this class only for routes with a rewriter
        return RewritingNode(self.worker.pool, factory())


class MuxClient(ClientHalf):
    """A client on a multiplexed forward: its requests share the route's node connections (forwarder/mux.py).

    The transport stays for accounting, drain and close; once admitted, the session reads and writes a duplicate
    of its socket. A pinned client gets its own node connection, and from then on it is an ordinary ClientHalf
    (raw mode included): the transport resumes reading once the bytes the session had not sent are out.
    """

    __slots__ = ("session",)

    def __init__(self, worker: Worker, route: Route) -> None:
        super().__init__(worker, route)
        self.session: Session | None = None

    def open_node(self, node: NodeHalf) -> None:
        assert self.transport is not None
        self.transport.pause_reading()
        self.reading_paused = True
        # uvloop reads once after connection_made whatever the protocol asked (those bytes land in `early`);
        # pausing again one loop turn later is what stops it, and only then may the session read the socket.
        self.worker.loop.call_soon(self._join)

    def _join(self) -> None:
        if self.closed or self.transport is None:
            return
        self.transport.pause_reading()
        first = bytes(self.early) if self.early is not None else b""
        self.early = None
        try:
            sock = duplicate(self.transport)
        except OSError:  # no descriptor to spare: a connection of its own needs none beyond the node's socket
            self.worker.metrics.pinned.labels(str(self.route.port), "no_descriptor").inc()
            self.mux_pin(first)
            return
        assert self.peer is not None
        self.session = self.worker.mux_pool(self.route).join(self, self.peer, sock)
        self.session.start(first)

    def mux_pin(self, rest: bytes) -> None:
        self.session = None
        if self.closed or self.peer is None:
            return
        self.early = bytearray(rest)  # release_early sends them once connected, then resumes the transport
        super().open_node(cast(NodeHalf, self.peer))

    def mux_close(self, *, abort: bool) -> None:
        self.session = None
        if self.transport is not None and not self.closed:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._detach()
        super().connection_lost(exc)

    def abort(self) -> None:
        self._detach()
        super().abort()

    def _detach(self) -> None:
        session = self.session
        if session is not None:
            self.session = None
            session.detach()


class _MuxHooks:
    """A pool's reports, counted and logged like a dedicated connection's."""

    __slots__ = ("worker", "port")

    def __init__(self, worker: Worker, port: int) -> None:
        self.worker = worker
        self.port = port

    def connected(self, seconds: float) -> None:
        self.worker.metrics.upstream_connect.observe(seconds)
        self.worker.metrics.shared.labels(str(self.port)).inc()

    def closed(self) -> None:
        self.worker.metrics.shared.labels(str(self.port)).dec()

    def pinned(self, reason: str) -> None:
        self.worker.metrics.pinned.labels(str(self.port), reason).inc()

    def connect_failed(self, target: config_mod.Target, exc: BaseException) -> None:
        self.worker.connect_failed("shared node connection failed", self.port, target, exc)


def _connect_failure_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    return "error"


class Worker:
    """One event loop's listeners and connections. Reload and drain are methods; signals are wired in `run`."""

    def __init__(
        self,
        cfg: config_mod.Config,
        config_path: str | None,
        metrics: Metrics,
        *,
        reuse_port: bool,
        incoming_cpu: int | None = None,
        count_reloads: bool = True,
        buffer_size: int = BUFFER_SIZE,
    ) -> None:
        self.config = cfg
        self.config_path = config_path
        self.metrics = metrics
        self.reuse_port = reuse_port
        # cpu_affinity: the CPU this worker is pinned to. Its listeners ask the kernel (Linux 6.2 and later) for the
        # connections whose SYN that CPU received, so each connection is served on the CPU its packets arrive on.
        self.incoming_cpu = incoming_cpu
        self.count_reloads = count_reloads
        self.pool = BufferPool(buffer_size)
        self.pool.reserved_fds = fds_needed(cfg.max_connections)
        self.server_ssl = tls.server_context(cfg)
        self.upstream_ssl = tls.upstream_context(cfg)
        self.routes: dict[int, Route] = {}
        self.listeners: dict[int, Listener] = {}
        self.active = 0
        self.draining = False
        self.stopping = asyncio.Event()
        self.idle = asyncio.Event()  # set whenever the last connection closes; drain waits on it
        self._retired: list[Route] = []  # routes removed by reload whose connections still run
        self._tasks: set[asyncio.Task[None]] = set()
        # Set by start(). Per connection, asyncio.get_running_loop() costs a getpid() system call (Python 3.11
        # checks for a fork), and connection setup asked for it five times.
        self.loop: asyncio.AbstractEventLoop
        self.nodes = NodeMap()  # the rewriters' node -> public address map, shared by every connection
        self.warn = RateLimitedWarning()
        self.tracker = Tracker(self)

    def mux_pool(self, route: Route) -> MuxPool:
        """The route's shared node connections, new after a retarget (the old ones serve their clients out)."""
        pool = route.mux
        if pool is None:  # reload retires a pool whose target or settings changed (_apply)
            pool = route.mux = new_pool(self.loop, route.config, route.target, _MuxHooks(self, route.port))
        return pool

    # --- accounting -------------------------------------------------------------------------------------------
    def allows(self, route: Route, client_ip: str) -> bool:
        """The allowlist check, at accept (with TLS: before the handshake); a refusal is counted and logged."""
        if route.config.is_allowed(client_ip):
            return True
        self.reject(route, "not_allowed", client_ip)
        return False

    def connect_failed(
        self, message: str, port: int, target: config_mod.Target, exc: BaseException, **extra: object
    ) -> None:
        """Count (by reason) and log a node connection that could not be made."""
        reason = _connect_failure_reason(exc)
        self.metrics.upstream_errors.labels(str(port), reason).inc()
        error = str(exc) or type(exc).__name__
        log.warning(message, extra={"forward": port, "target": str(target), **extra, "reason": reason, "error": error})

    def reject(self, route: Route, reason: str, client_ip: str, error: str | None = None) -> None:
        self.metrics.rejected.labels(str(route.port), reason).inc()
        extra = {"forward": route.port, "client": client_ip, "reason": reason}
        if error is not None:
            extra["error"] = error
        log.info("connection refused", extra=extra)

    def account(self, conn: ClientHalf) -> None:
        """Move a connection's byte counts since the last sweep into the counters."""
        conn.sync_counts()
        node = conn.peer
        to_node = conn.nbytes - conn.seen_to_node
        to_client = (node.nbytes if node is not None else 0) - conn.seen_to_client
        if to_node:
            conn.seen_to_node += to_node
            conn.route.metrics.bytes_to_node.inc(to_node)
        if to_client:
            conn.seen_to_client += to_client
            conn.route.metrics.bytes_to_client.inc(to_client)

    def sweep_interval_s(self) -> float:
        idle = self.config.idle_timeout_s
        return 1.0 if idle == 0 else max(0.05, min(1.0, idle / 4))

    async def _sweep(self) -> None:
        """Once a tick: flush byte counters, and close connections idle longer than idle_timeout_s."""
        while True:
            interval = self.sweep_interval_s()
            await asyncio.sleep(interval)
            limit = self.config.idle_timeout_s
            self._retired = [r for r in self._retired if r.connections]
            for route in list(self.routes.values()) + self._retired:
                for conn in list(route.connections):
                    before = conn.seen_to_node + conn.seen_to_client
                    self.account(conn)
                    if conn.seen_to_node + conn.seen_to_client != before or conn.connect_task is not None:
                        conn.idle_s = 0.0
                        continue
                    conn.idle_s += interval
                    if limit and conn.idle_s >= limit:
                        log.info("idle timeout", extra={"forward": route.port, "idle_s": round(conn.idle_s, 2)})
                        self.metrics.rejected.labels(str(route.port), "idle_timeout").inc()
                        conn.abort()
                        if conn.peer is not None:
                            conn.peer.abort()

    # --- listeners --------------------------------------------------------------------------------------------
    def _bind(self, address: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if self.incoming_cpu is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_INCOMING_CPU, self.incoming_cpu)
            if family == socket.AF_INET6 and address == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((address, port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise NatfwdError(_bind_message(address, port, exc)) from exc
        return sock

    async def _open(self, forwards: tuple[config_mod.Forward, ...], cfg: config_mod.Config) -> dict[int, Listener]:
        """Bind every forward or none: on any failure the ones already opened are closed again."""
        loop = asyncio.get_running_loop()
        opened: dict[int, Listener] = {}
        try:
            for forward in forwards:
                route = self.routes.get(forward.port)
                if route is None:
                    route = Route(forward.port, forward.target, cfg, self.metrics.forward(forward.port), set())
                    route.rewriter = rewriter_factory(cfg, forward.port, self.nodes, self.warn)
                sock = self._bind(cfg.listen_address, forward.port)
                if self.server_ssl is None:
                    opened[forward.port] = await loop.create_server(
                        _factory(self, route), sock=sock, backlog=LISTEN_BACKLOG
                    )
                else:
                    opened[forward.port] = self._tls_listener(route, sock, self.server_ssl, cfg.connect_timeout_s)
                self.routes.setdefault(forward.port, route)
        except BaseException:
            for server in opened.values():
                server.close()
            raise
        return opened

    def _tls_listener(self, route: Route, sock: socket.socket, context: ssl.SSLContext, timeout_s: float) -> Listener:
        # The allowlist is checked before the handshake, so a client outside it costs no TLS work (connection_made
        # checks it again, harmlessly); the limit is checked after it, against connections that are live.
        def admit(client_ip: str) -> bool:
            return self.allows(route, client_ip)

        def failed(client_ip: str, error: str) -> None:
            self.reject(route, "tls_handshake", client_ip, error=error)

        try:
            return TlsListener(
                sock, LISTEN_BACKLOG, _factory(self, route), context, timeout_s, admit, failed, self._spawn
            )
        except OSError as exc:
            sock.close()
            raise NatfwdError(_bind_message(self.config.listen_address, route.port, exc)) from exc

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = await self.tracker.prepare(self.config)
        self.listeners = await self._open(all_forwards(self.config), self.config)
        self._spawn(self._sweep())
        self.tracker.start()
        for port, route in sorted(self.routes.items()):
            log.info(
                "forwarding", extra={"listen": f"{self.config.listen_address}:{port}", "target": str(route.target)}
            )

    def _spawn(self, coro: object) -> None:
        # Keep a reference: a bare create_task can be garbage collected mid-flight.
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- reload -----------------------------------------------------------------------------------------------
    async def reload(self, new: config_mod.Config | None = None) -> bool:
        """Apply a new config: open new forwards, close removed ones, retarget changed ones.

        Live connections keep their node. Returns False (and keeps the old config) when the new config is invalid
        or a new port cannot be bound.
        """
        notify.reloading()
        try:
            if new is None:
                if self.config_path is None:
                    raise config_mod.ConfigError("no config file to reload from")
                new = config_mod.load(self.config_path)
            new = self.tracker.adopt(new)
            await self._apply(new)
        except (config_mod.ConfigError, NatfwdError) as exc:
            log.error("reload refused, still serving the previous config", extra={"error": str(exc)})
            if self.count_reloads:
                self.metrics.reloads.labels("failure").inc()
            notify.ready()
            return False
        if self.count_reloads:
            self.metrics.reloads.labels("success").inc()
        log.info("config reloaded", extra={"forwards": len(new.forwards)})
        notify.ready()
        return True

    async def _apply(self, new: config_mod.Config) -> None:
        old = self.config
        # Certificate files are re-read on every reload; a broken one refuses the whole reload.
        server_ssl, upstream_ssl = tls.server_context(new), tls.upstream_context(new)
        for key in ("workers", "metrics", "cpu_affinity"):
            if getattr(old, key) != getattr(new, key):
                log.warning(f"{key} changed; that takes effect at the next restart", extra={"key": key})
        rebind_all = new.listen_address != old.listen_address
        wanted = {f.port: f for f in all_forwards(new)}
        to_close = [p for p in self.listeners if rebind_all or p not in wanted]
        to_open = tuple(f for f in all_forwards(new) if rebind_all or f.port not in self.listeners)
        # Close first so a changed listen_address can take the same ports; reopen the old ones if the new fail.
        closed = {p: self.listeners.pop(p) for p in to_close}
        for server in closed.values():
            server.close()
        try:
            opened = await self._open(to_open, new)
        except NatfwdError:
            reopen = tuple(config_mod.Forward(p, self.routes[p].target) for p in closed)
            self.listeners.update(await self._open(reopen, old))
            raise
        self.listeners.update(opened)
        for port in closed:
            if port not in wanted:
                route = self.routes.pop(port)
                self._retired.append(route)
                if route.mux is not None:
                    route.mux.retire()
                self.metrics.forward_changes.labels("closed").inc()
                log.info("forward closed; live connections continue", extra={"forward": port})
        for port in opened:
            if port not in closed:
                self.metrics.forward_changes.labels("opened").inc()
                log.info("forward opened", extra={"forward": port, "target": str(wanted[port].target)})
        self.nodes.update(new)
        self.tracker.config_changed()
        for port, forward in wanted.items():
            route = self.routes[port]
            if route.target != forward.target:
                log.info(
                    "forward retargeted", extra={"forward": port, "from": str(route.target), "to": str(forward.target)}
                )
                self.metrics.forward_changes.labels("retargeted").inc()
            route.target = forward.target
            route.config = new
            shared = (new.multiplex, new.engine, new.multiplex_connections, new.connect_timeout_s)
            if route.mux is not None and (
                route.mux.target != forward.target
                or shared != (old.multiplex, old.engine, old.multiplex_connections, old.connect_timeout_s)
            ):
                route.mux.retire()  # its clients keep it; new clients get a pool made from the new config
                route.mux = None
            route.rewriter = rewriter_factory(new, port, self.nodes, self.warn)
        if self.server_ssl is not None and new.tls is not None:
            # Listeners keep their SSLContext; loading the new chain into it serves it to every new handshake.
            self.server_ssl.load_cert_chain(new.tls.cert, new.tls.key)
        if (old.tls is None) != (new.tls is None) or (old.tls and new.tls and old.tls.client_ca != new.tls.client_ca):
            log.warning("turning tls on or off, or changing tls.client_ca, takes effect at the next restart")
        del server_ssl
        self.upstream_ssl = upstream_ssl
        if new.max_connections != old.max_connections:
            self.pool.reserved_fds = fds_needed(new.max_connections)
            self.pool.fd_budget = -1  # recomputed at the next busy connection
        self.config = new

    # --- drain ------------------------------------------------------------------------------------------------
    async def drain(self) -> None:
        """Stop accepting, let live connections finish within drain_timeout_s, then abort the rest."""
        self.draining = True
        for server in self.listeners.values():
            server.close()
        self.listeners.clear()
        grace = self.config.drain_timeout_s
        log.info("draining", extra={"active": self.active, "grace_s": grace})
        if self.active:
            self.idle.clear()
            try:
                await asyncio.wait_for(self.idle.wait(), grace)
            except TimeoutError:
                pass
        remaining = [c for r in list(self.routes.values()) + self._retired for c in r.connections]
        for conn in remaining:
            conn.abort()
            if conn.peer is not None:
                conn.peer.abort()
        if remaining:
            log.info("grace period over, aborted connections", extra={"aborted": len(remaining)})
            await asyncio.sleep(0)
        for task in list(self._tasks):
            task.cancel()
        for route in list(self.routes.values()) + self._retired:
            for conn in list(route.connections):
                self.account(conn)
        self.pool.close(self.loop)

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT, reloading on SIGHUP; then drain. Raises NatfwdError if a port cannot be bound."""
        await self.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        if on_ready is not None:
            on_ready()
        await self.stopping.wait()
        log.info("stopping")
        notify.stopping()
        await self.drain()


def _factory(worker: Worker, route: Route) -> Callable[[], ClientHalf]:
    # The class is picked per connection: a reload can turn rewriting or multiplexing on or off for a port.
    def make() -> ClientHalf:
        if route.rewriter is not None:
            return RewritingClientHalf(worker, route)
        if route.config.multiplex:
            return MuxClient(worker, route)
        return ClientHalf(worker, route)

    return make


def _bind_message(address: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is already in use on {address}; is another natfwd or memcached running?"
    if exc.errno == errno.EACCES:
        return f"cannot bind {address}:{port}: permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot bind {address}:{port}: {address} is not an address of this host; check listen_address"
    return f"cannot bind {address}:{port}: {exc.strerror or exc}"


def fds_needed(max_connections: int) -> int:
    """Descriptors a worker needs at its connection limit: a client and a node socket each, plus listeners and logs.

    Raw mode's socket duplicates and pipes come only out of what the open-file limit leaves beyond this.
    """
    return 2 * max_connections + 64


def raise_fd_limit(max_connections: int) -> None:
    """Raise RLIMIT_NOFILE to hold max_connections and as much again for raw mode; warn when it cannot.

    The soft limit goes up to the hard one; the hard one too when it is lower than that and we may raise it
    (root, CAP_SYS_RESOURCE). Raw mode uses what the limit leaves beyond fds_needed(), but at least an eighth.
    """
    needed = fds_needed(max_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if hard < 2 * needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (2 * needed, 2 * needed))
            soft = hard = 2 * needed
        except (ValueError, OSError):
            pass  # not privileged: keep what we were given
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit", extra={"soft": soft, "hard": hard, "error": str(exc)})
    if soft < needed + soft // RAW_FD_SHARE:
        # Below `needed` not every connection can open; below that plus raw mode's share, busy connections in raw
        # mode (splice) can hold descriptors a new connection would need.
        log.warning(
            "open-file limit is below what max_connections needs; raise LimitNOFILE or ulimit -n",
            extra={"limit": soft, "needed": needed, "recommended": 2 * needed, "max_connections": max_connections},
        )


def new_event_loop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


def run_worker(
    cfg: config_mod.Config,
    config_path: str | None,
    *,
    reuse_port: bool,
    export_metrics: bool,
    incoming_cpu: int | None = None,
    count_reloads: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run one worker process to completion (returns after SIGTERM and drain). Raises NatfwdError on bind failure."""
    from prometheus_client import CollectorRegistry

    from forwarder import metrics as metrics_mod

    registry = CollectorRegistry()
    metrics = metrics_mod.Metrics(registry)
    if export_metrics and cfg.metrics is not None:
        try:
            metrics_mod.start_exporter(cfg.metrics.host, cfg.metrics.port, registry)
        except OSError as exc:
            raise NatfwdError("metrics.listen: " + _bind_message(cfg.metrics.host, cfg.metrics.port, exc)) from exc
        log.info("metrics", extra={"url": f"http://{cfg.metrics.host}:{cfg.metrics.port}/metrics"})
    raise_fd_limit(cfg.max_connections)

    async def main() -> None:
        worker = Worker(
            cfg, config_path, metrics, reuse_port=reuse_port, incoming_cpu=incoming_cpu, count_reloads=count_reloads
        )
        await worker.run(on_ready)

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main())


def serve(cfg: config_mod.Config, config_path: str | None) -> None:
    """Run `natfwd serve` in the foreground until SIGTERM; raises NatfwdError when it cannot start."""
    if cfg.workers == 1:
        run_worker(cfg, config_path, reuse_port=False, export_metrics=True, on_ready=notify.ready)
        return
    from forwarder import supervisor

    supervisor.run(cfg, config_path)
